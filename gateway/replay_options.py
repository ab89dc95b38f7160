"""The command-line options ``replay`` and ``simulate`` share, as typed aliases.

A command's signature says what it takes (``folds: FoldsOpt = 5``); the help text is written
once here, so the two commands cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PoliciesOpt = Annotated[str, typer.Option(help="'all' or a comma-separated list.")]
FoldsOpt = Annotated[int, typer.Option(help="Cross-fitting folds (split by group).")]
SeedsOpt = Annotated[int, typer.Option(help="Repetitions with new folds and stream order.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Pairs per routing batch.")]
RewardNoiseOpt = Annotated[
    float, typer.Option(help="Probability of flipping the online reward (with 'noisy').")
]
RewardOpt = Annotated[
    str,
    typer.Option(
        help="What online policies learn from: correct (the picked RM's correctness), noisy"
        " (the same, flipped with --reward-noise) or dpo-proxy (modelled quantile −DPO loss).",
    ),
]
StreamOrderOpt = Annotated[
    str,
    typer.Option(
        help="Held-out stream order: shuffled, by-source (blocks of one source: a shift) or"
        " drift (halfway, the training-best RM starts answering like the worst).",
    ),
]
MaxCallsOpt = Annotated[
    float,
    typer.Option(
        help="RM calls per pair allowed on average (1-2): above 1, a pair whose RM tied (or"
        " is below --second-opinion-margin) asks the next RM of the same draw.",
    ),
]
SecondOpinionMarginOpt = Annotated[
    float | None,
    typer.Option(
        help="Ask a second RM below this |margin| (in that RM's RMS units); default: the"
        " RM's own (max-calls-per-pair - 1) quantile of |margin| on the training folds.",
    ),
]
AuditRateOpt = Annotated[
    float,
    typer.Option(
        help="Gold audits: share of bayesian's pairs also labelled by --audit-rm (extra"
        " calls); agreement becomes that pair's reward.",
    ),
]
AuditRmOpt = Annotated[
    str | None, typer.Option(help="The auditing RM (default: the training-best RM).")
]


OfflineShareOpt = Annotated[
    float,
    typer.Option(
        help="Share of each fold's training groups the offline stage sees, (0, 1]: below 1,"
        " scarce offline data against a long stream.",
    ),
]
NeedsReferenceOpt = Annotated[
    str,
    typer.Option(
        help="Comma-separated RMs that judge only pairs with a reference answer (a verifier):"
        " ranked last on pairs without one, as the gateway's needs_reference does.",
    ),
]
EncoderOpt = Annotated[
    str, typer.Option(help="Pair encoder: minilm, smollm2 or a local HF folder.")
]
EncoderBackendOpt = Annotated[
    str,
    typer.Option(
        help="How the encoder runs: torch, or onnx-int8 (ONNX Runtime, int8 weights; mean-pooling"
        " encoders such as minilm; needs the onnx extra).",
    ),
]
MaxLengthOpt = Annotated[int, typer.Option(help="Encoder token limit per side.")]
CacheDirOpt = Annotated[
    Path | None, typer.Option(help="Embedding cache (default: the project cache).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Parameter override, repeatable: POLICY.PARAM=VALUE (e.g. bayesian.lambda0=2)"
        " or router.PARAM=VALUE (e.g. router.epochs=200).",
    ),
]
CalibrateOpt = Annotated[
    bool,
    typer.Option(
        help="Calibrate the BT prior onto the correctness scale with its stated strength"
        " (default); --no-calibrate injects E_bt raw, as in the paper.",
    ),
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write results JSON here.")]
