"""The demo's label stage: held-out pairs streamed through the live gateway, one RM per pair.

The pool's shipped behaviour matrix (``data/rm_outputs/pool-heldout.jsonl.gz``: what the five
RMs of the pool said on ~6,000 pairs none of them trained on) is split by prompt group into a
part the offline router trains on and a *stream*. The stream's pairs go through the gateway's
``/v1/route`` (the gateway picks one RM per pair and asks its real service over HTTP); the
feedback is whether the label was right (1, 0; 0.5 for a tie), posted to a namespace created
with ``normalizer: none`` so that reward reaches the posterior as is. The matrix then gives, on
the very same stream, what best-single (the RM best on the router's part) and a majority vote
of every RM would have scored, and a check that the live RM said what the matrix says it did.

>>> router_part, stream = split_matrix(pairs, 2000, 600, seed=0)      # doctest: +SKIP
>>> rows = stream_labels(client, stream, namespace="demo-label")       # doctest: +SKIP
>>> label_summary(rows, matrix_router, matrix_stream)                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gateway.routing.policies import reference_last
from reward_router.data import BehaviorMatrix, Pair

#: Share of the matrix's prompt groups kept for the stream (never seen by the router).
STREAM_FRACTION = 0.2


def _stream_group(group: str, seed: int) -> bool:
    digest = hashlib.sha256(f"demo-stream:{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < STREAM_FRACTION


def split_matrix(
    pairs: Sequence[Pair], router_pairs: int, stream_pairs: int, *, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """(router part, stream): disjoint by prompt group, each a seeded sample in seeded order.

    >>> ps = [Pair(id=str(i), prompt=[], chosen="a", rejected="b", group=f"g{i // 2}")
    ...       for i in range(400)]
    >>> r, s = split_matrix(ps, 100, 40)
    >>> len(r), len(s), {p.group for p in r}.isdisjoint({p.group for p in s})
    (100, 40, True)
    """
    rng = random.Random(seed)
    stream = [p for p in pairs if _stream_group(p.group, seed)]
    rest = [p for p in pairs if not _stream_group(p.group, seed)]
    rng.shuffle(stream)
    rng.shuffle(rest)
    return rest[:router_pairs], stream[:stream_pairs]


def stream_labels(
    route: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    feedback: Callable[[dict[str, float]], Any],
    stream: Sequence[Pair],
    *,
    batch: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Route ``stream`` in batches, post whether each label was right; one row per pair.

    The chosen response is put on side a or b by a seeded coin, so no RM can be right by
    preferring a side. ``route`` takes the gateway's pair bodies and returns its results;
    ``feedback`` takes ``{route_id: reward}``.
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(stream), batch):
        chunk = stream[start : start + batch]
        flips = [rng.random() < 0.5 for _ in chunk]
        bodies = [
            {
                "id": p.id,
                "prompt": p.prompt,
                "response_a": p.rejected if flip else p.chosen,
                "response_b": p.chosen if flip else p.rejected,
                "reference": p.reference,
            }
            for p, flip in zip(chunk, flips, strict=True)
        ]
        results = route(bodies)
        rewards: dict[str, float] = {}
        for p, flip, res in zip(chunk, flips, results, strict=True):
            chosen_side = "b" if flip else "a"
            pref = res["preferred"]
            correct = 0.5 if pref == "tie" else float(pref == chosen_side)
            rewards[res["route_id"]] = correct
            rows.append(
                {
                    "pair_id": p.id,
                    "domain": p.domain,
                    "rm": res["rm"],
                    "fallback": bool(res.get("fallback")),
                    "correct": correct,
                }
            )
        feedback(rewards)
        if progress is not None:
            progress(len(chunk))
    return rows


def _quarters(n: int) -> list[range]:
    edges = np.linspace(0, n, 5).round().astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")
    return float(values.mean()), se


def _gateway_single(
    best: str, train_acc: np.ndarray, stream: BehaviorMatrix, needs_reference: Sequence[str]
) -> dict[str, np.ndarray]:
    """``{name: per-pair correctness}`` of best-single as the gateway runs it, when ``best``
    needs a reference: it is asked only where the pair has one (else empty)."""
    rms = stream.rms
    order = np.argsort(-train_acc, kind="stable")  # best first, as the gateway's fallback
    needs = np.array([rm in needs_reference for rm in rms], dtype=bool)
    if best not in needs_reference or needs.all():
        return {}
    has = np.array([p.reference is not None for p in stream.pairs], dtype=bool)
    asked = reference_last(np.tile(order, (len(has), 1)), needs, has)[:, 0]
    other = rms[next(int(j) for j in order if not needs[j])]
    return {
        f"best-single ({best} with a reference, else {other})": stream.correct[
            np.arange(len(asked)), asked
        ]
    }


def label_summary(
    rows: Sequence[dict[str, Any]],
    router_part: BehaviorMatrix,
    stream: BehaviorMatrix,
    needs_reference: Sequence[str] = (),
) -> dict[str, Any]:
    """Label accuracy per quarter of the stream: the live policy beside best-single, majority
    (every RM asked) and oracle on the same pairs, from the matrix; routing share per domain per
    quarter; and how often the live RM's answer matched its matrix row.

    ``router_part`` picks best-single (the RM with the best accuracy there) and the best RM per
    domain, as a user would without routing; ``stream`` must hold the rows' pairs in order.
    When best-single is one of ``needs_reference`` (a verifier), a second line is what the
    gateway's best-single policy gives: that RM where the pair has a reference, else the next
    RM by accuracy on the router's part.
    """
    ids = [p.id for p in stream.pairs]
    if ids != [r["pair_id"] for r in rows]:
        raise ValueError("the stream matrix must hold the routed pairs in stream order")
    rms = stream.rms
    col = {rm: j for j, rm in enumerate(rms)}
    train_acc = router_part.correct.mean(axis=0)
    best = rms[int(np.argmax(train_acc))]
    domains = sorted({p.domain for p in stream.pairs})
    best_in = {}
    for d in domains:
        mask = np.array([p.domain == d for p in router_part.pairs])
        best_in[d] = (
            rms[int(np.argmax(router_part.correct[mask].mean(axis=0)))] if mask.any() else best
        )
    live = np.array([r["correct"] for r in rows], dtype=float)
    single = stream.correct[:, col[best]]
    per_domain = np.array(
        [stream.correct[i, col[best_in[p.domain]]] for i, p in enumerate(stream.pairs)]
    )
    votes = np.sign(2.0 * stream.correct - 1.0).sum(axis=1)
    majority = np.where(votes > 0, 1.0, np.where(votes < 0, 0.0, 0.5))
    oracle = stream.correct.max(axis=1)  # the best any RM did on the pair (a tie: 0.5)
    agree = np.array(
        [
            stream.correct[i, col[r["rm"]]] == r["correct"]
            for i, r in enumerate(rows)
            if r["rm"] in col
        ]
    )
    series = {
        "policy": live,
        f"best-single ({best})": single,
        **_gateway_single(best, train_acc, stream, needs_reference),
        "best RM per domain": per_domain,
        f"majority ({len(rms)} calls)": majority,
        "oracle": oracle,
    }
    quarters = []
    for q, rg in enumerate(_quarters(len(rows))):
        idx = np.array(list(rg), dtype=int)
        share: dict[str, dict[str, float]] = {}
        for d in domains:
            in_d = [rows[i]["rm"] for i in idx if rows[i]["domain"] == d]
            share[d] = {rm: in_d.count(rm) / len(in_d) for rm in rms} if in_d else {}
        quarters.append(
            {
                "quarter": q + 1,
                "pairs": len(idx),
                "accuracy": {k: _mean_se(v[idx]) for k, v in series.items()},
                "share_by_domain": share,
            }
        )
    counts = {d: {rm: 0 for rm in rms} for d in domains}
    for r in rows:
        if r["rm"] in col:
            counts[r["domain"]][r["rm"]] += 1
    return {
        "pairs": len(rows),
        "rms": rms,
        "best_single": best,
        "best_per_domain": best_in,
        "overall": {k: _mean_se(v) for k, v in series.items()},
        "quarters": quarters,
        "counts_by_domain": counts,
        "fallbacks": sum(1 for r in rows if r["fallback"]),
        "matrix_agreement": float(agree.mean()) if agree.size else float("nan"),
        "domains": {d: sum(1 for p in stream.pairs if p.domain == d) for d in domains},
    }
