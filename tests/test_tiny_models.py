"""The tiny models load through the same Auto* classes real checkpoints use."""

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from tests.tiny_models import tiny_bert, tiny_llama


def test_tiny_bert_encoder_and_classifier(tmp_path: Path) -> None:
    enc = tiny_bert(tmp_path / "enc")
    tok = AutoTokenizer.from_pretrained(enc)
    batch = tok(["what is the answer", "yes"], padding=True, return_tensors="pt")
    # real word pieces, not [UNK] (id 1): the text reaches the model
    assert 1 not in batch["input_ids"][0].tolist()
    out = AutoModel.from_pretrained(enc)(**batch).last_hidden_state
    assert out.shape[0] == 2 and out.shape[2] == 32
    cls = tiny_bert(tmp_path / "cls", seq_cls=True)
    logits = AutoModelForSequenceClassification.from_pretrained(cls)(**batch).logits
    assert logits.shape == (2, 1)


def test_tiny_llama_generates_with_chat_template(tmp_path: Path) -> None:
    path = tiny_llama(tmp_path / "lm")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "A or B?"}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3
