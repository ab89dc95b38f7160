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

A *domain head* (when the training pairs name two or more domains, ``RouterConfig.domain_head``)
is a multinomial logistic regression ``q = softmax(W_dom x + c_dom)`` on the same standardised
features, trained on the pairs' ``domain`` labels: which domain a pair is from, as K
probabilities, where the skill of RMs differs most plainly. No label is needed at serving time.

For the online phase, ``hidden()`` returns ``[h ; q ; 1]`` (D = d+K+1; K = 0 without a domain
head) and ``bt_means`` is ``[E_bt[n] ; 0 ; b_n]`` (N, D), so ``hidden() @ bt_means.T`` equals
``scores()``; ``prior_means`` puts each RM's per-domain accuracy on the ``q`` coordinates.

Inference is plain numpy (the gateway needs no torch, and no training code: that is
:mod:`gateway.offline.train`). The artifact is ``model.safetensors`` + ``config.json`` (no
pickle); the classification head is a training aid and is not kept.

>>> router, report = train_router(feats, correct, rms, RouterConfig())   # doctest: +SKIP
>>> router.save("artifacts/router")                                      # doctest: +SKIP
>>> OfflineRouter.load("artifacts/router").hidden(feats[:2]).shape       # doctest: +SKIP
(2, 65)
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.routing.prior import PriorFit
from reward_router.errors import ConfigError, DataFormatError
from reward_router.files import atomic_path, atomic_write

if TYPE_CHECKING:
    from gateway.features import HFEncoder, PairFeaturizer

ARTIFACT_FORMAT = "reward-router/offline-router"
ARTIFACT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: An ``encoder_ref`` starting with this is a folder inside the artifact (a fine-tuned encoder).
LOCAL_PREFIX = "./"


def check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(name, f"must be an integer >= {lo}, got {value!r}")


