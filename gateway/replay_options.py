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
    float, typer.Option(help="Probability of flipping the online reward (noisy −DPO).")
]
EncoderOpt = Annotated[
    str, typer.Option(help="Pair encoder: minilm, smollm2 or a local HF folder.")
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
        help="Calibrate the BT prior onto the reward scale and fit its strength (default);"
        " --no-calibrate injects E_bt raw, as in the paper.",
    ),
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write results JSON here.")]
