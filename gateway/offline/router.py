"""The offline router: pair features -> context h -> per-RM Bradley-Terry scores.

Model (BayesianRouter's offline phase, with a per-RM intercept)::

    x  = (features - mean) / std                       standardised pair features (2e dims)
    h  = normalize(MLP(x))                             d dims, unit length
    s_n = h . E_bt[n] + b_n                            Bradley-Terry score of RM n
    p_n = sigmoid(h . W_cls[n] + c_n)                  classification head: P(RM n right)

Loss ``L_bt + lambda_cls * L_cls``: for every pair and every (RM right, RM wrong) combination,
``-log sigmoid(s_right - s_wrong)`` (ties, 0.5, are neither right nor wrong), plus per-RM
binary cross-entropy on correctness (ties as 0.5 targets). The per-RM bias ``b_n`` makes
"this RM is better in general" learnable; it starts at the RM's training log-odds, so the
untrained router (epoch 0) already routes everything to the training-best RM, and checkpoint
selection by held-out routing accuracy can only keep a router that does at least as well
there.

For the online phase, ``hidden()`` returns ``[h ; 1]`` (D = d+1) and ``prior_means`` is
``[E_bt[n] ; b_n]`` (N, D), so ``hidden() @ prior_means.T`` equals ``scores()``.

Inference is plain numpy (the gateway needs no torch); training uses torch, imported inside
:func:`train_router`. The artifact is ``model.safetensors`` + ``config.json`` (no pickle); the
classification head is a training aid and is not kept.

>>> router, report = train_router(feats, correct, rms, RouterConfig())   # doctest: +SKIP
>>> router.save("artifacts/router")                                      # doctest: +SKIP
>>> OfflineRouter.load("artifacts/router").hidden(feats[:2]).shape       # doctest: +SKIP
(2, 65)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.routing.prior import PriorFit, fit_prior
from reward_router.errors import ConfigError, DataFormatError

if TYPE_CHECKING:
    import torch

    from gateway.features import HFEncoder, PairFeaturizer

ARTIFACT_FORMAT = "reward-router/offline-router"
ARTIFACT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: An ``encoder_ref`` starting with this is a folder inside the artifact (a fine-tuned encoder).
LOCAL_PREFIX = "./"
#: Floor on a feature's standard deviation, so constant features do not blow up.
_STD_FLOOR = 1e-6


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(name, f"must be an integer >= {lo}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or not math.isfinite(value) or value < lo or value > hi or (hi_open and value == hi):
        rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ConfigError(name, f"must be a number in {rng}, got {value!r}")


@dataclass(frozen=True)
class RouterConfig:
    """Offline router hyper-parameters; a bad value raises ConfigError naming the field.

    >>> RouterConfig(dim=32).dim
    32
    >>> RouterConfig(dropout=1.5)
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: dropout: must be a number in [0.0, 1.0), got 1.5
    """

    #: MLP hidden layer widths (``()`` = one linear map to h).
    hidden_sizes: tuple[int, ...] = (256,)
    #: d, the size of h (the online context has d+1 dims with the intercept).
    dim: int = 64
    #: weight of the classification loss next to the Bradley-Terry loss.
    lambda_cls: float = 1.0
    dropout: float = 0.2
    input_dropout: float = 0.1
    #: AdamW decoupled weight decay on weight matrices and E_bt (not on biases).
    weight_decay: float = 0.01
    lr: float = 1e-3
    epochs: int = 300
    #: stop after this many epochs without a better held-out checkpoint (0 = never stop early).
    patience: int = 60
    batch_size: int = 64
    seed: int = 0
    #: torch threads while training; a small MLP runs fastest on one.
    num_threads: int = 1
    #: a checkpoint replaces the untrained router (= the training-best RM) only if its held-out
    #: routing accuracy is higher by this many paired standard errors (0 = any gain).
    select_margin: float = 1.0

    def __post_init__(self) -> None:
        hs = self.hidden_sizes
        if isinstance(hs, list):
            object.__setattr__(self, "hidden_sizes", tuple(hs))
            hs = self.hidden_sizes
        if not isinstance(hs, tuple) or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hs
        ):
            raise ConfigError("hidden_sizes", f"must be a list of integers >= 1, got {hs!r}")
        _check_int("dim", self.dim, 1)
        _check_float("lambda_cls", self.lambda_cls, 0.0, 1e6)
        _check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _check_float("input_dropout", self.input_dropout, 0.0, 1.0, hi_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, 1e3)
        _check_float("lr", self.lr, 1e-8, 10.0)
        _check_int("epochs", self.epochs, 1)
        _check_int("patience", self.patience, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("num_threads", self.num_threads, 1)
        _check_float("select_margin", self.select_margin, 0.0, 10.0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RouterConfig:
        """Build from a mapping (e.g. config.json); unknown keys raise ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(str(key), f"unknown router setting (known: {sorted(known)})")
        kwargs = dict(values)
        if isinstance(kwargs.get("hidden_sizes"), list):
            kwargs["hidden_sizes"] = tuple(kwargs["hidden_sizes"])
        return cls(**kwargs)


