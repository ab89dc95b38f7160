"""OpenRLHF's remote reward model protocol on two real gateway replicas sharing one Redis, in
OpenRLHF 0.11's traffic shape: one sample per call, the samples of a prompt concurrently,
replicas in turn per call, no Authorization header (the key in the path)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.openrlhf import (
    OpenRLHFRequest,
    StickyRoute,
    audit,
    bt_probability,
    samples_of,
)
from tests.gateway.helpers import create_namespace, gateway_config, start_gateway
from tests.procs import Proc

KEY = "openrlhf-trainer-key"
CORRECT = {"reward": "correct", "normalizer": "none"}


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, trainer_rms: dict[str, str], redis_proc: Proc
) -> Iterator[list[str]]:
    """Two gateway processes on one Redis (one key prefix), with a trainer API key."""
    root: Path = tmp_path_factory.mktemp("openrlhf-gw")
    redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
    procs = []
    try:
        for _ in range(2):
            cfg = gateway_config(
                root,
                trainer_rms,
                redis_url=redis_url,
                key_prefix="rrorl",
                api_keys=[KEY],
                policy={"name": "bayesian-no-offline"},
            )
            procs.append(start_gateway(cfg))
        yield [p.url for p in procs]
    finally:
        for p in procs:
            p.kill()


def _namespace(url: str, ns: str) -> None:
    create_namespace(url, ns, CORRECT, key=KEY)


async def _openrlhf_calls(
    urls: list[str], ns: str, samples: list[tuple[str, str, str | None]]
) -> list[dict[str, Any]]:
    """One call per sample, all at once, the URLs in turn (as OpenRLHF's executor cycles)."""
    turn = itertools.cycle(urls)

    async def one(client: httpx.AsyncClient, url: str, s: tuple[str, str, str | None]) -> Any:
        prompt, response, label = s
        body = {"query": [prompt + response], "prompts": [prompt], "labels": [label]}
        r = await client.post(f"{url}/k/{KEY}/get_reward", params={"namespace": ns}, json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(one(client, next(turn), s) for s in samples)))


