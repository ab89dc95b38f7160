"""In-process tests of the service's parts: settings, micro-batcher, backends on tiny models."""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reward_router.answers import answers_match, final_answer
from reward_router.batching import MicroBatcher
from reward_router.errors import ConfigError
from services.backends import Backend, PairInput, ScoreInput, make_backend
from services.backends.text import fit_lengths
from services.settings import load_settings
from tests.services.conftest import write_config

USER = [{"role": "user", "content": "what is the answer?"}]


# --- settings -----------------------------------------------------------------------------


def test_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "a.yaml", name="x", backend="length", port=9001, max_batch_size=4)
    assert load_settings(cfg).max_batch_size == 4
    monkeypatch.setenv("RR_RM_MAX_BATCH_SIZE", "7")
    s = load_settings(cfg)
    assert (s.max_batch_size, s.port, s.host) == (7, 9001, "127.0.0.1")
    assert load_settings(cfg, port=9002).port == 9002


def test_relative_model_path_is_relative_to_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    cfg = write_config(tmp_path / "conf" / "a.yaml", name="x", backend="hf", model="../models/rm")
    assert load_settings(cfg).model == str((tmp_path / "models" / "rm").resolve())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"backend": "length"}, "name"),
        ({"name": "x", "backend": "magic"}, "backend"),
        ({"name": "x", "backend": "hf"}, "model"),
        ({"name": "x", "backend": "vllm"}, "vllm_url"),
        ({"name": "x", "backend": "length", "max_batch_size": 0}, "max_batch_size"),
        ({"name": "x y", "backend": "length"}, "name"),
        ({"name": "x", "backend": "length", "colour": "red"}, "colour"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, fields: dict[str, object], field: str) -> None:
    cfg = write_config(tmp_path / "bad.yaml", **fields)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.field == field


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


# --- micro-batcher --------------------------------------------------------------------------


