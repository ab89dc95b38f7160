"""The pair encoder on ONNX Runtime with int8 weights: the same texts, tokeniser, truncation and
pooling as the torch encoder (:class:`gateway.features.HFEncoder`), ~3.4x less CPU per pair.

The encoder (mean pooling and L2 normalisation included) is exported once with ``torch.onnx``
(eager attention, so the graph is plain MatMuls that ONNX Runtime fuses), its weights quantised
to int8 per output channel (``onnxruntime.quantization.quantize_dynamic``), and the file kept
in the model cache under a hash of the weights (``<cache>/models/onnx/``); later loads need
neither torch nor the export. A forward pass is one ``InferenceSession.run`` call that holds no
GIL, so the gateway's event loop keeps serving while a batch is encoded.

What int8 costs in quality: on hh-rlhf pairs at 256 tokens the embeddings are within cosine
0.990 (mean 0.995) of the torch ones; replay accuracy on the three shipped matrices moves by
0.001 at most (docs/benchmarks.md). Activations are quantised with one scale per batch, so a pair's
embedding moves slightly (~1e-4) with the pairs it is batched with; the gateway stores each
route's ``h`` with its record, so feedback is applied with the features that were routed on.
Embeddings are cached under their own id (``onnx-int8#<hash>``), never mixed with the torch
encoder's.

Needs the ``onnx`` extra (``pip install 'reward-router[onnx]'``: onnxruntime, and onnx for the
one-time quantisation; the export itself needs torch from the ``train`` extra). Only encoders
with mean pooling (all-MiniLM-L6-v2, BERT-like folders); a causal LM (SmolLM2) is refused.

>>> enc = load_onnx_encoder("minilm", max_length=256)          # doctest: +SKIP
>>> enc.encode_pairs(["What is 2+2?"], ["4"]).shape             # doctest: +SKIP
(1, 384)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from gateway.features import ENCODER_INFO_FILE, BatchedEncoder, _effective_max_length
from reward_router.errors import ConfigError
from reward_router.pooling import mean_pool

log = logging.getLogger(__name__)

#: Bumped when the export changes (inputs, pooling, quantisation): a new file and cache id.
ONNX_FORMAT = 1
#: The token tensors an exported encoder may take, in this order.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Weights load from safetensors only, as everywhere (no pickles).
_WEIGHT_FILES = ("model.safetensors",)


class OnnxEncoder(BatchedEncoder):
    """An int8 ONNX export of a mean-pooling encoder, run by ONNX Runtime on the CPU.

    Build it with :func:`load_onnx_encoder`; it embeds like :class:`~gateway.features.HFEncoder`
    (``encode``, ``encode_pairs``: same tokeniser, truncation and batching).
    """

    return_tensors = "np"

    def __init__(
        self,
        ref: str,
        session: Any,
        tokenizer: Any,
        *,
        dim: int,
        max_length: int,
        cache_id: str,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        self.ref = ref
        self.session = session
        self.tokenizer = tokenizer
        self.dim = dim
        self.max_length = max_length
        self.cache_id = cache_id
        self.batch_size = batch_size
        self.progress = progress
        self.inputs = [i.name for i in session.get_inputs()]

    def _embed_numpy(self, enc: Any) -> np.ndarray:
        feeds = {name: np.asarray(enc[name], dtype=np.int64) for name in self.inputs}
        out = self.session.run(None, feeds)[0]
        return np.asarray(out, dtype=np.float32)


def _model_folder(ref: str) -> Path:
    from reward_router.models import is_causal_lm_folder, minilm_path, resolve_model_ref

    ref = resolve_model_ref(ref)
    if ref == "smollm2" or (ref != "minilm" and is_causal_lm_folder(ref)):
        raise ConfigError(
            "encoder_backend",
            f"onnx-int8 runs mean-pooling encoders (minilm, BERT-like folders); {ref!r} is a "
            "causal LM (last-token pooling): use encoder_backend 'torch'",
        )
    folder = minilm_path() if ref == "minilm" else Path(ref)
    info = folder / ENCODER_INFO_FILE
    if info.exists() and json.loads(info.read_text()).get("pooling") == "last":
        raise ConfigError(
            "encoder_backend", f"{ref!r} pools its last token: use encoder_backend 'torch'"
        )
    return folder


def weights_hash(folder: Path) -> str:
    """sha256 of an encoder folder's weights (safetensors) and config, and of
    :data:`ONNX_FORMAT`."""
    digest = hashlib.sha256(f"onnx-int8:{ONNX_FORMAT}".encode())
    files = [folder / "config.json", *(folder / n for n in _WEIGHT_FILES)]
    found = [f for f in files if f.exists()]
    if len(found) < 2:
        raise ConfigError("encoder_ref", f"{folder} has no config.json and weights to export")
    for f in found:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def export_int8(folder: Path, out: Path, max_length: int) -> Path:
    """Export the encoder in ``folder`` (mean pooling + L2 normalisation in the graph) to ONNX
    and quantise its weights to int8 per channel, written atomically to ``out``."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    model = AutoModel.from_pretrained(
        str(folder), trust_remote_code=False, use_safetensors=True, attn_implementation="eager"
    ).eval()
    sample = tokenizer(
        ["a prompt", "another, longer prompt"],
        ["a response", "x"],
        truncation="longest_first",
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    names = [n for n in _INPUTS if n in sample]

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            batch = dict(zip(names, tensors, strict=True))
            hidden = self.model(**batch).last_hidden_state
            pooled = mean_pool(hidden, batch["attention_mask"])
            return torch.nn.functional.normalize(pooled, dim=-1)

    out.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter (dynamo=False: the dynamo one needs onnxscript) warns that it is
    # deprecated and that traced shape checks become constants (they are constant for an
    # encoder); the quantiser logs a hint about pre-processing. Neither is the user's concern.
    quiet = logging.getLogger()
    level = quiet.level
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            fp32 = Path(tmp) / "fp32.onnx"
            axes = {n: {0: "batch", 1: "tokens"} for n in names}
            torch.onnx.export(
                Pooled().eval(),
                tuple(sample[n] for n in names),
                str(fp32),
                input_names=names,
                output_names=["embedding"],
                dynamic_axes={**axes, "embedding": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
            int8 = Path(tmp) / "int8.onnx"
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            quiet.setLevel(level)
        os.replace(int8, out)
    return out


def load_onnx_encoder(
    ref: str = "minilm",
    *,
    max_length: int = 256,
    batch_size: int = 32,
    threads: int = 1,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> OnnxEncoder:
    """The int8 ONNX encoder of ``ref`` (``"minilm"`` or a local mean-pooling HF folder),
    exported on first use into ``cache_dir`` (default ``<cache>/models/onnx``).

    ``threads``: ONNX Runtime's intra-op threads (the gateway's ``torch_threads``); no spinning
    threads are kept, the CPU is shared.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(
            "encoder_backend",
            "onnx-int8 needs onnxruntime: pip install 'reward-router[onnx]'",
        ) from exc
    from transformers import AutoConfig, AutoTokenizer

    from reward_router.models import models_dir

    if not isinstance(max_length, int) or max_length < 8:
        raise ConfigError("max_length", f"must be an integer >= 8, got {max_length!r}")
    folder = _model_folder(ref)
    name = "minilm" if ref == "minilm" else folder.name
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    digest = weights_hash(folder)
    path = (cache_dir or models_dir() / "onnx") / f"{name}-{digest[:16]}-int8.onnx"
    if not path.exists():
        log.warning("exporting %s to ONNX (int8) at %s: once per encoder", ref, path)
        export_int8(folder, path, max_length)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return OnnxEncoder(
        ref,
        session,
        tokenizer,
        dim=int(config.hidden_size),
        max_length=_effective_max_length(max_length, SimpleNamespace(config=config), tokenizer),
        cache_id=f"onnx-int8#{digest}",
        batch_size=batch_size,
        progress=progress,
    )
