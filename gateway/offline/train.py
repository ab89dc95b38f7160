"""Training the offline router (torch, imported inside :func:`train_router`): the loss, the
held-out and calibration splits, checkpoint selection and the fitted prior.

The model it trains, and what the gateway serves, is :class:`gateway.offline.model.OfflineRouter`.

>>> router, report = train_router(feats, correct, rms, RouterConfig())   # doctest: +SKIP
>>> report.beats_best_single                                             # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.offline.model import OfflineRouter, RouterConfig, check_float
from gateway.routing.prior import fit_prior
from reward_router.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Floor on a feature's standard deviation, so constant features do not blow up.
_STD_FLOOR = 1e-6


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
    check_float("valid_fraction", valid_fraction, 0.0, 0.9)
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
    domains: Sequence[str] | None = None,
) -> tuple[OfflineRouter, TrainReport]:
    """Train an offline router on pair features and per-RM correctness.

    ``domains`` (one per pair, e.g. ``Pair.domain``): with ``config.domain_head`` and two or
    more of them among the training rows, a domain head is fitted on the training rows
    (:func:`fit_domain_head`) and the prior learns each RM's accuracy per domain.

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
    if domains is not None and len(domains) != len(x):
        raise ConfigError("domains", f"need one domain per pair ({len(x)}), got {len(domains)}")
    tr, va = holdout_split(len(x), groups, valid_fraction, cfg.seed)
    tr, cal = calibration_split(tr, groups, cfg.seed) if len(va) else (tr, va[:0])
    start = time.perf_counter()
    in_mean, in_std = _standardiser(x[tr])
    xs = torch.from_numpy((x - in_mean) / in_std)
    with _torch_threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        head = domain_head(cfg, xs, domains, tr, va)
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
        fit,
        cfg,
        rms,
        x,
        c,
        tr,
        va,
        in_mean,
        in_std,
        encoder_ref,
        max_length,
        start,
        calib=cal,
        domain_head=head,
    )


#: Inverse L2 strengths the domain head chooses from (as scikit-learn's C: the loss is the mean
#: cross-entropy plus ``||W||² / (2 C n)``), by log-loss on the held-out rows.
DOMAIN_HEAD_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)
#: The strength without held-out rows to choose on.
DOMAIN_HEAD_C = 1e-2


def domain_head(
    cfg: RouterConfig, x_std: Any, domains: Sequence[str] | None, tr: np.ndarray, va: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """The router's domain head (:func:`fit_domain_head` on the training rows ``tr``, its
    strength chosen on ``va``; standardised features ``x_std`` of every row), or None when
    ``cfg.domain_head`` is off or no ``domains`` are given."""
    import torch

    if not cfg.domain_head or domains is None:
        return None
    x = torch.as_tensor(x_std, dtype=torch.float32)
    return fit_domain_head(
        x[torch.from_numpy(tr)],
        [str(domains[i]) for i in tr],
        (x[torch.from_numpy(va)], [str(domains[i]) for i in va]),
    )


def fit_domain_head(
    x_std: Any,
    labels: Sequence[str],
    valid: tuple[Any, Sequence[str]] | None = None,
    steps: int = 200,
) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """A multinomial logistic regression of the domain on standardised features (torch, full
    batch L-BFGS): ``(domains, W (K, F), c (K,))``, or None with fewer than two domains.

    Its L2 strength is the one of :data:`DOMAIN_HEAD_GRID` with the lowest log-loss on the
    ``valid`` rows (standardised features, domains), else :data:`DOMAIN_HEAD_C`; a domain the
    training rows lack counts as the least likely one there.

    >>> import torch
    >>> x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    >>> names, w, b = fit_domain_head(x, ["a", "a", "b", "b"])
    >>> names, bool(w[1, 0] > w[0, 0])
    (['a', 'b'], True)
    """
    import torch
    import torch.nn.functional as F

    names = sorted(set(labels))
    if len(names) < 2:
        return None
    index = {name: k for k, name in enumerate(names)}
    y = torch.tensor([index[name] for name in labels])
    x = torch.as_tensor(x_std, dtype=torch.float32)

    def fit(c: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.zeros((len(names), x.shape[1]), requires_grad=True)
        b = torch.zeros(len(names), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
        l2 = 1.0 / (2.0 * c * len(labels))

        def closure() -> Any:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    known = [i for i, name in enumerate(valid[1]) if name in index] if valid else []
    if not known:
        w, b = fit(DOMAIN_HEAD_C)
        return names, w.numpy(), b.numpy()
    assert valid is not None
    xv = torch.as_tensor(valid[0], dtype=torch.float32)[known]
    yv = torch.tensor([index[valid[1][i]] for i in known])
    fits = [fit(c) for c in DOMAIN_HEAD_GRID]
    w, b = min(fits, key=lambda wb: float(F.cross_entropy(xv @ wb[0].T + wb[1], yv)))
    return names, w.numpy(), b.numpy()


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
    domain_head: tuple[list[str], np.ndarray, np.ndarray] | None = None,
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
        domains=domain_head[0] if domain_head else (),
        domain_weights=domain_head[1] if domain_head else None,
        domain_bias=domain_head[2] if domain_head else None,
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
            train_domains=router.domain_probs(x[acc_rows]) if router.domains else None,
            calib_domains=router.domain_probs(x[cal]) if router.domains else None,
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