@dataclass
class EpochLog:
    """One epoch of training; epoch 0 is the untrained router (routes to the training-best)."""

    epoch: int
    train_loss: float
    train_bt_loss: float
    train_cls_loss: float
    valid_loss: float
    valid_routing_acc: float


@dataclass
class TrainReport:
    """What training measured. Held-out figures are NaN when there is no held-out split.

    ``valid_routing_acc`` is measured on the rows used to pick the checkpoint, so it is an
    optimistic estimate; compare it with ``valid_best_single_acc`` (the best RM on those same
    rows, itself chosen by looking at them) and ``valid_train_best_acc`` (the RM that was best
    on the training rows, which is what "always use one RM" would have picked).
    """

    rms: list[str]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    n_train: int
    n_valid: int
    train_routing_acc: float
    valid_routing_acc: float
    valid_best_single_acc: float
    valid_best_single_rm: str
    valid_train_best_acc: float
    train_best_rm: str
    valid_oracle_acc: float
    seconds: float
    history: list[EpochLog] = field(default_factory=list)
    #: rows kept aside (from the training part) to calibrate the prior
    n_calib: int = 0

    @property
    def beats_best_single(self) -> bool:
        """Whether the router beat the best single RM on the held-out rows."""
        return self.valid_routing_acc > self.valid_best_single_acc

    def summary(self) -> dict[str, Any]:
        """Everything but the per-epoch history (JSON-friendly, NaN as None)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def routing_accuracy(scores: np.ndarray, correct: np.ndarray) -> float:
    """Mean correctness of the argmax-score RM per pair (first RM wins ties of scores).

    >>> routing_accuracy(np.array([[0.1, 0.9], [2.0, 1.0]]), np.array([[0, 1], [0, 1.0]]))
    0.5
    """
    if len(scores) == 0:
        return math.nan
    pick = np.argmax(scores, axis=1)
    return float(np.mean(correct[np.arange(len(pick)), pick]))


class OfflineRouter:
    """A trained offline router (numpy inference): context ``h`` and per-RM prior means.

    >>> router = OfflineRouter.load("artifacts/router")             # doctest: +SKIP
    >>> feats = router.load_featurizer().featurize(["hi"], ["hello"], ["go away"])  # doctest: +SKIP
    >>> ctx = router.hidden(feats)                                    # doctest: +SKIP
    >>> best = np.argmax(ctx @ router.prior_means.T, axis=1)          # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        rms: Sequence[str],
        encoder_ref: str,
        max_length: int,
        config: RouterConfig,
        in_mean: np.ndarray,
        in_std: np.ndarray,
        layers: Sequence[tuple[np.ndarray, np.ndarray]],
        bt_embeddings: np.ndarray,
        bt_bias: np.ndarray,
        info: Mapping[str, Any] | None = None,
        prior_fit: PriorFit | None = None,
    ) -> None:
        self.rms = list(rms)
        self.encoder_ref = encoder_ref
        self.max_length = int(max_length)
        self.config = config
        self.in_mean = np.asarray(in_mean, dtype=np.float32)
        self.in_std = np.asarray(in_std, dtype=np.float32)
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
        self.bt_embeddings = np.asarray(bt_embeddings, dtype=np.float32)
        self.bt_bias = np.asarray(bt_bias, dtype=np.float32)
        #: training summary and provenance, kept in config.json.
        self.info = dict(info or {})
        #: calibration of the BT prior onto the reward scale and its fitted strength
        #: (``gateway.routing.prior``), measured on the held-out rows; None = inject E_bt raw.
        self.prior_fit = prior_fit
        #: a fine-tuned encoder held in memory (``encoder_ref`` is then ``./encoder``, a folder
        #: inside the artifact that :meth:`save` writes).
        self.encoder: HFEncoder | None = None
        #: the folder this router was loaded from (resolves a relative ``encoder_ref``).
        self.directory: Path | None = None
        self.input_dim = int(self.in_mean.shape[0])
        d = config.dim
        if self.bt_embeddings.shape != (len(self.rms), d) or self.bt_bias.shape != (len(self.rms),):
            raise ValueError(
                f"E_bt {self.bt_embeddings.shape} / bias {self.bt_bias.shape} do not match "
                f"{len(self.rms)} rms and dim {d}"
            )

    @property
    def dim(self) -> int:
        """D = d + 1: the size of the online context (h with the intercept column)."""
        return self.config.dim + 1

    @property
    def n_rms(self) -> int:
        return len(self.rms)

    def _h(self, pair_feats: np.ndarray) -> np.ndarray:
        x = np.asarray(pair_feats, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"pair features must have shape (B, {self.input_dim}) for encoder "
                f"{self.encoder_ref!r}, got {x.shape}"
            )
        x = (x - self.in_mean) / self.in_std
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norm, 1e-12)).astype(np.float64)

    def hidden(self, pair_feats: np.ndarray) -> np.ndarray:
        """The online context ``[h ; 1]`` (B, d+1), float64."""
        h = self._h(pair_feats)
        return np.concatenate([h, np.ones((h.shape[0], 1))], axis=1)

    @property
    def bt_means(self) -> np.ndarray:
        """``[E_bt[n] ; b_n]`` per RM (N, d+1), float64: the Bradley-Terry head as trained."""
        return np.concatenate(
            [self.bt_embeddings.astype(np.float64), self.bt_bias.astype(np.float64)[:, None]],
            axis=1,
        )

    @property
    def prior_means(self) -> np.ndarray:
        """The online posteriors' prior means (N, d+1), float64, on the correctness scale.

        ``bt_means`` mapped by ``prior_fit`` (per-RM overall accuracy plus a calibrated,
        monotone share of the BT head's pair-level scores, :mod:`gateway.routing.prior`);
        ``bt_means`` itself when the router has no prior fit (no held-out rows at training).
        """
        if self.prior_fit is None:
            return self.bt_means
        return self.prior_fit.apply(self.bt_means)

    @property
    def prior_precision(self) -> np.ndarray | None:
        """The diagonal prior precision per RM (N, d+1) from ``prior_fit``, or None."""
        return None if self.prior_fit is None else self.prior_fit.precision(self.dim)

    def scores(self, pair_feats: np.ndarray) -> np.ndarray:
        """Offline Bradley-Terry scores (B, N): ``hidden() @ bt_means.T``."""
        return self.hidden(pair_feats) @ self.bt_means.T

    def route(self, pair_feats: np.ndarray) -> np.ndarray:
        """The offline choice per pair: index of the highest-scoring RM (B,)."""
        return np.argmax(self.scores(pair_feats), axis=1)

    def load_featurizer(
        self, cache_dir: Path | None = None, *, device: str = "cpu", batch_size: int = 32
    ) -> PairFeaturizer:
        """The featurizer this router was trained with (same encoder and max_length)."""
        from gateway.features import PairFeaturizer, load_encoder

        if self.encoder is not None:
            return PairFeaturizer(self.encoder, cache_dir)
        enc = load_encoder(
            self.resolved_encoder_ref(),
            max_length=self.max_length,
            device=device,
            batch_size=batch_size,
        )
        if 2 * enc.dim != self.input_dim:
            raise ConfigError(
                "encoder_ref",
                f"{self.encoder_ref!r} gives {2 * enc.dim} features, router expects "
                f"{self.input_dim}",
            )
        return PairFeaturizer(enc, cache_dir)

    def resolved_encoder_ref(self) -> str:
        """``encoder_ref`` with a ``./`` (inside-the-artifact) folder made absolute."""
        if self.encoder_ref.startswith(LOCAL_PREFIX):
            if self.directory is None:
                raise ConfigError("encoder_ref", f"{self.encoder_ref!r} needs a saved router")
            return str((self.directory / self.encoder_ref).resolve())
        return self.encoder_ref

    # ----------------------------------------------------------------------------- storage

    def tensors(self) -> dict[str, np.ndarray]:
        """The weights by name, as stored in ``model.safetensors``."""
        out = {"input.mean": self.in_mean, "input.std": self.in_std}
        for i, (w, b) in enumerate(self.layers):
            out[f"mlp.{i}.weight"], out[f"mlp.{i}.bias"] = w, b
        out["bt.embeddings"], out["bt.bias"] = self.bt_embeddings, self.bt_bias
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def config_json(self) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "rms": self.rms,
            "encoder_ref": self.encoder_ref,
            "max_length": self.max_length,
            "input_dim": self.input_dim,
            "dim": self.dim,
            "router": self.config.to_dict(),
            "prior": self.prior_fit.to_dict() if self.prior_fit is not None else None,
            "info": self.info,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (no pickle).

        Each file is written to a temporary name and renamed, config last, so a reader never
        sees a half-written artifact.
        """
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.encoder_ref.startswith(LOCAL_PREFIX):
            target = out / self.encoder_ref
            if self.encoder is not None:
                self.encoder.save(target)
            elif self.directory is not None and self.directory.resolve() != out.resolve():
                shutil.copytree(self.directory / self.encoder_ref, target, dirs_exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=out)
        os.close(fd)
        try:
            save_file(self.tensors(), tmp, metadata={"format": ARTIFACT_FORMAT})
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
            os.replace(tmp, out / WEIGHTS_FILE)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=out)
            with os.fdopen(fd, "w") as fh:
                json.dump(self.config_json(), fh, indent=2, allow_nan=False)
                fh.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, out / CONFIG_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> OfflineRouter:
        """Load an artifact written by :meth:`save`; a bad one raises DataFormatError."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(directory)
        cfg = read_artifact_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.exists():
            raise DataFormatError(str(weights), None, None, "file not found")
        try:
            t = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            msg = f"not a safetensors file: {exc}"
            raise DataFormatError(str(weights), None, None, msg) from exc
        try:
            router_cfg = RouterConfig.from_dict(cfg["router"])
            n_layers = len(router_cfg.hidden_sizes) + 1
            router = cls(
                rms=[str(r) for r in cfg["rms"]],
                encoder_ref=str(cfg["encoder_ref"]),
                max_length=int(cfg["max_length"]),
                config=router_cfg,
                in_mean=t["input.mean"],
                in_std=t["input.std"],
                layers=[(t[f"mlp.{i}.weight"], t[f"mlp.{i}.bias"]) for i in range(n_layers)],
                bt_embeddings=t["bt.embeddings"],
                bt_bias=t["bt.bias"],
                info=cfg.get("info") or {},
                prior_fit=(
                    PriorFit.from_dict(cfg["prior"], len(cfg["rms"])) if cfg.get("prior") else None
                ),
            )
        except KeyError as exc:
            raise DataFormatError(str(folder), None, str(exc.args[0]), "missing") from exc
        except (ConfigError, ValueError, TypeError) as exc:
            raise DataFormatError(str(folder / CONFIG_FILE), None, None, str(exc)) from exc
        router.directory = folder
        return router


