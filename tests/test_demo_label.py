"""The label stage's pieces: the matrix split and the per-quarter summary (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from reward_router.data import BehaviorMatrix, Pair
from reward_router_cli.demo_label import label_summary, split_matrix, stream_labels


def _pairs(n: int, domain: str = "chat") -> list[Pair]:
    return [
        Pair(
            id=f"{domain}-{i}",
            prompt=[],
            chosen="c",
            rejected="r",
            domain=domain,
            group=f"g{i // 3}",
        )
        for i in range(n)
    ]


def test_split_is_disjoint_by_group_seeded_and_sized() -> None:
    pairs = _pairs(600)
    router, stream = split_matrix(pairs, 200, 50, seed=0)
    assert (len(router), len(stream)) == (200, 50)
    assert {p.group for p in router}.isdisjoint({p.group for p in stream})
    assert split_matrix(pairs, 200, 50, seed=0) == (router, stream)
    assert split_matrix(pairs, 200, 50, seed=1)[1] != stream


def test_stream_labels_hides_the_chosen_side_and_posts_correctness() -> None:
    pairs = _pairs(10)
    posted: dict[str, float] = {}

    def route(bodies: list[dict[str, object]]) -> list[dict[str, object]]:
        # An RM that always answers "a": right exactly when the chosen response was put on a.
        return [{"route_id": f"r-{b['id']}", "rm": "x", "preferred": "a"} for b in bodies]

    rows = stream_labels(route, posted.update, pairs, batch=3, seed=0)
    assert [r["pair_id"] for r in rows] == [p.id for p in pairs]
    assert posted == {f"r-{r['pair_id']}": r["correct"] for r in rows}
    assert 0 < sum(r["correct"] for r in rows) < 10  # the coin put chosen on both sides


def test_label_summary_quarters_baselines_and_agreement() -> None:
    chat, math = _pairs(8, "chat"), _pairs(8, "math")
    rms = ["chat-rm", "verifier", "length"]

    # chat-rm right on chat, the verifier right on math, length always wrong.
    def matrix(pairs: list[Pair]) -> BehaviorMatrix:
        correct = np.array([[p.domain == "chat", p.domain == "math", 0.0] for p in pairs], float)
        return BehaviorMatrix(pairs, rms, correct, np.full(correct.shape, np.nan))

    stream = chat[:4] + math[:4] + chat[4:] + math[4:]
    rows = [
        {"pair_id": p.id, "domain": p.domain, "fallback": False,
         "rm": "chat-rm" if p.domain == "chat" else "verifier", "correct": 1.0}
        for p in stream
    ]  # fmt: skip
    rows[0] = {**rows[0], "rm": "length", "correct": 0.0}
    s = label_summary(rows, matrix(chat + math[:2]), matrix(stream))
    assert s["best_single"] == "chat-rm"  # best on the router's part (more chat pairs)
    assert s["best_per_domain"] == {"chat": "chat-rm", "math": "verifier"}
    assert s["overall"]["policy"][0] == pytest.approx(15 / 16)
    assert s["overall"]["best-single (chat-rm)"][0] == pytest.approx(0.5)
    assert s["overall"]["best RM per domain"][0] == pytest.approx(1.0)
    assert s["overall"]["majority (3 calls)"][0] == pytest.approx(0.0)  # 2 of 3 wrong everywhere
    assert s["overall"]["oracle"][0] == pytest.approx(1.0)
    assert [q["pairs"] for q in s["quarters"]] == [4, 4, 4, 4]
    assert s["quarters"][0]["accuracy"]["policy"][0] == pytest.approx(0.75)
    assert s["quarters"][0]["share_by_domain"]["chat"] == {
        "chat-rm": 0.75,
        "verifier": 0.0,
        "length": 0.25,
    }
    assert s["matrix_agreement"] == 1.0
    with pytest.raises(ValueError, match="stream order"):
        label_summary(rows[::-1], matrix(chat), matrix(stream))


def test_label_summary_runs_a_verifier_best_single_as_the_gateway_does() -> None:
    """On a math-heavy router part the verifier is best-single; the gateway asks it only where
    a pair has a reference and otherwise the next RM (here chat-rm)."""
    chat = _pairs(4, "chat")
    math = [Pair(**{**p.__dict__, "meta": {"reference": "4"}}) for p in _pairs(12, "math")]
    rms = ["chat-rm", "verifier", "length"]

    def matrix(pairs: list[Pair]) -> BehaviorMatrix:
        correct = np.array(
            [[float(p.domain == "chat"), 1.0 if p.domain == "math" else 0.5, 0.0] for p in pairs]
        )
        return BehaviorMatrix(pairs, rms, correct, np.full(correct.shape, np.nan))

    stream = chat + math[:4]
    rows = [
        {"pair_id": p.id, "domain": p.domain, "fallback": False, "rm": "verifier", "correct": 1.0}
        for p in stream
    ]
    s = label_summary(rows, matrix(chat + math), matrix(stream), needs_reference=("verifier",))
    assert s["best_single"] == "verifier"
    assert s["overall"]["best-single (verifier)"][0] == pytest.approx(0.75)  # ties on chat
    line = "best-single (verifier with a reference, else chat-rm)"
    assert s["overall"][line][0] == pytest.approx(1.0)
    assert line not in label_summary(rows, matrix(chat + math), matrix(stream))["overall"]
