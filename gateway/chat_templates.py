"""Prompts that arrive already chat-templated, turned back into messages.

OpenRLHF (``--apply_chat_template``) sends the prompt as the policy's template rendered it, and
the query as the decoded prompt + response tokens (special tokens kept). An RM service applies
its own template to messages; given the rendered text it would template it a second time (its
template around the policy's). So a prompt in a known template is parsed back into messages,
the generation header at its end dropped, and a response's trailing end-of-turn token removed.

Known templates: ChatML (``<|im_start|>role ... <|im_end|>``: Qwen, SmolLM2), Llama 3
(``<|start_header_id|>role<|end_header_id|> ... <|eot_id|>``), Gemma
(``<start_of_turn>role ... <end_of_turn>``) and Llama 2 / Mistral (``[INST] ... [/INST]``).
Anything else is left as it is (plain text, one user turn).

>>> parse_templated("<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\n2+2?<|im_end|>"
...                 "\\n<|im_start|>assistant\\n")
[{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
>>> parse_templated("What is 2+2?") is None
True
>>> strip_end_of_turn("4<|im_end|>\\n")
'4'
"""

from __future__ import annotations

import re

Message = dict[str, str]

#: Tokens that end a turn or the text, as tokenizers decode them (special tokens kept).
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<eos>",
    "</s>",
)
_BOS = ("<|begin_of_text|>", "<bos>", "<s>", "<|endoftext|>")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}

_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\s*|$)", re.S)
_LLAMA3 = re.compile(
    r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S
)
_GEMMA = re.compile(r"<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>\s*|$)", re.S)
_INST = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=(?:</s>)?\s*(?:<s>)?\s*\[INST\]|$)", re.S)


def _turns(pattern: re.Pattern[str], text: str) -> list[Message] | None:
    turns = [(role, body) for role, body in pattern.findall(text)]
    if not turns or any(role not in _ROLES for role, _ in turns):
        return None
    msgs = [{"role": _ROLES[role], "content": body.strip()} for role, body in turns]
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()  # the generation header the response follows
    return msgs or None


def _inst_turns(text: str) -> list[Message] | None:
    msgs: list[Message] = []
    for user, answer in _INST.findall(text):
        msgs.append({"role": "user", "content": user.strip()})
        answer = strip_end_of_turn(answer)
        if answer:
            msgs.append({"role": "assistant", "content": answer})
    return msgs or None


def parse_templated(prompt: str) -> list[Message] | None:
    """The messages of a prompt rendered by a known chat template, or None for any other text."""
    text = prompt.strip()
    for bos in _BOS:
        text = text.removeprefix(bos)
    if text.startswith("<|im_start|>"):
        return _turns(_CHATML, text)
    if text.startswith("<|start_header_id|>"):
        return _turns(_LLAMA3, text)
    if text.startswith("<start_of_turn>"):
        return _turns(_GEMMA, text)
    if text.startswith("[INST]"):
        return _inst_turns(text)
    return None


def strip_end_of_turn(response: str) -> str:
    """A response without the end-of-turn / end-of-text tokens a decode left at its end."""
    out = response.rstrip()
    changed = True
    while changed:
        changed = False
        for tok in END_OF_TURN:
            if out.endswith(tok):
                out = out[: -len(tok)].rstrip()
                changed = True
    return out