def _posteriors(url: str, ns: str) -> dict[str, Any]:
    r = httpx.get(
        f"{url}/v1/posteriors",
        params={"namespace": ns},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def test_concurrent_samples_on_two_replicas_share_one_anchor_and_rm(replicas: list[str]) -> None:
    ns = "orl-race"
    _namespace(replicas[0], ns)
    prompts = [f"Q{p}: what is {p} * 7?\nA:" for p in range(6)]
    samples = [(p, " x" * (k + 1), None) for p in prompts for k in range(8)]
    outs = asyncio.run(_openrlhf_calls(replicas, ns, samples))
    for p in prompts:
        mine = [o for (q, _, _), o in zip(samples, outs, strict=True) if q == p]
        # one RM judged every sample of the prompt, whichever replica each call reached
        assert len({o["extra_logs"]["rm_index"][0] for o in mine}) == 1
        # one anchor (0.5, not compared); every other sample compared with it: no longer
        # "each sample against itself"
        anchors = [o for o in mine if o["extra_logs"]["sticky"] == [0.0]]
        assert len(anchors) == 1 and anchors[0]["rewards"] == [0.5]
        assert anchors[0]["route_ids"] == [""]
        compared = [o for o in mine if o["extra_logs"]["sticky"] == [1.0]]
        assert len(compared) == 7 and all(o["route_ids"][0] for o in compared)
        rm = ["length", "verifier"][int(mine[0]["extra_logs"]["rm_index"][0])]
        if rm == "length":  # longer than the anchor wins, shorter loses: never all 0.5
            assert len({o["rewards"][0] for o in compared}) > 1
    # every compared sample is a route record of the namespace
    post = _posteriors(replicas[1], ns)
    assert sum(r["routes"] for r in post["rms"]) == 6 * 7


def test_labels_close_the_loop(replicas: list[str]) -> None:
    """OpenRLHF never posts feedback: the gateway audits each comparison against the label."""
    ns = "orl-audit"
    _namespace(replicas[0], ns)
    samples = []
    for p in range(4):
        prompt = f"Q{p}: what is {p} + 40?\nA:"
        right = f" {p} + 40 = {p + 40}.\n#### {p + 40}"
        wrong = [f" I think it is {p + 41 + k}.\n#### {p + 41 + k}" for k in range(3)]
        samples += [(prompt, r, str(p + 40)) for r in [right, *wrong]]
    outs = asyncio.run(_openrlhf_calls(replicas, ns, samples))
    audited = sum(int(o["extra_logs"]["audited"][0]) for o in outs)
    # the anchor is one of the four samples of each prompt: if it is the right one, its three
    # comparisons are gradeable; if wrong, only the comparison with the right sample is
    assert 4 <= audited <= 12
    post = _posteriors(replicas[1], ns)
    assert sum(r["observations"] for r in post["rms"]) == audited
    # the verifier (given the reference) prefers the right answer: its audits say "right"
    # wherever it judged; a length RM is right only by chance


def test_keys_in_the_path_or_the_header(replicas: list[str]) -> None:
    url = replicas[0]
    body = {"query": ["Q: hi\nA: yo"], "prompts": ["Q: hi\nA:"]}
    assert httpx.post(f"{url}/get_reward", json=body, timeout=30).status_code == 401
    r = httpx.post(f"{url}/k/not-the-key/get_reward", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
    ok = httpx.post(
        f"{url}/get_reward", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert ok.status_code == 200
    # the start-up namespace OpenRLHF uses learns from correctness (the audits)
    info = httpx.post(
        f"{url}/v1/namespaces/openrlhf",
        json=CORRECT,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert info.status_code == 200 and not info.json()["created"]  # there, with this config


def test_bad_requests_name_the_field(replicas: list[str]) -> None:
    for body, field in [({"query": []}, "query"), ({"query": ["a"], "prompts": ["a", "b"]},
                                                     "prompts")]:  # fmt: skip
        r = httpx.post(f"{replicas[0]}/k/{KEY}/get_reward", json=body, timeout=30)
        assert r.status_code == 422
        assert field in r.json()["error"]["message"]


def test_templated_prompts_become_messages_and_end_tokens_go() -> None:
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    chatml += "<|im_start|>assistant\n"
    llama3 = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    req = OpenRLHFRequest(
        query=[chatml + "4<|im_end|>", llama3 + "4<|eot_id|>", "plain: 2+2? 4"],
        prompts=[chatml, llama3, "plain: 2+2?"],
        labels=["4", None, "4"],
    )
    a, b, c = samples_of(req)
    assert a.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
    ]
    assert b.prompt == [{"role": "user", "content": "2+2?"}]
    assert a.response == "4" and b.response == "4" and c.response == " 4"
    assert c.prompt == "plain: 2+2?" and a.key == chatml
    assert (a.reference, b.reference) == ("4", None)


def test_pure_parts() -> None:
    assert bt_probability(-1000.0, 0.0) == 0.0 and bt_probability(1000.0, 0.0) == 1.0
    assert StickyRoute.decode(StickyRoute("length", "ä anchor").encode()) == StickyRoute(
        "length", "ä anchor"
    )
    right, wrong = "so #### 42", "so #### 41"
    assert audit(right, wrong, "42", "a") == 1.0 and audit(right, wrong, "42", "b") == 0.0
    assert audit(wrong, right, "42", "b") == 1.0 and audit(right, wrong, "42", "tie") == 0.5
    assert audit(right, right, "42", "a") is None and audit(wrong, wrong, "42", "a") is None
    assert audit(right, wrong, None, "a") is None and audit(right, wrong, "no number", "a") is None


# ---- OpenRLHF's own client code -------------------------------------------------------------

OPENRLHF = "openrlhf==0.11.2"


def _openrlhf_python() -> Path:
    """An interpreter with OpenRLHF (no dependencies but aiohttp: its remote-RM client needs no
    more), made once in the model cache; ``RR_OPENRLHF_PYTHON`` names another."""
    import os
    import subprocess
    import sys

    given = os.environ.get("RR_OPENRLHF_PYTHON")
    if given:
        return Path(given)
    from reward_router.models import cache_root

    venv = cache_root() / "venvs" / OPENRLHF.replace("==", "-")
    py = venv / "bin" / "python"
    if not py.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            for spec in (["--no-deps", OPENRLHF], ["aiohttp"]):
                subprocess.run(
                    [str(py), "-m", "pip", "install", "-q", *spec],
                    check=True,
                    timeout=600,
                    capture_output=True,
                )
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot install {OPENRLHF} from the package index: {exc}")
    return py


@pytest.mark.slow
def test_openrlhf_own_client_over_two_replicas(replicas: list[str], tmp_path: Path) -> None:
    """OpenRLHF 0.11's SingleTurnAgentExecutor itself, the two replicas as its URL list with
    the key in the path, 8 concurrent samples per prompt."""
    import json
    import subprocess

    ns = "orl-own"
    _namespace(replicas[0], ns)
    py = _openrlhf_python()
    urls = [f"{u}/k/{KEY}/get_reward?namespace={ns}" for u in replicas]
    samples = []
    for p in range(3):
        prompt = f"<|im_start|>user\nQ{p}: what is {p} + 40?<|im_end|>\n<|im_start|>assistant\n"
        for k in range(8):
            answer = p + 40 if k % 4 == 0 else p + 41 + k
            text = f"{'so ' * (k + 1)}#### {answer}<|im_end|>"
            samples.append({"query": prompt + text, "prompt": prompt, "label": str(p + 40)})
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(samples))
    driver = Path(__file__).with_name("openrlhf_driver.py")
    res = subprocess.run(
        [str(py), str(driver), json.dumps(urls), str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    outs = json.loads(res.stdout)
    assert len(outs) == len(samples)
    for p in range(3):
        mine = outs[p * 8 : (p + 1) * 8]
        assert all(len(o["rewards"]) == 1 and 0.0 <= o["rewards"][0] <= 1.0 for o in mine)
        assert len({o["extra_logs"]["rm_index"][0] for o in mine}) == 1  # one RM per prompt
        assert sum(o["extra_logs"]["sticky"] == [0.0] for o in mine) == 1  # one anchor
    post = _posteriors(replicas[1], ns)
    audited = sum(int(o["extra_logs"]["audited"][0]) for o in outs)
    assert audited > 0 and sum(r["observations"] for r in post["rms"]) == audited