def read_artifact_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a router artifact, checked to be one."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise DataFormatError(str(path), None, None, "file not found (not a router artifact?)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataFormatError(str(path), None, None, f"invalid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != ARTIFACT_FORMAT:
        raise DataFormatError(str(path), None, "format", f"must be {ARTIFACT_FORMAT!r}")
    if cfg.get("version") != ARTIFACT_VERSION:
        raise DataFormatError(
            str(path), None, "version", f"unsupported {cfg.get('version')!r}, need 1"
        )
    return cfg


# --------------------------------------------------------------------------------- training


def holdout_split(
    n: int, groups: Sequence[str] | None, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out row indices (sorted); whole groups go to one side.

    Groups are drawn in a seeded random order until about ``valid_fraction`` of the rows are
    held out; at least one row always stays for training.

    >>> tr, va = holdout_split(6, ["a", "a", "b", "b", "c", "c"], 0.3, seed=0)
    >>> len(va), sorted(set(tr) | set(va)) == list(range(6))
    (2, True)
    """
    rng = np.random.default_rng(seed)
    if valid_fraction == 0.0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    target = max(1, round(valid_fraction * n))
    if groups is None:
        perm = rng.permutation(n)
        return np.sort(perm[target:]), np.sort(perm[:target])
    uniq = list(dict.fromkeys(groups))
    if len(uniq) < 2:
        raise ConfigError("groups", "need at least 2 distinct groups for a held-out split")
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    valid: list[int] = []
    for gi in rng.permutation(len(uniq)):
        if len(valid) >= target:
            break
        members = rows[uniq[gi]]
        if n - len(valid) - len(members) < 1:
            continue
        valid.extend(members)
    vmask = np.zeros(n, dtype=bool)
    vmask[valid] = True
    return np.flatnonzero(~vmask), np.flatnonzero(vmask)


#: Share of the training part kept aside to calibrate the prior (``gateway.routing.prior``).
CALIB_FRACTION = 0.125
#: Fewest calibration rows worth fitting a slope on; with less data the prior takes no
#: pair-level structure from the BT head (slopes 0: each RM at its overall accuracy).
MIN_CALIB_ROWS = 24


def calibration_split(
    train: np.ndarray, groups: Sequence[str] | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Carve calibration rows (about :data:`CALIB_FRACTION`, whole groups) out of the training
    rows: rows the weights are not trained on and that do not choose the checkpoint either. A
    calibration fitted on the rows that chose the checkpoint would trust the router for its
    luck there.

    >>> tr, cal = calibration_split(np.arange(400), [f"g{i // 2}" for i in range(400)], seed=0)
    >>> len(tr), len(cal), set(tr) & set(cal)
    (350, 50, set())
    >>> len(calibration_split(np.arange(100), None, seed=0)[1])  # too few rows to calibrate
    0
    """
    train = np.asarray(train, dtype=np.int64)
    sub_groups = None if groups is None else [groups[i] for i in train]
    too_few = len(train) * CALIB_FRACTION < MIN_CALIB_ROWS
    if too_few or (sub_groups is not None and len(set(sub_groups)) < 8):
        return train, np.zeros(0, dtype=np.int64)
    keep, cal = holdout_split(len(train), sub_groups, CALIB_FRACTION, seed + 1)
    return train[keep], train[cal]


def _validate_inputs(
    features: np.ndarray,
    correct: np.ndarray,
    rms: Sequence[str],
    groups: Sequence[str] | None,
    valid_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    c = np.asarray(correct, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ConfigError("features", f"must be a non-empty (P, 2e) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("features", "contain NaN or infinite values")
    if c.ndim != 2 or c.shape[0] != x.shape[0]:
        raise ConfigError("correct", f"must have shape ({x.shape[0]}, N), got {c.shape}")
    if len(rms) != c.shape[1] or len(rms) == 0:
        raise ConfigError(
            "rms", f"need one name per column of correct ({c.shape[1]}), got {len(rms)}"
        )
    if len(set(rms)) != len(rms):
        raise ConfigError("rms", "names must be unique")
    if not np.all(np.isin(c, (0.0, 0.5, 1.0))):
        raise ConfigError("correct", "values must be 0, 0.5 or 1")
    if groups is not None and len(groups) != x.shape[0]:
        raise ConfigError("groups", f"need one group per pair ({x.shape[0]}), got {len(groups)}")
    _check_float("valid_fraction", valid_fraction, 0.0, 0.9)
    if valid_fraction > 0 and x.shape[0] < 2:
        raise ConfigError("features", "need at least 2 pairs for a held-out split")
    return x, c


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_net(input_dim: int, n_rms: int, cfg: RouterConfig, train_acc: np.ndarray) -> Any:
    import torch
    from torch import nn

    class RouterNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mods: list[nn.Module] = [nn.Dropout(cfg.input_dropout)]
            width = input_dim
            for hsz in cfg.hidden_sizes:
                mods += [nn.Linear(width, hsz), nn.ReLU(), nn.Dropout(cfg.dropout)]
                width = hsz
            mods.append(nn.Linear(width, cfg.dim))
            self.mlp = nn.Sequential(*mods)
            # Start from "route everything to the training-best RM": E_bt zero, biases at each
            # RM's training log-odds; training has to earn any departure from that, and the
            # epoch-0 checkpoint is exactly the training-best single RM.
            acc = np.clip(train_acc, 1e-3, 1 - 1e-3)  # finite log-odds for always-right RMs
            logit = np.log(acc / (1 - acc))
            self.bt_embeddings = nn.Parameter(torch.zeros(n_rms, cfg.dim))
            self.bt_bias = nn.Parameter(torch.tensor(logit, dtype=torch.float32))
            self.cls_weight = nn.Parameter(torch.zeros(n_rms, cfg.dim))
            self.cls_bias = nn.Parameter(torch.tensor(logit, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = nn.functional.normalize(self.mlp(x), dim=-1)
            return h @ self.bt_embeddings.T + self.bt_bias, h @ self.cls_weight.T + self.cls_bias

    return RouterNet()


def _beats(picked: np.ndarray, base: np.ndarray, margin: float) -> bool:
    """Whether per-row correctness ``picked`` beats ``base`` by ``margin`` paired std errors.

    >>> _beats(np.array([1, 1, 1, 0.0]), np.array([0, 1, 1, 0.0]), 0.0)
    True
    >>> _beats(np.array([1, 1, 1, 0.0]), np.array([0, 1, 1, 0.0]), 2.0)
    False
    """
    diff = picked - base
    gain = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return gain > 0 and gain > margin * se


def _losses(
    scores: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lambda_cls: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.nn import functional as F

    right = (target == 1.0).float()
    wrong = (target == 0.0).float()
    # comb[i, n, m] = 1 where RM n was right and RM m wrong on pair i.
    comb = right[:, :, None] * wrong[:, None, :]
    diff = scores[:, :, None] - scores[:, None, :]
    n_comb = comb.sum()
    # Pairs on which all RMs agree (or tie) add nothing here, only to the classification loss.
    bt = (F.softplus(-diff) * comb).sum() / n_comb.clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(logits, target)
    return bt + lambda_cls * cls, bt, cls


def train_router(
    features: np.ndarray,
    correct: np.ndarray,
    rms: Sequence[str],
    config: RouterConfig | None = None,
    *,
    groups: Sequence[str] | None = None,
    valid_fraction: float = 0.2,
    encoder_ref: str = "",
    max_length: int = 256,
    progress: bool = False,
) -> tuple[OfflineRouter, TrainReport]:
    """Train an offline router on pair features and per-RM correctness.

    Keeps the checkpoint with the best held-out routing accuracy (ties: lower held-out loss,
    then the earlier epoch), among those that beat the untrained router (which routes
    everything to the training-best RM) by ``config.select_margin`` paired standard errors;
    if none does, the untrained router is kept and the router stays the best single RM until
    the online phase learns otherwise. The held-out split is by ``groups`` when given (whole
    prompts on one side), else by row; ``valid_fraction=0`` trains on everything and keeps the
    last epoch. Deterministic given ``config.seed``; torch's global RNG state is left as it was.

    >>> router, report = train_router(feats, correct, ["rm-a", "rm-b"], RouterConfig(epochs=50),
    ...                               groups=[p.group for p in pairs])       # doctest: +SKIP
    >>> report.valid_routing_acc, report.valid_best_single_acc               # doctest: +SKIP
    (0.81, 0.74)
    """
    import torch

    cfg = config if config is not None else RouterConfig()
    x, c = _validate_inputs(features, correct, rms, groups, valid_fraction)
    tr, va = holdout_split(len(x), groups, valid_fraction, cfg.seed)
    tr, cal = calibration_split(tr, groups, cfg.seed) if len(va) else (tr, va[:0])
    start = time.perf_counter()
    in_mean, in_std = _standardiser(x[tr])
    xs = torch.from_numpy((x - in_mean) / in_std)
    with _torch_threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        fit = _fit(
            cfg,
            c,
            len(rms),
            tr,
            va,
            x.shape[1],
            lambda rows, _: xs[torch.from_numpy(rows)],
            progress,
        )
    return _finish(
        fit, cfg, rms, x, c, tr, va, in_mean, in_std, encoder_ref, max_length, start, calib=cal
    )


def _standardiser(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0).astype(np.float32)
    return mean, np.maximum(x_train.std(axis=0), _STD_FLOOR).astype(np.float32)


@dataclass
class _Fit:
    net: Any
    best_epoch: int
    stopped_early: bool
    history: list[EpochLog]


def _fit(
    cfg: RouterConfig,
    c: np.ndarray,
    n_rms: int,
    tr: np.ndarray,
    va: np.ndarray,
    input_dim: int,
    batch_x: Any,
    progress: bool,
    *,
    encoder: Any = None,
    encoder_lr: float = 0.0,
    device: str = "cpu",
) -> _Fit:
    """The training loop, over standardised features ``batch_x(rows, train) -> tensor``.

    With ``encoder`` (a torch module producing those features), its weights are trained too,
    at ``encoder_lr``, and are part of every checkpoint. Call inside ``fork_rng``.
    """
    import torch

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_acc = c[tr].mean(axis=0)
    net = _build_net(input_dim, n_rms, cfg, train_acc).to(device)
    # Decay weight matrices and E_bt; biases (b_n above all: "this RM is better in general")
    # are not pulled toward zero.
    named = list(net.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") or n == "bt_embeddings"]
    no_decay = [p for n, p in named if not (n.endswith("weight") or n == "bt_embeddings")]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if encoder is not None:
        groups.append(
            {"params": list(encoder.parameters()), "lr": encoder_lr, "weight_decay": 0.01}
        )
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    cs = torch.from_numpy(c.astype(np.float32)).to(device)
    modules = [net] if encoder is None else [net, encoder]

    def evaluate() -> tuple[float, float, np.ndarray]:
        """Held-out loss, routing accuracy, and the picked RM's correctness per row."""
        if len(va) == 0:
            return math.nan, math.nan, np.zeros(0)
        for m in modules:
            m.eval()
        with torch.no_grad():
            s, lg = net(batch_x(va, False))
            loss = _losses(s, lg, cs[torch.from_numpy(va)], cfg.lambda_cls)[0].item()
        picked = c[va][np.arange(len(va)), np.argmax(s.cpu().numpy(), axis=1)]
        return loss, float(picked.mean()), picked

    def snapshot() -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    v_loss, v_acc, base_picked = evaluate()
    history = [EpochLog(0, math.nan, math.nan, math.nan, v_loss, v_acc)]
    # Two trackers: the kept checkpoint (must beat epoch 0, the training-best RM, by
    # select_margin standard errors) and the raw best, which drives early stopping.
    kept_key = raw_key = (v_acc, -v_loss)
    best_epoch, best_state, since_best = 0, snapshot(), 0
    stopped_early = False
    with _epoch_progress(progress, cfg.epochs) as tick:
        for epoch in range(1, cfg.epochs + 1):
            for m in modules:
                m.train()
            perm = torch.randperm(len(tr), generator=gen).numpy()
            sums = [0.0, 0.0, 0.0]
            for i in range(0, len(tr), cfg.batch_size):
                rows = tr[perm[i : i + cfg.batch_size]]
                s, lg = net(batch_x(rows, True))
                loss, bt, cl = _losses(s, lg, cs[torch.from_numpy(rows)], cfg.lambda_cls)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for j, part in enumerate((loss, bt, cl)):
                    sums[j] += part.item() * len(rows) / len(tr)
            v_loss, v_acc, picked = evaluate()
            history.append(EpochLog(epoch, sums[0], sums[1], sums[2], v_loss, v_acc))
            tick(epoch, v_acc)
            if len(va) == 0:
                best_epoch, best_state = epoch, snapshot()
                continue
            key = (v_acc, -v_loss)
            if key > kept_key and _beats(picked, base_picked, cfg.select_margin):
                kept_key, best_epoch, best_state = key, epoch, snapshot()
            if key > raw_key:
                raw_key, since_best = key, 0
            else:
                since_best += 1
                if cfg.patience and since_best >= cfg.patience:
                    stopped_early = True
                    break
    for m, state in zip(modules, best_state, strict=True):
        m.load_state_dict(state)
        m.eval()
    return _Fit(net, best_epoch, stopped_early, history)


def _finish(
    fit: _Fit,
    cfg: RouterConfig,
    rms: Sequence[str],
    x: np.ndarray,
    c: np.ndarray,
    tr: np.ndarray,
    va: np.ndarray,
    in_mean: np.ndarray,
    in_std: np.ndarray,
    encoder_ref: str,
    max_length: int,
    start: float,
    *,
    calib: np.ndarray | None = None,
) -> tuple[OfflineRouter, TrainReport]:
    """The numpy router from a fitted net, and the report measured with that router on ``x``.

    ``va`` chose the checkpoint; ``calib`` (rows neither trained on nor used to choose) fits
    the prior's calibration; the training rows give each RM's overall accuracy.
    """
    import torch

    net = fit.net.cpu()
    linears = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    router = OfflineRouter(
        rms=rms,
        encoder_ref=encoder_ref,
        max_length=max_length,
        config=cfg,
        in_mean=in_mean,
        in_std=in_std,
        layers=[(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears],
        bt_embeddings=net.bt_embeddings.detach().numpy(),
        bt_bias=net.bt_bias.detach().numpy(),
    )
    train_best = int(np.argmax(c[tr].mean(axis=0)))
    valid_c = c[va]
    nan = math.nan
    best_single = int(np.argmax(valid_c.mean(axis=0))) if len(va) else train_best
    report = TrainReport(
        rms=list(rms),
        best_epoch=fit.best_epoch,
        epochs_run=len(fit.history) - 1,
        stopped_early=fit.stopped_early,
        n_train=len(tr),
        n_valid=len(va),
        train_routing_acc=routing_accuracy(router.scores(x[tr]), c[tr]),
        valid_routing_acc=routing_accuracy(router.scores(x[va]), valid_c) if len(va) else nan,
        valid_best_single_acc=float(valid_c[:, best_single].mean()) if len(va) else nan,
        valid_best_single_rm=rms[best_single],
        valid_train_best_acc=float(valid_c[:, train_best].mean()) if len(va) else nan,
        train_best_rm=rms[train_best],
        valid_oracle_acc=float(valid_c.max(axis=1).mean()) if len(va) else nan,
        seconds=time.perf_counter() - start,
        history=fit.history,
        n_calib=0 if calib is None else len(calib),
    )
    cal = np.zeros(0, dtype=np.int64) if calib is None else np.asarray(calib, dtype=np.int64)
    if len(va) + len(cal) >= 2:
        # Overall accuracies on the training and checkpoint rows; the slopes on the
        # calibration rows only.
        acc_rows = np.concatenate([tr, va])
        router.prior_fit = fit_prior(
            router.scores(x[acc_rows]),
            c[acc_rows],
            router.scores(x[cal]),
            c[cal],
        )
    router.info = {"train": report.summary()}
    return router, report


@contextlib.contextmanager
def _epoch_progress(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress bar over epochs showing held-out routing accuracy, or a no-op."""
    if not enabled:
        yield lambda epoch, acc: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("training", total=total)

        def tick(epoch: int, acc: float) -> None:
            bar.update(task, completed=epoch, description=f"training (held-out acc {acc:.3f})")

        yield tick
