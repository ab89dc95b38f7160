"""The vllm backend against a stand-in `vllm serve` speaking vLLM's /classify schema (fast).

Only the remote server is faked (tests/services/fake_vllm.py); our service runs for real. The
same backend against a real vLLM server, scores checked against transformers:
tests/services/test_vllm_e2e.py (slow).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, free_port, python_module_args, running
from tests.services.conftest import rm_service, write_config
from tests.services.fake_vllm import MODEL


@pytest.fixture(scope="module")
def fake_vllm(llama_dir: Path) -> Iterator[Proc]:
    port = free_port()
    args = python_module_args(
        "tests.services.fake_vllm", "--port", str(port), "--tokenizer", str(llama_dir)
    )
    with running(args, port, ready_url=f"http://127.0.0.1:{port}/v1/models") as proc:
        yield proc


@pytest.fixture(scope="module")
def vllm_rm(
    tmp_path_factory: pytest.TempPathFactory, fake_vllm: Proc, llama_dir: Path
) -> Iterator[Proc]:
    cfg = write_config(
        tmp_path_factory.mktemp("vllm") / "vllm.yaml",
        name="skywork-vllm",
        backend="vllm",
        vllm_url=fake_vllm.url,
        tokenizer=str(llama_dir),
        max_length=4096,
    )
    with rm_service(cfg) as proc:
        yield proc


def test_raw_rewards_in_order(vllm_rm: Proc, fake_vllm: Proc) -> None:
    responses = ["good good", "bad", "fine", "good bad good good"]
    r = httpx.post(
        vllm_rm.url + "/v1/score",
        json={"items": [{"prompt": "rate me", "response": x} for x in responses]},
    )
    assert r.status_code == 200, r.text
    # use_activation: false -> raw logits (count(good) - count(bad) + 0.5), not sigmoids.
    assert r.json()["scores"] == [2.5, -0.5, 0.5, 2.5]
    assert r.json()["model"] == "skywork-vllm"
    seen = httpx.get(fake_vllm.url + "/seen").json()
    # One request for the batch, as token ids the RM's tokenizer made here.
    assert seen[-1] == {"n": 4, "use_activation": False, "ids": True}
    assert httpx.get(vllm_rm.url + "/v1/info").json()["model"] == MODEL


def test_compare_through_vllm(vllm_rm: Proc) -> None:
    r = httpx.post(
        vllm_rm.url + "/v1/compare",
        json={
            "pairs": [
                {"prompt": "q", "response_a": "bad", "response_b": "good"},
                {
                    "prompt": [{"role": "user", "content": "q"}],
                    "response_a": "good",
                    "response_b": "ok",
                },
            ]
        },
    ).json()
    assert [x["preferred"] for x in r["results"]] == ["b", "a"]
    assert r["results"][0]["score_b"] == 1.5


def test_upstream_failure_is_502_naming_the_rm(vllm_rm: Proc) -> None:
    r = httpx.post(
        vllm_rm.url + "/v1/score", json={"items": [{"prompt": "q", "response": "explode"}]}
    )
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and err["rm"] == "skywork-vllm"
    assert "500" in err["message"]
    ok = httpx.post(vllm_rm.url + "/v1/score", json={"items": [{"prompt": "q", "response": "x"}]})
    assert ok.status_code == 200


def test_max_length_above_max_model_len_is_not_ready(
    tmp_path: Path, fake_vllm: Proc, llama_dir: Path
) -> None:
    # The fake lists max_model_len 4096, as vLLM's /v1/models does.
    cfg = write_config(
        tmp_path / "long.yaml",
        name="long-vllm",
        backend="vllm",
        vllm_url=fake_vllm.url,
        tokenizer=str(llama_dir),
        max_length=8192,
    )
    with rm_service(cfg, wait="/healthz") as proc:
        r = httpx.get(proc.url + "/readyz")
        for _ in range(100):
            if "max_model_len" in r.text:
                break
            time.sleep(0.1)
            r = httpx.get(proc.url + "/readyz")
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "max_length" in message and "max_model_len 4096" in message


def test_a_server_without_classify_is_refused_naming_the_model(
    tmp_path: Path, llama_dir: Path
) -> None:
    # A per-token reward model (InternLM2-reward, Qwen2ForRewardModel) in vLLM: no /classify.
    port = free_port()
    args = python_module_args(
        "tests.services.fake_vllm",
        *("--port", str(port), "--tokenizer", str(llama_dir), "--no-classify"),
    )
    with running(args, port, ready_url=f"http://127.0.0.1:{port}/v1/models") as server:
        cfg = write_config(
            tmp_path / "token.yaml",
            name="token-vllm",
            backend="vllm",
            vllm_url=server.url,
            tokenizer=str(llama_dir),
        )
        with rm_service(cfg, wait="/healthz") as proc:
            r = httpx.get(proc.url + "/readyz")
            for _ in range(100):
                if "classify" in r.text:
                    break
                time.sleep(0.1)
                r = httpx.get(proc.url + "/readyz")
            assert r.status_code == 503
            message = r.json()["error"]["message"]
            assert "vllm_model" in message and "token_classify" in message, message


def test_unreachable_vllm_server_is_not_ready(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "down.yaml",
        name="down-vllm",
        backend="vllm",
        vllm_url=f"http://127.0.0.1:{free_port()}",
    )
    with rm_service(cfg, wait="/healthz") as proc:
        r = httpx.get(proc.url + "/readyz")
        for _ in range(100):
            if "unreachable" in r.text:
                break
            time.sleep(0.1)
            r = httpx.get(proc.url + "/readyz")
        assert r.status_code == 503
        assert "unreachable" in r.json()["error"]["message"]
