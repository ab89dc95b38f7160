"""Tiny real transformer models, built and saved inside a test (no hub downloads).

They are random-weight but architecturally real: the same loading code that serves
all-MiniLM-L6-v2 or a 7B reward model loads these folders.

>>> path = tiny_bert(tmp_path / "enc")                 # doctest: +SKIP
>>> AutoModel.from_pretrained(path)                    # doctest: +SKIP
"""

from __future__ import annotations

import string
from pathlib import Path

# Enough of a vocabulary that English text tokenises to many distinct ids.
_WORDS = [
    *string.ascii_lowercase,
    *string.digits,
    *"!?.,:;'\"()[]{}+-*/=#$%&<>_\\|@^~`",
    "the",
    "a",
    "is",
    "of",
    "and",
    "to",
    "in",
    "what",
    "how",
    "answer",
    "yes",
    "no",
    "good",
    "bad",
    "user",
    "assistant",
    "math",
    "code",
    "safe",
    "help",
    "sorry",
]


def _vocab() -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return special + _WORDS + pieces


def tiny_bert(path: Path, *, seq_cls: bool = False, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random BERT (encoder, or a 1-label sequence classifier) with its tokenizer."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(_vocab())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    cfg.num_labels = 1  # a reward model: one scalar output
    model = BertForSequenceClassification(cfg) if seq_cls else BertModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llama(path: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random Llama causal LM with a byte-level BPE tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(_WORDS), "Which answer is better, A or B?", "A B A B the answer is 42"]
    bpe.train_from_iterator(corpus * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=256,
    )
    tok.chat_template = _CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# A Llama-3-style reward-model template: the template itself writes the BOS token, as
# Skywork-Reward-V2's does, so a server that also adds BOS while tokenising doubles it.
_RM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
)


def tiny_llama_rm(
    path: Path, *, hidden: int = 128, heads: int = 2, positions: int = 512, seed: int = 0
) -> Path:
    """Save a tiny random 1-label ``LlamaForSequenceClassification`` reward model.

    Its tokenizer adds BOS when asked for special tokens (``<|begin_of_text|> $A``) and its chat
    template writes BOS too, like Llama-3 reward models. The head dimension is
    ``hidden // heads`` (64 by default: vLLM's CPU attention does not support 16).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bos, eos, pad = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
    specials = [bos, eos, pad, "<|start_header_id|>", "<|end_header_id|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(_WORDS), "good good good bad bad", "the answer is 42, user assistant"]
    bpe.train_from_iterator(corpus * 20, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=positions,
    )
    tok.chat_template = _RM_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
        architectures=["LlamaForSequenceClassification"],
    )
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # a score head with margins worth comparing (random init is ~0)
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