def check_float(name: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> None:
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
    #: learn a domain head when the training pairs name two or more domains (see module doc).
    domain_head: bool = True

    def __post_init__(self) -> None:
        hs = self.hidden_sizes
        if isinstance(hs, list):
            object.__setattr__(self, "hidden_sizes", tuple(hs))
            hs = self.hidden_sizes
        if not isinstance(hs, tuple) or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hs
        ):
            raise ConfigError("hidden_sizes", f"must be a list of integers >= 1, got {hs!r}")
        check_int("dim", self.dim, 1)
        check_float("lambda_cls", self.lambda_cls, 0.0, 1e6)
        check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_float("input_dropout", self.input_dropout, 0.0, 1.0, hi_open=True)
        check_float("weight_decay", self.weight_decay, 0.0, 1e3)
        check_float("lr", self.lr, 1e-8, 10.0)
        check_int("epochs", self.epochs, 1)
        check_int("patience", self.patience, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_int("num_threads", self.num_threads, 1)
        check_float("select_margin", self.select_margin, 0.0, 10.0)
        if not isinstance(self.domain_head, bool):
            raise ConfigError("domain_head", f"must be true or false, got {self.domain_head!r}")

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
        domains: Sequence[str] = (),
        domain_weights: np.ndarray | None = None,
        domain_bias: np.ndarray | None = None,
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
        #: the domain head's domains (K) and weights (K, input_dim) / bias (K,); K = 0: none
        self.domains = [str(name) for name in domains]
        k = len(self.domains)
        self.domain_weights = np.asarray(
            np.zeros((k, self.input_dim)) if domain_weights is None else domain_weights,
            dtype=np.float32,
        )
        self.domain_bias = np.asarray(
            np.zeros(k) if domain_bias is None else domain_bias, dtype=np.float32
        )
        if (
            k == 1
            or self.domain_weights.shape != (k, self.input_dim)
            or self.domain_bias.shape != (k,)
        ):
            raise ValueError(
                f"domain head {self.domain_weights.shape} / {self.domain_bias.shape} does not "
                f"match {k} domains (0 or >= 2) and input dim {self.input_dim}"
            )
        d = config.dim
        if self.bt_embeddings.shape != (len(self.rms), d) or self.bt_bias.shape != (len(self.rms),):
            raise ValueError(
                f"E_bt {self.bt_embeddings.shape} / bias {self.bt_bias.shape} do not match "
                f"{len(self.rms)} rms and dim {d}"
            )

    @property
    def dim(self) -> int:
        """D = d + K + 1: the size of the online context (h, the K domain probabilities, the
        intercept column)."""
        return self.config.dim + len(self.domains) + 1

    @property
    def n_rms(self) -> int:
        return len(self.rms)

    def _standardised(self, pair_feats: np.ndarray) -> np.ndarray:
        x = np.asarray(pair_feats, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"pair features must have shape (B, {self.input_dim}) for encoder "
                f"{self.encoder_ref!r}, got {x.shape}"
            )
        return np.asarray((x - self.in_mean) / self.in_std)

    def _h(self, xs: np.ndarray) -> np.ndarray:
        """h from standardised features (:meth:`_standardised`)."""
        x = xs
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norm, 1e-12)).astype(np.float64)

    def domain_probs(self, pair_feats: np.ndarray) -> np.ndarray:
        """The domain head's probabilities per pair (B, K), float64; (B, 0) without one."""
        return self._domain_probs(self._standardised(pair_feats))

    def _domain_probs(self, xs: np.ndarray) -> np.ndarray:
        if not self.domains:
            return np.zeros((xs.shape[0], 0))
        z = (xs @ self.domain_weights.T + self.domain_bias).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))

    def hidden(self, pair_feats: np.ndarray) -> np.ndarray:
        """The online context ``[h ; q ; 1]`` (B, D), float64 (``q``: :meth:`domain_probs`)."""
        xs = self._standardised(pair_feats)  # once, for both heads
        h, q = self._h(xs), self._domain_probs(xs)
        return np.concatenate([h, q, np.ones((h.shape[0], 1))], axis=1)

    @property
    def bt_means(self) -> np.ndarray:
        """``[E_bt[n] ; 0 ; b_n]`` per RM (N, D), float64: the Bradley-Terry head as trained
        (it reads h only; the domain coordinates carry no BT weight)."""
        return np.concatenate(
            [
                self.bt_embeddings.astype(np.float64),
                np.zeros((self.n_rms, len(self.domains))),
                self.bt_bias.astype(np.float64)[:, None],
            ],
            axis=1,
        )

    @property
    def prior_means(self) -> np.ndarray:
        """The online posteriors' prior means (N, D), float64, on the correctness scale.

        ``bt_means`` mapped by ``prior_fit`` (per-RM overall accuracy, its accuracy per domain
        on the domain coordinates, plus a calibrated, monotone share of the BT head's
        pair-level scores, :mod:`gateway.routing.prior`); ``bt_means`` itself when the router
        has no prior fit (no held-out rows at training).
        """
        if self.prior_fit is None:
            return self.bt_means
        return self.prior_fit.apply(self.bt_means)

    @property
    def prior_precision(self) -> np.ndarray | None:
        """The diagonal prior precision per RM (N, D) from ``prior_fit``, or None."""
        return None if self.prior_fit is None else self.prior_fit.precision(self.dim)

    def scores(self, pair_feats: np.ndarray) -> np.ndarray:
        """Offline Bradley-Terry scores (B, N): ``hidden() @ bt_means.T``."""
        return self.hidden(pair_feats) @ self.bt_means.T

    def route(self, pair_feats: np.ndarray) -> np.ndarray:
        """The offline choice per pair: index of the highest-scoring RM (B,)."""
        return np.argmax(self.scores(pair_feats), axis=1)

    def load_featurizer(
        self,
        cache_dir: Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        backend: str = "torch",
        threads: int = 1,
    ) -> PairFeaturizer:
        """The featurizer this router was trained with (same encoder and max_length), its
        encoder run by ``backend`` (:func:`gateway.features.load_backend_encoder`)."""
        from gateway.features import PairFeaturizer, load_backend_encoder

        if self.encoder is not None:
            if backend != "torch":
                raise ConfigError(
                    "encoder_backend",
                    f"{backend!r} runs a packaged encoder; this router carries its own "
                    "(in-memory) encoder, which runs on torch only",
                )
            return PairFeaturizer(self.encoder, cache_dir)
        enc = load_backend_encoder(
            self.resolved_encoder_ref(),
            backend=backend,
            max_length=self.max_length,
            device=device,
            batch_size=batch_size,
            threads=threads,
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
        if self.domains:
            out["domain.weight"], out["domain.bias"] = self.domain_weights, self.domain_bias
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
            "domains": self.domains,
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
        with atomic_path(out / WEIGHTS_FILE) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"format": ARTIFACT_FORMAT})
        config = json.dumps(self.config_json(), indent=2, allow_nan=False) + "\n"
        atomic_write(out / CONFIG_FILE, config.encode())
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
                domains=cfg.get("domains") or (),
                domain_weights=t["domain.weight"] if cfg.get("domains") else None,
                domain_bias=t["domain.bias"] if cfg.get("domains") else None,
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
