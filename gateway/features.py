"""Pair features: embed prompt||response for both sides, then combine order-invariantly.

An :class:`Encoder` embeds (prompt, response) texts; :func:`pair_features` turns the two
sides' embeddings ``e, e'`` into ``[(e+e')/2 ; |e-e'|]``, which does not change when the two
responses are swapped (the router must not care which one the trainer called "a").
:class:`PairFeaturizer` adds an on-disk cache keyed by a content hash, so a second run over the
same data does not encode again.

>>> enc = load_encoder("minilm")                                  # doctest: +SKIP
>>> feats = PairFeaturizer(enc, Path(".cache/emb")).featurize(
...     ["What is 2+2?"], ["4"], ["5"])                           # doctest: +SKIP
>>> feats.shape                                                   # doctest: +SKIP
(1, 768)

Encoders: ``"minilm"`` (all-MiniLM-L6-v2, mean pooling, L2-normalised like
sentence-transformers; the default, fast on CPU), ``"smollm2"`` (SmolLM2-135M-Instruct, the
paper's encoder, last-token pooling), or any local Hugging Face folder (mean pooling for
encoder-only models, last-token pooling for causal LMs). All outputs are L2-normalised.
Torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from gateway.feature_cache import CACHE_FORMAT, EmbeddingCache
from reward_router.data import PromptLike, prompt_text
from reward_router.errors import ConfigError
from reward_router.files import atomic_write
from reward_router.pooling import mean_pool

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Put at the start of the response side so every model sees where the response begins
#: (BERT-like models also get their [SEP]); the response, not the prompt, keeps it on truncation.
RESPONSE_SEPARATOR = "\n\n### Response:\n"
#: Below this many texts no progress bar is drawn.
PROGRESS_MIN_TEXTS = 256

Pooling = Literal["mean", "last"]
#: Written next to an encoder saved by :meth:`HFEncoder.save` (e.g. a fine-tuned one): its
#: pooling, which the folder's architecture alone may not tell (a bare ``LlamaModel``).
ENCODER_INFO_FILE = "reward_router_encoder.json"


class Encoder(Protocol):
    """Embeds texts as float32 rows; ``ref`` and ``max_length`` say how to load it again.

    ``encode_pairs`` embeds (prompt, response) pairs, truncating the longer side first so that a
    long prompt never pushes the response out of the window.
    """

    ref: str
    dim: int
    max_length: int

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def encode_pairs(self, firsts: list[str], seconds: list[str]) -> np.ndarray: ...


def pair_features(e_a: np.ndarray, e_b: np.ndarray) -> np.ndarray:
    """``[(e_a+e_b)/2 ; |e_a-e_b|]`` along the last axis: swapping a and b changes nothing.

    >>> pair_features(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    array([0.5, 0.5, 1. , 1. ], dtype=float32)
    """
    a = np.asarray(e_a, dtype=np.float32)
    b = np.asarray(e_b, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {a.shape} vs {b.shape}")
    return np.concatenate([(a + b) / 2.0, np.abs(a - b)], axis=-1)


class BatchedEncoder:
    """What every encoder backend shares: tokenising (prompt, response) pairs with the longer
    side truncated first, texts sorted by length into batches of ``batch_size`` (little
    padding), results back in input order. A backend says how one tokenised batch becomes
    L2-normalised float32 rows (:meth:`_embed_numpy`) and which tensors its tokeniser returns.
    """

    ref: str
    dim: int
    max_length: int
    batch_size: int
    progress: bool
    tokenizer: Any
    #: what the tokenizer returns: "pt" (torch) or "np" (ONNX Runtime)
    return_tensors: str = "pt"

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed single texts, truncated to ``max_length`` tokens."""
        return self._run(
            [len(t) for t in texts],
            lambda idx: self.tokenizer([texts[i] for i in idx], **self._tok_kwargs()),
        )

    def encode_pairs(self, firsts: list[str], seconds: list[str]) -> np.ndarray:
        """Embed (first, second) text pairs, truncating the longer of the two first."""
        if len(firsts) != len(seconds):
            raise ValueError(f"{len(firsts)} firsts but {len(seconds)} seconds")
        return self._run(
            [
                len(a) + len(b) + len(RESPONSE_SEPARATOR)
                for a, b in zip(firsts, seconds, strict=True)
            ],
            lambda idx: self._tokenize_pairs([firsts[i] for i in idx], [seconds[i] for i in idx]),
        )

    def _tokenize_pairs(self, firsts: list[str], seconds: list[str]) -> Any:
        return self.tokenizer(
            firsts, [RESPONSE_SEPARATOR + s for s in seconds], **self._tok_kwargs()
        )

    def _tok_kwargs(self) -> dict[str, Any]:
        return {
            "truncation": "longest_first",
            "max_length": self.max_length,
            "padding": True,
            "return_tensors": self.return_tensors,
        }

    def _embed_numpy(self, enc: Any) -> np.ndarray:
        """(B, dim) float32 rows of one tokenised batch."""
        raise NotImplementedError

    def _run(self, lengths: list[int], tokenize: Callable[[list[int]], Any]) -> np.ndarray:
        out = np.zeros((len(lengths), self.dim), dtype=np.float32)
        if not lengths:
            return out
        # Longest first: similar lengths share a batch (less padding), and the slowest batch
        # shows up at the start of the progress bar rather than as a surprise at the end.
        order = np.argsort(-np.asarray(lengths), kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with _progress(self.progress and len(lengths) >= PROGRESS_MIN_TEXTS) as advance:
            for idx in batches:
                out[idx] = self._embed_numpy(tokenize([int(i) for i in idx]))
                advance(len(idx), f"encoding with {Path(self.ref).name}")
        return out


class HFEncoder(BatchedEncoder):
    """A Hugging Face model used as a text encoder (mean or last-token pooling, L2-normalised),
    run by torch.

    Build it with :func:`load_encoder`. Texts are sorted by length before batching so that
    batches carry little padding; results come back in input order.
    """

    def __init__(
        self,
        ref: str,
        model: Any,
        tokenizer: Any,
        *,
        pooling: Pooling,
        max_length: int,
        device: str = "cpu",
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        self.ref = ref
        #: what keys this encoder's embeddings in the cache: ``ref``, plus a fingerprint of
        #: the weights for fine-tuned encoders (whose folder path says nothing about them).
        self.cache_id = ref
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.max_length = max_length
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.dim = int(model.config.hidden_size)

    def embed_pairs(self, firsts: list[str], seconds: list[str]) -> torch.Tensor:
        """Like :meth:`encode_pairs` for one batch, as a tensor that keeps the autograd graph
        (for fine-tuning the encoder; runs under whatever grad mode the caller set)."""
        return self._embed(self._tokenize_pairs(firsts, seconds))

    def _embed(self, enc: Any) -> torch.Tensor:
        import torch

        # Decoder-only models take no segment ids; BERT-like ones get theirs.
        names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
        if self.pooling == "last":
            names = names[:2]
        batch = {k: v.to(self.device) for k, v in enc.items() if k in names}
        hidden = self.model(**batch).last_hidden_state.float()
        pooled = _pool(hidden, batch["attention_mask"], self.pooling)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _embed_numpy(self, enc: Any) -> np.ndarray:
        return self._embed(enc).cpu().numpy()

    def _run(self, lengths: list[int], tokenize: Callable[[list[int]], Any]) -> np.ndarray:
        import torch

        was_training = bool(getattr(self.model, "training", False))
        self.model.eval()
        try:
            with torch.inference_mode():
                return super()._run(lengths, tokenize)
        finally:
            self.model.train(was_training)

    def save(self, folder: str | Path) -> Path:
        """Save weights (safetensors), tokenizer and pooling, loadable by :func:`load_encoder`."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        info = {
            "pooling": self.pooling,
            "max_length": self.max_length,
            "fingerprint": weights_fingerprint(self.model),
        }
        atomic_write(out / ENCODER_INFO_FILE, json.dumps(info, indent=2).encode())
        return out


def weights_fingerprint(model: Any) -> str:
    """sha256 over a torch module's parameters and buffers (names, shapes, bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cache_id(encoder: Encoder) -> str:
    return str(getattr(encoder, "cache_id", encoder.ref))


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    import torch

    if pooling == "mean":
        return mean_pool(hidden, mask)
    # The last real token, wherever padding sits (left or right).
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (pos * mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class _progress:
    """A rich progress bar on stderr, or nothing; yields ``advance(n, description)``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[int, str], None]:
        if not self.enabled:
            return lambda n, desc: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("encoding", total=None)
        return self._advance

    def _advance(self, n: int, desc: str) -> None:
        self._bar.update(self._task, advance=n, description=desc)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _effective_max_length(requested: int, model: Any, tokenizer: Any) -> int:
    """``requested``, capped by what the model's position table and tokenizer allow."""
    caps = [requested]
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        caps.append(positions)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        caps.append(tok_max)
    return min(caps)


def load_encoder(
    ref: str = "minilm",
    *,
    max_length: int = 256,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> HFEncoder:
    """Load an encoder by reference: ``"minilm"``, ``"smollm2"`` or a local HF folder.

    ``max_length`` is capped by the model's position table; the encoder's ``max_length`` says
    what is really used (and keys the cache).

    >>> enc = load_encoder("minilm", max_length=128)              # doctest: +SKIP
    >>> enc.encode(["hello"]).shape                               # doctest: +SKIP
    (1, 384)
    """
    from reward_router.models import (
        is_causal_lm_folder,
        load_causal_lm,
        minilm_path,
        resolve_model_ref,
    )

    if not isinstance(max_length, int) or max_length < 8:
        raise ConfigError("max_length", f"must be an integer >= 8, got {max_length!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be an integer >= 1, got {batch_size!r}")
    ref = resolve_model_ref(ref)
    pooling: Pooling
    saved = Path(ref) / ENCODER_INFO_FILE if ref not in ("minilm", "smollm2") else None
    saved_info: dict[str, Any] = {}
    if saved is not None and saved.exists():
        from transformers import AutoModel, AutoTokenizer

        saved_info = json.loads(saved.read_text())
        pooling = "last" if saved_info.get("pooling") == "last" else "mean"
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModel.from_pretrained(ref, trust_remote_code=False, use_safetensors=True)
        model = model.to(device).eval()
    elif ref == "smollm2" or (ref != "minilm" and is_causal_lm_folder(ref)):
        causal, tokenizer = load_causal_lm(ref, device=device)
        # The decoder body without the LM head: its last hidden state is what we pool.
        model, pooling = causal.base_model, "last"
    else:
        from transformers import AutoModel, AutoTokenizer

        folder = str(minilm_path()) if ref == "minilm" else ref
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModel.from_pretrained(folder, trust_remote_code=False, use_safetensors=True)
        model = model.to(device).eval()
        pooling = "mean"
    enc = HFEncoder(
        ref,
        model,
        tokenizer,
        pooling=pooling,
        max_length=_effective_max_length(max_length, model, tokenizer),
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    if saved is not None and saved.exists() and saved_info.get("fingerprint"):
        enc.cache_id = f"finetuned#{saved_info['fingerprint']}"
    return enc


#: How the encoder runs: torch (any encoder, CPU or GPU) or ONNX Runtime with int8 weights
#: (mean-pooling encoders on the CPU, ~3.4x less CPU per pair; the ``onnx`` extra).
EncoderBackend = Literal["torch", "onnx-int8"]
ENCODER_BACKENDS: tuple[str, ...] = ("torch", "onnx-int8")


def load_backend_encoder(
    ref: str = "minilm",
    *,
    backend: str = "torch",
    max_length: int = 256,
    device: str = "cpu",
    batch_size: int = 32,
    threads: int = 1,
    progress: bool = True,
) -> Encoder:
    """The encoder ``ref`` on ``backend``: :func:`load_encoder` (torch) or
    :func:`gateway.features_onnx.load_onnx_encoder` (``"onnx-int8"``, CPU only).

    >>> enc = load_backend_encoder("minilm", backend="onnx-int8")   # doctest: +SKIP
    """
    if backend == "torch":
        return load_encoder(
            ref, max_length=max_length, device=device, batch_size=batch_size, progress=progress
        )
    if backend != "onnx-int8":
        raise ConfigError("encoder_backend", f"must be one of {ENCODER_BACKENDS}, got {backend!r}")
    if device != "cpu":
        raise ConfigError(
            "encoder_device", f"encoder_backend 'onnx-int8' runs on the CPU, got {device!r}"
        )
    from gateway.features_onnx import load_onnx_encoder

    return load_onnx_encoder(
        ref, max_length=max_length, batch_size=batch_size, threads=threads, progress=progress
    )


class PairFeaturizer:
    """Pair features for (prompt, response_a, response_b) triples, with an embedding cache.

    Each side is embedded as (prompt text, response); identical sides (within a call or
    across runs, when ``cache_dir`` is given) are embedded once.

    >>> fz = PairFeaturizer(load_encoder("minilm"), cache_dir=Path("emb"))  # doctest: +SKIP
    >>> fz.featurize(["hi"], ["hello!"], ["go away"]).shape                 # doctest: +SKIP
    (1, 768)
    """

    def __init__(self, encoder: Encoder, cache_dir: Path | None = None) -> None:
        self.encoder = encoder
        self.cache = (
            EmbeddingCache(cache_dir, _cache_id(encoder), encoder.max_length)
            if cache_dir is not None
            else None
        )

    @property
    def dim(self) -> int:
        """Width of a pair feature row: twice the encoder's embedding size."""
        return 2 * self.encoder.dim

    def key(self, prompt: str, response: str) -> str:
        """Content hash of one side: encoder ref, max_length, prompt text and response."""
        enc = self.encoder
        text = f"{CACHE_FORMAT}\0{_cache_id(enc)}\0{enc.max_length}\0{prompt}\0{response}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def embed_sides(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> np.ndarray:
        """Embeddings (B, dim) of (prompt, response) sides, from the cache where possible."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [prompt_text(p) for p in prompts]
        keys = [self.key(t, r) for t, r in zip(texts, responses, strict=True)]
        found: dict[str, np.ndarray] = self.cache.get(keys) if self.cache is not None else {}
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found and k not in todo:
                todo[k] = i
        if todo:
            idx = list(todo.values())
            new = self.encoder.encode_pairs([texts[i] for i in idx], [responses[i] for i in idx])
            new = np.asarray(new, dtype=np.float32)
            if self.cache is not None:
                self.cache.put(list(todo), new)
            found.update(zip(todo, new, strict=True))
        if not keys:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def featurize(
        self,
        prompts: Sequence[PromptLike],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """Pair features (B, 2*dim) float32: ``pair_features(embed(p, a), embed(p, b))``."""
        n = len(prompts)
        if len(responses_a) != n or len(responses_b) != n:
            raise ValueError(
                f"lengths differ: {n} prompts, {len(responses_a)} responses_a, "
                f"{len(responses_b)} responses_b"
            )
        both = self.embed_sides([*prompts, *prompts], [*responses_a, *responses_b])
        return pair_features(both[:n], both[n:])
