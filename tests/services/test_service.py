"""The scoring service as a real process on loopback, on a tiny random BERT reward model."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, free_port, running
from tests.services.conftest import write_config

LONG = " ".join(["what is the answer of the math"] * 30)


def items(n: int, offset: int = 0) -> list[dict[str, object]]:
    """Distinct items whose scores differ (different words, different lengths)."""
    words = ["good", "bad", "yes", "no", "help", "sorry", "safe", "math", "code"]
    return [
        {
            "prompt": f"what is {i + offset}?",
            "response": " ".join(words[(i + offset + k) % len(words)] for k in range(1 + i % 5)),
        }
        for i in range(n)
    ]


def error_of(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, object] = body["error"]
    assert set(err) == {"type", "message", "field", "rm"}
    return err


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_info_health_ready(hf_service: Proc, bert_dir: Path) -> None:
    info = httpx.get(hf_service.url + "/v1/info").json()
    assert info["name"] == "tiny-bert-rm"
    assert info["backend"] == "hf"
    assert info["model"] == str(bert_dir)
    assert info["max_request_items"] == 8 and info["max_length"] == 48
    assert info["ready"] is True and info["pairwise"] is False
    assert httpx.get(hf_service.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(hf_service.url + "/readyz").status_code == 200


def test_score_is_deterministic_and_ordered(hf_service: Proc) -> None:
    batch = items(6)
    r = httpx.post(hf_service.url + "/v1/score", json={"items": batch})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-bert-rm" and len(body["scores"]) == 6
    assert len(set(body["scores"])) > 1  # a constant score would hide an ordering bug
    # Each item alone gets the score it got inside the batch, at its position.
    for item, score in zip(batch, body["scores"], strict=True):
        alone = httpx.post(hf_service.url + "/v1/score", json={"items": [item]}).json()
        assert alone["scores"][0] == pytest.approx(score, abs=1e-5)
    reversed_scores = httpx.post(hf_service.url + "/v1/score", json={"items": batch[::-1]}).json()[
        "scores"
    ]
    assert reversed_scores == pytest.approx(body["scores"][::-1], abs=1e-5)


def test_compare_scores_both_sides(hf_service: Proc) -> None:
    a, b = items(2)
    pairs = [
        {"prompt": a["prompt"], "response_a": a["response"], "response_b": b["response"]},
        {"prompt": a["prompt"], "response_a": b["response"], "response_b": a["response"]},
        {"prompt": a["prompt"], "response_a": a["response"], "response_b": a["response"]},
    ]
    r = httpx.post(hf_service.url + "/v1/compare", json={"pairs": pairs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    sa = httpx.post(
        hf_service.url + "/v1/score",
        json={"items": [a, {"prompt": a["prompt"], "response": b["response"]}]},
    ).json()["scores"]
    assert res[0]["score_a"] == pytest.approx(sa[0], abs=1e-5)
    assert res[0]["score_b"] == pytest.approx(sa[1], abs=1e-5)
    assert res[0]["preferred"] == ("a" if sa[0] > sa[1] else "b")
    assert res[1]["preferred"] == ("b" if sa[0] > sa[1] else "a")
    assert res[2]["preferred"] == "tie"


def test_chat_message_prompts(hf_service: Proc) -> None:
    conv = [
        {"role": "system", "content": "be safe"},
        {"role": "user", "content": "what is math"},
        {"role": "assistant", "content": "code"},
        {"role": "user", "content": "and yes?"},
    ]
    r = httpx.post(
        hf_service.url + "/v1/score", json={"items": [{"prompt": conv, "response": "yes"}]}
    )
    assert r.status_code == 200, r.text
    plain = httpx.post(
        hf_service.url + "/v1/score", json={"items": [{"prompt": "and yes?", "response": "yes"}]}
    ).json()["scores"][0]
    assert r.json()["scores"][0] != pytest.approx(plain)  # the earlier turns were seen


def test_long_prompt_is_truncated_and_reported(hf_service: Proc) -> None:
    batch = [items(1)[0], {"prompt": LONG, "response": "good"}, items(1, 3)[0]]
    r = httpx.post(hf_service.url + "/v1/score", json={"items": batch})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [1]
    cmp = httpx.post(
        hf_service.url + "/v1/compare",
        json={
            "pairs": [
                {"prompt": "hi", "response_a": "x", "response_b": "y"},
                {"prompt": LONG, "response_a": "x", "response_b": "y"},
            ]
        },
    )
    assert cmp.json()["truncated"] == [1]


async def test_concurrent_requests_get_their_own_answers_in_order(hf_service: Proc) -> None:
    requests = [items(1 + i % 4, offset=i) for i in range(24)]
    async with httpx.AsyncClient(base_url=hf_service.url, timeout=60) as client:
        alone = [
            (await client.post("/v1/score", json={"items": req})).json()["scores"]
            for req in requests
        ]
        before = metric((await client.get("/metrics")).text, "reward_router_rm_batch_size_count")
        answers = await asyncio.gather(
            *(client.post("/v1/score", json={"items": req}) for req in requests)
        )
        after = metric((await client.get("/metrics")).text, "reward_router_rm_batch_size_count")
    for want, got in zip(alone, answers, strict=True):
        assert got.status_code == 200
        assert got.json()["scores"] == pytest.approx(want, abs=1e-5)
    # Micro-batching: 24 concurrent requests shared far fewer forward passes.
    passes = after - before
    assert 1 <= passes < len(requests) / 2, passes


def test_metrics_exposition(hf_service: Proc) -> None:
    httpx.post(hf_service.url + "/v1/score", json={"items": items(3)})
    httpx.post(hf_service.url + "/v1/score", json={"items": []})
    httpx.get(hf_service.url + "/healthz")
    text = httpx.get(hf_service.url + "/metrics").text
    ok = metric(text, "reward_router_rm_requests_total", endpoint="/v1/score", status="200")
    bad = metric(text, "reward_router_rm_requests_total", endpoint="/v1/score", status="422")
    assert ok >= 1 and bad >= 1
    assert metric(text, "reward_router_rm_items_total", endpoint="/v1/score") >= 3
    assert metric(text, "reward_router_rm_errors_total", type="invalid_input") >= 1
    assert metric(text, "reward_router_rm_ready") == 1
    assert 'le="600.0"' in text  # latency buckets reach minutes
    assert "reward_router_rm_forward_duration_seconds_bucket" in text
    assert 'endpoint="/healthz"' not in text and 'endpoint="/metrics"' not in text


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/score", {"items": []}, 422, "items"),
        ("/v1/compare", {"pairs": []}, 422, "pairs"),
        ("/v1/score", {"items": items(9)}, 413, "items"),
        ("/v1/score", {"items": [{"prompt": 5, "response": "x"}]}, 422, "items[0].prompt"),
        ("/v1/score", {"items": [{"prompt": "x"}]}, 422, "items[0].response"),
        (
            "/v1/score",
            {"items": [{"prompt": "x", "response": "y"}, {"prompt": "x", "response": 3}]},
            422,
            "items[1].response",
        ),
        ("/v1/score", {"items": [{"prompt": [], "response": "y"}]}, 422, "items[0].prompt"),
        (
            "/v1/score",
            {"items": [{"prompt": [{"role": "robot", "content": "x"}], "response": "y"}]},
            422,
            "items[0].prompt[0].role",
        ),
        (
            "/v1/compare",
            {"pairs": [{"prompt": "x", "response_a": "y"}]},
            422,
            "pairs[0].response_b",
        ),
        ("/v1/score", {"item": []}, 422, "items"),
    ],
)
def test_bad_input_names_the_field(
    hf_service: Proc, path: str, body: dict[str, object], status: int, field: str
) -> None:
    r = httpx.post(hf_service.url + path, json=body)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["field"] == field
    assert err["rm"] == "tiny-bert-rm"
    assert field in str(err["message"])


def test_invalid_json(hf_service: Proc) -> None:
    r = httpx.post(
        hf_service.url + "/v1/score", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert error_of(r)["field"] == "body"


@pytest.fixture(scope="module")
def strict(model_services: dict[str, Proc]) -> Proc:
    return model_services["strict"]


def test_too_long_with_error_policy_is_422(strict: Proc) -> None:
    huge = " ".join(["math"] * 600)
    r = httpx.post(
        strict.url + "/v1/score",
        json={"items": [{"prompt": "hi", "response": "ok"}, {"prompt": huge, "response": "x"}]},
    )
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["type"] == "input_too_long" and err["field"] == "items[1]"
    r = httpx.post(
        strict.url + "/v1/compare",
        json={"pairs": [{"prompt": huge, "response_a": "x", "response_b": "y"}]},
    )
    assert r.status_code == 422 and error_of(r)["field"] == "pairs[0]"


def test_model_error_is_5xx_with_rm_name_and_service_survives(strict: Proc) -> None:
    mid = " ".join(["math"] * 200)  # under max_length, over the model's 128 positions
    r = httpx.post(strict.url + "/v1/score", json={"items": [{"prompt": mid, "response": "x"}]})
    assert r.status_code == 500, r.text
    err = error_of(r)
    assert err["type"] == "model_error" and err["rm"] == "strict-rm"
    assert "strict-rm" in str(err["message"])
    ok = httpx.post(strict.url + "/v1/score", json={"items": [{"prompt": "hi", "response": "x"}]})
    assert ok.status_code == 200
    text = httpx.get(strict.url + "/metrics").text
    assert metric(text, "reward_router_rm_errors_total", type="model_error") >= 1


def test_unloadable_model_is_not_ready(model_services: dict[str, Proc]) -> None:
    proc = model_services["missing"]
    r = httpx.get(proc.url + "/readyz")
    for _ in range(600):  # the load fails once torch and transformers are imported
        if "cannot load" in r.text:
            break
        time.sleep(0.1)
        r = httpx.get(proc.url + "/readyz")
    assert r.status_code == 503
    err = error_of(r)
    assert err["type"] == "not_ready" and "cannot load" in str(err["message"])
    s = httpx.post(proc.url + "/v1/score", json={"items": [{"prompt": "x", "response": "y"}]})
    assert s.status_code == 503 and error_of(s)["rm"] == "missing-rm"
    assert httpx.get(proc.url + "/v1/info").json()["ready"] is False


def test_env_only_config_and_console_script(tmp_path: Path) -> None:
    """A service configured by RR_RM_* variables alone, started by the console script."""
    port = free_port()
    exe = Path(sys.executable).parent / "reward-router"
    env = {"RR_RM_NAME": "env-verifier", "RR_RM_BACKEND": "verifier", "RR_RM_PORT": str(port)}
    args = [str(exe), "rm", "serve", "--log-level", "warning"]
    with running(args, port, env=env, ready_url=f"http://127.0.0.1:{port}/readyz") as proc:
        info = httpx.get(proc.url + "/v1/info").json()
        assert info["name"] == "env-verifier" and info["backend"] == "verifier"
        r = httpx.post(
            proc.url + "/v1/compare",
            json={
                "pairs": [
                    {
                        "prompt": "2+2?",
                        "response_a": "It is 5.",
                        "response_b": "#### 4",
                        "reference": "2 + 2 = 4\n#### 4",
                    },
                    {"prompt": "2+2?", "response_a": "4", "response_b": "5"},
                ]
            },
        ).json()
        assert r["results"][0]["preferred"] == "b"
        assert (r["results"][0]["score_a"], r["results"][0]["score_b"]) == (0.0, 1.0)
        assert r["results"][1]["preferred"] == "tie" and r["abstained"] == [1]


def test_bad_config_fails_fast_naming_the_field(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.yaml", name="x", backend="hf", model="m", max_batch_size=0)
    out = subprocess.run(
        [sys.executable, "-m", "services", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert re.search(r"max_batch_size", out.stderr), out.stderr
