"""The gateway's HTTP API on a real process (embedded store) with real RM service processes:
routing, feedback outcomes, namespaces and policies, auth, every bad-input case, metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import RMS, RMPoolProcs
from tests.gateway.helpers import feedback, gateway_config, pairs, posteriors, route, start_gateway
from tests.procs import Proc

KEY = "trainer-key"
ADMIN = "admin-key"
TTL = 3.0


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, router_dir: Any, rm_pool: RMPoolProcs
) -> Iterator[Proc]:
    cfg = gateway_config(
        tmp_path_factory.mktemp("gw"),
        rm_pool.urls,
        router=router_dir,
        api_keys=[KEY],
        admin_key=ADMIN,
        route_ttl_s=TTL,
        max_body_bytes=64 * 1024,
        max_pairs=50,
        policy={"name": "bayesian", "params": {"lambda0": 1.0, "sigma2": 0.25}},
    )
    proc = start_gateway(cfg)
    try:
        yield proc
    finally:
        proc.kill()


def _post(gw: Proc, path: str, body: Any = None, key: str | None = KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gw.url}{path}", json=body, headers=headers, timeout=60)


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    return err


def test_route_labels_each_pair_by_one_rm(gw: Proc) -> None:
    items = pairs(12)
    assert _post(gw, "/v1/namespaces/basic").status_code == 200
    r = _post(gw, "/v1/route", {"namespace": "basic", "pairs": items})
    assert r.status_code == 200, r.text
    assert float(r.headers["x-reward-router-overhead-ms"]) >= 0
    assert float(r.headers["x-reward-router-encode-ms"]) > 0
    results = r.json()["results"]
    assert [x["id"] for x in results] == [p["id"] for p in items]
    assert len({x["route_id"] for x in results}) == 12
    for x, p in zip(results, items, strict=True):
        assert x["rm"] in RMS and x["fallback"] is False and x["rms"] is None
        if x["rm"].startswith("len"):  # the length RM prefers the longer response
            longer = "a" if len(p["response_a"].split()) > len(p["response_b"].split()) else "b"
            assert x["preferred"] in (longer, "tie")


def test_feedback_applied_duplicate_unknown(gw: Proc) -> None:
    res = route(gw.url, pairs(4, offset=100), ns="fb", key=KEY)["results"]
    ids = [x["route_id"] for x in res]
    out = feedback(gw.url, [(ids[0], -0.7), (ids[1], -0.2), (ids[0], -0.1), ("fb:x:y", 1.0)], KEY)
    assert out == {"applied": 2, "duplicate": 1, "unknown": 1}
    again = feedback(gw.url, [(ids[1], -0.3), (ids[2], -0.4), ("not-a-route-id", 0.0)], KEY)
    assert again == {"applied": 1, "duplicate": 1, "unknown": 1}
    post = posteriors(gw.url, "fb", key=KEY)
    assert post["seq"] == 3
    assert sum(r["observations"] for r in post["rms"]) == 3
    assert sum(r["routes"] for r in post["rms"]) == 4
    by_rm: dict[str, int] = {}
    for x in res[:3]:
        by_rm[x["rm"]] = by_rm.get(x["rm"], 0) + 1
    assert {r["name"]: r["observations"] for r in post["rms"] if r["observations"]} == by_rm


def test_feedback_for_expired_route_is_unknown(gw: Proc) -> None:
    (res,) = route(gw.url, pairs(1, offset=200), ns="ttl", key=KEY)["results"]
    time.sleep(TTL + 0.5)
    assert feedback(gw.url, [(res["route_id"], -0.5)], KEY) == {
        "applied": 0,
        "duplicate": 0,
        "unknown": 1,
    }


def test_namespaces_have_their_own_policies(gw: Proc) -> None:
    r = _post(gw, "/v1/namespaces/abl-random", {"policy": "random"})
    assert r.status_code == 200 and r.json()["created"] is True
    assert _post(gw, "/v1/namespaces/abl-random", {"policy": "random"}).json()["created"] is False
    err = _error(_post(gw, "/v1/namespaces/abl-random", {"policy": "laser"}), 409)
    assert err["field"] == "namespace"
    post = posteriors(gw.url, "abl-random", key=KEY)
    assert post["policy"] == "random" and "params" not in post  # no posterior to show

    r = _post(gw, "/v1/namespaces/ens", {"policy": "majority"})
    assert r.status_code == 200, r.text
    for x in route(gw.url, pairs(3, offset=300), ns="ens", key=KEY)["results"]:
        assert sorted(x["rms"]) == sorted(RMS)  # an ensemble asks every RM
        assert x["rm"] in RMS

    r = _post(gw, "/v1/namespaces/best", {"policy": "best-single", "best_rm": "len-b"})
    assert r.status_code == 200, r.text
    assert {x["rm"] for x in route(gw.url, pairs(5), ns="best", key=KEY)["results"]} == {"len-b"}


def test_reset_and_delete_need_the_admin_key(gw: Proc) -> None:
    res = route(gw.url, pairs(2, offset=400), ns="adm", key=KEY)["results"]
    assert feedback(gw.url, [(res[0]["route_id"], -0.3)], KEY)["applied"] == 1
    assert _error(_post(gw, "/v1/namespaces/adm/reset", key=KEY), 403)["field"] == "authorization"
    assert _error(_post(gw, "/v1/namespaces/adm/reset", key=None), 401)
    r = _post(gw, "/v1/namespaces/adm/reset", key=ADMIN)
    assert r.status_code == 200, r.text
    post = posteriors(gw.url, "adm", key=KEY)
    assert post["seq"] == 0 and all(r["observations"] == 0 for r in post["rms"])
    # a route of the old state is unknown now
    assert feedback(gw.url, [(res[1]["route_id"], -0.3)], KEY)["unknown"] == 1
    headers = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.delete(f"{gw.url}/v1/namespaces/adm", headers=headers).status_code == 200
    r = httpx.get(f"{gw.url}/v1/posteriors", params={"namespace": "adm"}, headers=headers)
    assert _error(r, 404)["field"] == "namespace"


def test_a_route_never_creates_a_namespace(gw: Proc) -> None:
    err = _error(_post(gw, "/v1/route", {"namespace": "made-by-hand", "pairs": pairs(1)}), 404)
    assert err["field"] == "namespace" and "POST /v1/namespaces/made-by-hand" in err["message"]
    assert "made-by-hand" not in _get_names(gw)
    # Created with its own policy, routed in, then gone (deleted here; lost with a store in
    # life): the next route is 404, not the namespace back again with the default policy...
    assert _post(gw, "/v1/namespaces/made-by-hand", {"policy": "random"}).status_code == 200
    route(gw.url, pairs(2), ns="made-by-hand", key=KEY, create=False)
    headers = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.delete(f"{gw.url}/v1/namespaces/made-by-hand", headers=headers).status_code == 200
    _error(_post(gw, "/v1/route", {"namespace": "made-by-hand", "pairs": pairs(1)}), 404)
    assert "made-by-hand" not in _get_names(gw)
    # ...so creating it again with its own policy works (no 409 against a default-policy twin).
    again = _post(gw, "/v1/namespaces/made-by-hand", {"policy": "random"})
    assert again.status_code == 200 and again.json()["created"] is True
    # The namespaces of startup_namespaces exist without a call (OpenRLHF cannot create one).
    assert {"default", "openrlhf"} <= set(_get_names(gw))


def _get_names(gw: Proc) -> list[str]:
    r = httpx.get(f"{gw.url}/v1/namespaces", headers={"authorization": f"Bearer {KEY}"})
    names: list[str] = r.json()["namespaces"]
    return names


@pytest.mark.parametrize("path", ["/v1/namespaces/nope/reset", "/v1/namespaces/nope"])
def test_admin_calls_on_unknown_namespace_are_404(gw: Proc, path: str) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    if path.endswith("reset"):
        r = httpx.post(f"{gw.url}{path}", headers=headers)
    else:
        r = httpx.delete(f"{gw.url}{path}", headers=headers)
    err = _error(r, 404)
    assert err["field"] == "namespace" and "nope" in err["message"]


def test_auth_on_trainer_endpoints(gw: Proc) -> None:
    body = {"pairs": pairs(1)}
    assert "missing" in _error(_post(gw, "/v1/route", body, key=None), 401)["message"]
    assert "invalid" in _error(_post(gw, "/v1/route", body, key="wrong"), 401)["message"]
    assert _post(gw, "/v1/route", body, key=ADMIN).status_code == 200  # admin key works too
    assert httpx.get(f"{gw.url}/healthz").status_code == 200  # probes need no key
    assert httpx.get(f"{gw.url}/readyz").json()["ready"] is True


def test_memory_only_state_is_announced(gw: Proc) -> None:
    # This gateway has neither store_path nor Redis: it works, but says so wherever one looks.
    ready = httpx.get(f"{gw.url}/readyz").json()
    assert ready["ready"] is True and ready["durable"] is False
    assert "memory-only" in ready["warning"] and "store_path" in ready["warning"]
    assert "NOT DURABLE: state is memory-only" in gw.logs()
    text = httpx.get(f"{gw.url}/metrics").text
    assert re.search(r"^reward_router_gateway_store_durable 0\.0$", text, re.M)


def _fb(**item: Any) -> dict[str, Any]:
    return {"feedback": [{"route_id": "a:b:c", "reward": 0.0, **item}]}


def _rt(**pair: Any) -> dict[str, Any]:
    return {"pairs": [{"prompt": "p", "response_a": "a", "response_b": "b", **pair}]}


NAN_BODY = '{"feedback": [{"route_id": "a:b:c", "reward": NaN}]}'
INF_BODY = '{"feedback": [{"route_id": "a:b:c", "reward": 1e999}]}'


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/feedback", NAN_BODY, "feedback.0.reward"),
        ("/v1/feedback", INF_BODY, "feedback.0.reward"),
        ("/v1/feedback", _fb(reward="high"), "feedback.0.reward"),
        ("/v1/feedback", {"feedback": []}, "feedback"),
        ("/v1/feedback", {"feedback": [{"reward": 1.0}]}, "feedback.0.route_id"),
        ("/v1/route", {"pairs": []}, "pairs"),
        ("/v1/route", {"pairs": "x"}, "pairs"),
        ("/v1/route", _rt(prompt=3), "pairs.0.prompt"),
        ("/v1/route", {"pairs": [{"prompt": "p", "response_a": "a"}]}, "pairs.0.response_b"),
        ("/v1/route", _rt(prompt=[]), "pairs.0.prompt"),
        ("/v1/route", _rt(prompt=[{"role": "king", "content": "x"}]), "pairs.0.prompt.0.role"),
        ("/v1/route", _rt(response_a=None), "pairs.0.response_a"),
        ("/v1/route", {"namespace": "bad:name", "pairs": pairs(1)}, "namespace"),
        ("/v1/route", {"pairs": pairs(1), "extra": 1}, "extra"),
        ("/v1/route", {"pairs": pairs(51)}, "pairs"),
        ("/v1/route", "{not json", "body"),
        ("/v1/namespaces/x1", {"policy": "oracle"}, "policy"),
        ("/v1/namespaces/x2", {"policy": "bandit"}, "policy"),
        ("/v1/namespaces/x3", {"policy": "bayesian", "params": {"lambda0": -1}}, "lambda0"),
        ("/v1/namespaces/x4", {"policy": "best-single", "best_rm": "nobody"}, "best_rm"),
        ("/v1/namespaces/x5", {"normalizer_params": {"window": 1}}, "window"),
    ],
)
def test_bad_input_is_422_naming_the_field(gw: Proc, path: str, body: Any, field: str) -> None:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    if isinstance(body, str):
        r = httpx.post(f"{gw.url}{path}", content=body, headers=headers)
    else:
        r = httpx.post(f"{gw.url}{path}", json=body, headers=headers)
    err = _error(r, 422)
    assert err["field"] == field, err


def test_body_too_large_is_413(gw: Proc) -> None:
    big = {"pairs": [{"prompt": "x" * 70_000, "response_a": "a", "response_b": "b"}]}
    assert _error(_post(gw, "/v1/route", big), 413)["field"] == "body"


def test_bad_input_never_cools_an_rm_down(gw: Proc) -> None:
    for _ in range(5):
        r = _post(gw, "/v1/route", {"namespace": "cool", "pairs": [{"prompt": "p"}]})
        assert r.status_code == 422
    route(gw.url, pairs(1), ns="cool", key=KEY)
    post = posteriors(gw.url, "cool", key=KEY, full=False)
    assert all(r["healthy"] and not r["in_cooldown"] for r in post["rms"])


def test_metrics_and_openapi(gw: Proc, rm_pool: RMPoolProcs) -> None:
    res = route(gw.url, pairs(3), ns="metrics", key=KEY)["results"]
    assert feedback(gw.url, [(r["route_id"], -0.5) for r in res], key=KEY)["applied"] == 3
    text = httpx.get(f"{gw.url}/metrics").text
    for name in (
        "reward_router_gateway_routes_total",
        "reward_router_gateway_rm_request_duration_seconds_bucket",
        "reward_router_gateway_feedback_total",
        "reward_router_gateway_reward_raw_bucket",
        "reward_router_gateway_overhead_seconds_bucket",
        "reward_router_gateway_posterior_mean_norm",
        "reward_router_gateway_rm_available",
    ):
        assert name in text, name
    assert 'reward_router_gateway_feedback_total{outcome="duplicate"}' in text
    # The reward histogram names the RM that scored the pair whose feedback was applied.
    found = re.findall(r'reward_raw_count\{namespace="metrics",rm="([^"]+)"\} (\S+)', text)
    counts = {rm: float(n) for rm, n in found}
    assert set(counts) <= set(rm_pool.urls) and sum(counts.values()) == 3
    assert counts == {rm: [r["rm"] for r in res].count(rm) for rm in counts}
    spec = httpx.get(f"{gw.url}/openapi.json").json()
    assert {"/v1/route", "/v1/feedback", "/v1/posteriors"} <= set(spec["paths"])