class Recorder:
    """A 'model' that doubles numbers, records its batch sizes, and can be held mid-pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, xs: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(timeout=10)
        if any(x < 0 for x in xs):
            raise ValueError("negative input")
        self.batches.append(list(xs))
        return [2 * x for x in xs]


async def _held_first_then_burst(enabled: bool, max_batch: int) -> tuple[Recorder, list[list[int]]]:
    rec = Recorder()
    with ThreadPoolExecutor(1) as pool:
        b: MicroBatcher[int, int] = MicroBatcher(
            rec, max_batch=max_batch, max_wait_s=0.0, executor=pool, enabled=enabled
        )
        await b.start()
        rec.gate.clear()
        first = asyncio.create_task(b.submit([1]))
        await asyncio.to_thread(rec.entered.wait, 10)  # pass 1 is running and held
        burst = [asyncio.create_task(b.submit([10 * i, 10 * i + 1])) for i in range(1, 4)]
        await asyncio.sleep(0)  # let the burst reach the queue
        rec.gate.set()
        results = await asyncio.gather(first, *burst)
        await b.stop()
    return rec, results


async def test_requests_queued_during_a_pass_share_the_next_one() -> None:
    rec, results = await _held_first_then_burst(enabled=True, max_batch=64)
    assert results == [[2], [20, 22], [40, 42], [60, 62]]
    assert rec.batches == [[1], [10, 11, 20, 21, 30, 31]]


async def test_batches_never_exceed_max_batch() -> None:
    rec, results = await _held_first_then_burst(enabled=True, max_batch=4)
    assert results == [[2], [20, 22], [40, 42], [60, 62]]
    assert [len(b) for b in rec.batches] == [1, 4, 2]


async def test_disabled_batching_runs_each_request_alone() -> None:
    rec, results = await _held_first_then_burst(enabled=False, max_batch=64)
    assert results == [[2], [20, 22], [40, 42], [60, 62]]
    assert rec.batches == [[1], [10, 11], [20, 21], [30, 31]]


async def test_a_failed_pass_fails_its_requests_only() -> None:
    rec = Recorder()
    with ThreadPoolExecutor(1) as pool:
        b: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=8, max_wait_s=0.0, executor=pool)
        await b.start()
        with pytest.raises(ValueError, match="negative"):
            await b.submit([3, -1])
        assert await b.submit([4]) == [8]
        await b.stop()


async def test_abandoned_requests_cost_no_forward_pass() -> None:
    rec = Recorder()
    with ThreadPoolExecutor(1) as pool:
        b: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=8, max_wait_s=0.0, executor=pool)
        await b.start()
        rec.gate.clear()
        first = asyncio.create_task(b.submit([1]))
        await asyncio.to_thread(rec.entered.wait, 10)
        gone = asyncio.create_task(b.submit([99]))
        await asyncio.sleep(0)
        gone.cancel()
        rec.gate.set()
        assert await first == [2]
        assert await b.submit([5]) == [10]
        await b.stop()
    assert all(99 not in batch for batch in rec.batches)


# --- rule backends --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She makes 9 * 2 = $18.\n#### 18", "18"),
        ("so x = \\boxed{\\frac{3}{4}} in the end", "\\frac{3}{4}"),
        ("nested \\boxed{2^{10}} here", "2^{10}"),
        ("First 12 then 7 then 1,250.", "1,250"),
        ("no numbers at all", None),
    ],
)
def test_final_answer(text: str, answer: str | None) -> None:
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("1,000", "1000.0", True),
        ("$18", "18", True),
        ("\\frac{3}{4}", "0.75", True),
        ("3/4", "0.75", True),
        ("18", "19", False),
        ("\\text{(B)}", "(B)", True),
        ("(A)", "(B)", False),
    ],
)
def test_answers_match(a: str, b: str, same: bool) -> None:
    assert answers_match(a, b) is same


def test_verifier_scores_and_abstains() -> None:
    rm = make_backend(load_settings(None, name="v", backend="verifier", abstain_score=0.5))
    out = rm.score_batch(
        [
            ScoreInput(USER, "so it is 42", "... #### 42"),
            ScoreInput(USER, "so it is 41", "... #### 42"),
            ScoreInput(USER, "I cannot tell", "#### 42"),
            ScoreInput(USER, "so it is 42", None),
        ]
    )
    assert [o.score for o in out] == [1.0, 0.0, 0.0, 0.5]
    assert [o.abstained for o in out] == [False, False, False, True]


def test_length_rm_prefers_longer() -> None:
    rm = make_backend(load_settings(None, name="len", backend="length"))
    short, long = rm.score_batch([ScoreInput(USER, "no"), ScoreInput(USER, "no " * 50)])
    assert long.score > short.score


def test_fit_lengths_cuts_longest_first() -> None:
    assert fit_lengths([10, 500, 40], 100) == [10, 50, 40]
    assert fit_lengths([300, 300], 100) == [50, 50]
    assert sum(fit_lengths([7, 900, 3000, 15], 512)) <= 512


# --- model backends on tiny real models ------------------------------------------------------


@pytest.fixture(scope="module")
def llama_rm_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """The tiny Llama turned into a 1-label sequence classifier: a decoder RM with a chat
    template, the shape of Skywork-Reward or InternLM2-reward."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama-rm")
    model = LlamaForSequenceClassification.from_pretrained(llama_dir, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(out)
    return out


def test_decoder_rm_uses_chat_template_and_ignores_padding(llama_rm_dir: Path) -> None:
    from services.backends.hf import encode_batch

    s = load_settings(None, name="llama-rm", backend="hf", model=str(llama_rm_dir), max_length=96)
    rm = make_backend(s)
    rm.load()
    enc, _ = encode_batch(rm.tokenizer, [USER], ["the answer is 42"], 96)  # type: ignore[attr-defined]
    text = rm.tokenizer.decode(enc["input_ids"][0])  # type: ignore[attr-defined]
    assert "<|im_start|>assistant\nthe answer is 42<|im_end|>" in text
    short = ScoreInput(USER, "yes")
    long = ScoreInput(USER, "the answer is 42 because " * 6)
    alone = rm.score_batch([short])[0].score
    padded = rm.score_batch([short, long])[0].score  # short is right-padded here
    assert padded == pytest.approx(alone, abs=1e-4)
    cut = rm.score_batch([ScoreInput(USER, "math " * 200)])[0]
    assert cut.truncated and math.isfinite(cut.score)


@pytest.fixture(scope="module")
def judge(llama_dir: Path) -> Backend:
    rm = make_backend(
        load_settings(None, name="judge", backend="judge", model=str(llama_dir), max_length=256)
    )
    rm.load()
    return rm


def test_judge_is_position_symmetric(judge: Backend) -> None:
    a, b = "the answer is 42", "no, sorry"
    ab, ba = judge.compare_batch([PairInput(USER, a, b), PairInput(USER, b, a)])
    assert 0.0 < ab.score_a < 1.0
    assert ab.score_a + ab.score_b == pytest.approx(1.0)
    # Asked in both orders, swapping the responses swaps the scores exactly.
    assert ab.score_a == pytest.approx(ba.score_b, abs=1e-5)
    assert not ab.truncated


def test_judge_truncates_long_parts_and_scores_pointwise(judge: Backend) -> None:
    long = PairInput([{"role": "user", "content": "math " * 300}], "yes", "no")
    (res,) = judge.compare_batch([long])
    assert res.truncated and 0.0 < res.score_a < 1.0
    scores = judge.score_batch([ScoreInput(USER, "yes"), ScoreInput(USER, "no")])
    assert all(math.isfinite(s.score) for s in scores)
