"""Offline router training with the encoder fine-tuned too (for users with a GPU).

Same model, losses, split and checkpoint selection as :func:`gateway.offline.train.train_router`;
the difference is that pair features are recomputed from text on every step, so gradients reach
the encoder (at its own, small learning rate). The input standardiser is fitted on the frozen
encoder's features and kept fixed. The fine-tuned encoder is saved inside the router artifact
(``encoder/``: safetensors weights, tokenizer, pooling and a weights fingerprint that keys its
embedding cache), and ``encoder_ref`` is ``./encoder``.

On a CPU this is slow (every epoch re-encodes every pair, with a backward pass); the frozen
default encodes once and trains in seconds.

>>> router, report = finetune_router(prompts, chosen, rejected, correct, rms,
...                                  RouterConfig(epochs=5, batch_size=16),
...                                  encoder_ref="minilm", device="cuda")   # doctest: +SKIP
>>> router.save("artifacts/router-ft")                                     # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gateway.offline.model import LOCAL_PREFIX, OfflineRouter, RouterConfig, check_float
from gateway.offline.train import (
    TrainReport,
    _finish,
    _fit,
    _standardiser,
    _validate_inputs,
    calibration_split,
    domain_head,
    holdout_split,
)
from reward_router.data import PromptLike, prompt_text

if TYPE_CHECKING:
    import torch

#: Where the fine-tuned encoder goes inside the artifact.
ENCODER_SUBDIR = LOCAL_PREFIX + "encoder"


def finetune_router(
    prompts: Sequence[PromptLike],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    correct: np.ndarray,
    rms: Sequence[str],
    config: RouterConfig | None = None,
    *,
    encoder_ref: str = "minilm",
    max_length: int = 256,
    device: str = "cpu",
    encoder_lr: float = 2e-5,
    encode_batch_size: int = 32,
    groups: Sequence[str] | None = None,
    valid_fraction: float = 0.2,
    cache_dir: Path | None = None,
    progress: bool = False,
    domains: Sequence[str] | None = None,
) -> tuple[OfflineRouter, TrainReport]:
    """Train the router and fine-tune its encoder end to end; returns what train_router does
    (``domains``: as there, the domain head fitted on the fine-tuned encoder's features).

    ``cache_dir`` serves the frozen encoder's features (for the standardiser) and receives the
    fine-tuned encoder's final features under its own fingerprint.
    """
    import torch

    from gateway.features import PairFeaturizer, load_encoder, pair_features

    cfg = config if config is not None else RouterConfig()
    check_float("encoder_lr", encoder_lr, 1e-9, 1.0)
    enc = load_encoder(
        encoder_ref,
        max_length=max_length,
        device=device,
        batch_size=encode_batch_size,
        progress=progress,
    )
    x0 = PairFeaturizer(enc, cache_dir).featurize(prompts, responses_a, responses_b)
    x0, c = _validate_inputs(x0, correct, rms, groups, valid_fraction)
    tr, va = holdout_split(len(x0), groups, valid_fraction, cfg.seed)
    tr, cal = calibration_split(tr, groups, cfg.seed) if len(va) else (tr, va[:0])
    start = time.perf_counter()
    in_mean, in_std = _standardiser(x0[tr])
    mean_t = torch.from_numpy(in_mean).to(device)
    std_t = torch.from_numpy(in_std).to(device)
    texts = [prompt_text(p) for p in prompts]

    def batch_x(rows: np.ndarray, train: bool) -> torch.Tensor:
        # Held-out rows are encoded in encoder-sized chunks (no graph is kept for them).
        step = len(rows) if train else encode_batch_size
        parts = []
        for i in range(0, len(rows), step):
            chunk = [int(r) for r in rows[i : i + step]]
            firsts = [texts[r] for r in chunk] * 2
            seconds = [responses_a[r] for r in chunk] + [responses_b[r] for r in chunk]
            emb = enc.embed_pairs(firsts, seconds)
            e_a, e_b = emb[: len(chunk)], emb[len(chunk) :]
            feats = torch.cat([(e_a + e_b) / 2, (e_a - e_b).abs()], dim=1)
            parts.append((feats - mean_t) / std_t)
        return torch.cat(parts)

    with torch.random.fork_rng(devices=[]):
        fit = _fit(
            cfg,
            c,
            len(rms),
            tr,
            va,
            x0.shape[1],
            batch_x,
            progress,
            encoder=enc.model,
            encoder_lr=encoder_lr,
            device=device,
        )
    from gateway.features import weights_fingerprint

    enc.cache_id = f"finetuned#{weights_fingerprint(enc.model)}"
    final = PairFeaturizer(enc, cache_dir)
    e = final.embed_sides([*prompts, *prompts], [*responses_a, *responses_b])
    x1 = pair_features(e[: len(prompts)], e[len(prompts) :])
    head = domain_head(cfg, (np.asarray(x1, dtype=np.float32) - in_mean) / in_std, domains, tr, va)
    router, report = _finish(
        fit,
        cfg,
        rms,
        x1,
        c,
        tr,
        va,
        in_mean,
        in_std,
        ENCODER_SUBDIR,
        enc.max_length,
        start,
        calib=cal,
        domain_head=head,
    )
    router.encoder = enc
    router.info["finetune"] = {"base_encoder": enc.ref, "encoder_lr": encoder_lr}
    return router, report
