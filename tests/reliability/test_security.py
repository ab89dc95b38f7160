"""Security (issue 7): keys on every endpoint, Redis with an ACL user, no pickle anywhere,
``trust_remote_code`` off unless configured, loopback by default. One test (or more) per check.

Real parts throughout: a private redis-server with a password and an ACL user, an RM service
process (``length`` backend) with an ``api_key``, a gateway process with trainer keys, an admin
key, the RM's key and the ACL user in its ``REDIS_URL``; tiny real models on disk for the loader
checks, loaded by the project's own loaders.

Open without a key, on purpose (everything else needs one when keys are configured, routes
added later included: the tests enumerate the apps' routes instead of listing them):

* ``/healthz``, ``/readyz``: probes (compose healthchecks, the gateway's RM health checks,
  ``reward-router up``, ``rm collect --start``) carry no credentials; they say up / ready and,
  when not ready, why (the message never holds a secret: checked below).
* ``/metrics``: the compose stack's Prometheus scrapes without credentials
  (deploy/prometheus/prometheus.yml). It holds counters and histograms with bounded labels
  (RM names, the first namespaces), no texts and no secrets (checked below). Bind it to a
  private network, as the compose file does.
* ``/openapi.json``, ``/docs``, ``/docs/oauth2-redirect``, ``/redoc``: the API's published
  shape, no data.
"""

from __future__ import annotations

import ast
import asyncio
import hmac
import json
import math
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.procs import Proc, free_port, start_process, start_redis
from tests.tiny_models import tiny_bert

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("reward_router", "gateway", "services", "trainer_client")

TRAINER_KEY = "trainer-key-7d1e6a0c"
ADMIN_KEY = "admin-key-81d2f4b9"
RM_KEY = "rm-key-5e77c3a1"
REDIS_ADMIN_PW = "redis-admin-pw-4c0b"
GW_USER = "rr-gateway"
GW_PW = "gw-redis-pw-93aa1f"
SECRETS = (TRAINER_KEY, ADMIN_KEY, RM_KEY, REDIS_ADMIN_PW, GW_PW)

OPEN = frozenset({"/healthz", "/readyz", "/metrics"})
DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
#: The admin endpoints of docs/gateway.md (reset and delete a namespace).
GATEWAY_ADMIN = frozenset(
    {("POST", "/v1/namespaces/{namespace}/reset"), ("DELETE", "/v1/namespaces/{namespace}")}
)
PAIR = {"prompt": "what is 2+2?", "response_a": "4", "response_b": "the answer is five"}


# ---- real parts ---------------------------------------------------------------------------


def _start_rm(tmp: Path, name: str, **cfg: Any) -> tuple[Proc, Path]:
    port = free_port()
    path = tmp / f"{name}.yaml"
    # No host: the default (loopback) is what the loopback test checks on this process.
    path.write_text(yaml.safe_dump({"name": name, "port": port, **cfg}))
    args = [sys.executable, "-m", "services", "serve", "--config", str(path)]
    proc = start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=120)
    return proc, path


def _stop(proc: Proc) -> None:
    import signal

    proc.kill(signal.SIGTERM)
    proc.log.unlink(missing_ok=True)


@dataclass
class Stack:
    redis: Proc
    rm: Proc
    rm_config: Path
    gateway: Proc
    gateway_config: Path

    @property
    def redis_admin(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis.port, password=REDIS_ADMIN_PW)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis (password + ACL user), an RM service with a key, a gateway with every key."""
    import redis

    tmp = tmp_path_factory.mktemp("security")
    rds = start_redis(free_port(), tmp, password=REDIS_ADMIN_PW)
    procs = [rds]
    try:
        admin = redis.Redis(host="127.0.0.1", port=rds.port, password=REDIS_ADMIN_PW)
        # The gateway's own user: its key prefix only, no dangerous commands (FLUSHALL, CONFIG,
        # KEYS, DEBUG, ...), no pub/sub channels.
        admin.execute_command(
            "ACL", "SETUSER", GW_USER, "reset", "on", f">{GW_PW}", "~rr:*", "+@all", "-@dangerous"
        )
        admin.close()
        rm, rm_cfg = _start_rm(tmp, "len-keyed", backend="length", api_key=RM_KEY)
        procs.append(rm)
        port = free_port()
        gw_cfg = tmp / "gateway.yaml"
        gw_cfg.write_text(
            yaml.safe_dump(
                {
                    "port": port,
                    "rms": [{"name": "len-keyed", "url": rm.url, "api_key": RM_KEY}],
                    "api_keys": [TRAINER_KEY],
                    "admin_key": ADMIN_KEY,
                    "health_interval_s": 0.5,
                    "seed": 0,
                    "log_level": "info",
                    # No router artifact here (routing itself is not under test): the
                    # posterior policy that needs no offline prior.
                    "policy": {"name": "bayesian-no-offline"},
                }
            )
        )
        env = {"REDIS_URL": f"redis://{GW_USER}:{GW_PW}@127.0.0.1:{rds.port}/0"}
        gw = start_process(
            [sys.executable, "-m", "gateway", "serve", "--config", str(gw_cfg)],
            port,
            env=env,
            ready_url=f"http://127.0.0.1:{port}/readyz",
            timeout=120,
        )
        procs.append(gw)
        yield Stack(rds, rm, rm_cfg, gw, gw_cfg)
    finally:
        for p in reversed(procs):
            _stop(p)


def _auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _call(
    base: str, method: str, path: str, key: str | None, body: Any = None, **kw: Any
) -> httpx.Response:
    headers = {**_auth(key), **kw.pop("headers", {})}
    return httpx.request(method, base + path, json=body, headers=headers, timeout=60, **kw)


def _routes(app: Any) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves, docs included, HEAD/OPTIONS left out."""
    out: list[tuple[str, str]] = []

    def walk(routes: Any, prefix: str) -> None:
        for r in routes:
            if hasattr(r, "original_router"):  # FastAPI >= 0.165 keeps included routers lazy
                walk(r.original_router.routes, prefix + r.include_context.prefix)
                continue
            for m in sorted(set(getattr(r, "methods", None) or ()) - {"HEAD", "OPTIONS"}):
                out.append((m, prefix + r.path))

    walk(app.routes, "")
    return out


def _assert_refused(resp: httpx.Response, status: int, words: tuple[str, ...]) -> None:
    assert resp.status_code == status, (resp.request.url, resp.status_code, resp.text)
    err = resp.json()["error"]
    assert err["type"] == ("unauthorized" if status == 401 else "forbidden"), err
    assert err["field"] == "authorization", err
    assert any(w in err["message"] for w in words), err["message"]
    if status == 401:
        assert resp.headers.get("www-authenticate") == "Bearer"
    for s in SECRETS:
        assert s not in resp.text


# ---- 1. gateway: every non-open endpoint needs a key; admin endpoints the admin key -------------


def _gateway_app(config: Path) -> Any:
    from gateway.app import build_app
    from gateway.settings import load_settings

    return build_app(load_settings(config))  # routes only: the lifespan never runs here


def test_gateway_every_endpoint_refuses_a_missing_or_wrong_key(stack: Stack) -> None:
    routes = _routes(_gateway_app(stack.gateway_config))
    url = stack.gateway.url
    # The running process serves the same API as the app enumerated here.
    served = set(httpx.get(url + "/openapi.json", timeout=30).json()["paths"])
    assert served <= {p for _, p in routes}
    guarded = [(m, p) for m, p in routes if p not in OPEN | DOCS]
    assert {("POST", "/v1/route"), ("POST", "/v1/feedback"), *GATEWAY_ADMIN} <= set(guarded)
    wrong_keys = ["wrong", TRAINER_KEY[:-1], TRAINER_KEY + "x", RM_KEY, TRAINER_KEY.upper()]
    for method, template in guarded:
        path = template.replace("{namespace}", "sec-probe")
        body = {} if method in ("POST", "PUT", "PATCH") else None
        _assert_refused(_call(url, method, path, None, body), 401, ("missing",))
        for bad in wrong_keys:
            _assert_refused(_call(url, method, path, bad, body), 401, ("invalid",))
        # A key under another scheme is no bearer key at all.
        basic = {"authorization": f"Basic {TRAINER_KEY}"}
        _assert_refused(_call(url, method, path, None, body, headers=basic), 401, ("missing",))
    for path in OPEN | DOCS:
        assert httpx.get(url + path, timeout=30).status_code == 200, path


def _gateway_requests(rid: str) -> dict[tuple[str, str], tuple[str, Any, int]]:
    """A valid request per known endpoint: (path, body, expected status with the right key)."""
    return {
        ("POST", "/v1/route"): ("/v1/route", {"namespace": "sec", "pairs": [PAIR]}, 200),
        ("POST", "/v1/feedback"): (
            "/v1/feedback",
            {"feedback": [{"route_id": rid, "reward": -0.4}]},
            200,
        ),
        ("GET", "/v1/posteriors"): ("/v1/posteriors?namespace=sec", None, 200),
        ("GET", "/v1/namespaces"): ("/v1/namespaces", None, 200),
        ("GET", "/v1/info"): ("/v1/info", None, 200),
        ("POST", "/v1/namespaces/{namespace}"): ("/v1/namespaces/sec-made", {}, 200),
        ("POST", "/get_reward"): (
            "/get_reward?namespace=sec-rlhf",
            {"query": ["what is 2+2? 4"], "prompts": ["what is 2+2?"]},
            200,
        ),
        ("POST", "/k/{api_key}/get_reward"): (
            f"/k/{TRAINER_KEY}/get_reward?namespace=sec-rlhf",
            {"query": ["what is 2+2? 4"], "prompts": ["what is 2+2?"]},
            200,
        ),
        ("POST", "/v1/namespaces/{namespace}/reset"): ("/v1/namespaces/sec/reset", None, 200),
        ("DELETE", "/v1/namespaces/{namespace}"): ("/v1/namespaces/sec-made", None, 200),
    }


def test_gateway_right_keys_succeed_and_admin_endpoints_refuse_the_trainer_key(
    stack: Stack,
) -> None:
    url = stack.gateway.url
    for ns in ("sec", "sec-rlhf"):  # a route never creates its namespace
        assert _call(url, "POST", f"/v1/namespaces/{ns}", TRAINER_KEY, {}).status_code == 200
    first = _call(url, "POST", "/v1/route", TRAINER_KEY, {"namespace": "sec", "pairs": [PAIR]})
    assert first.status_code == 200, first.text
    known = _gateway_requests(first.json()["results"][0]["route_id"])
    routes = [r for r in _routes(_gateway_app(stack.gateway_config)) if r[1] not in OPEN | DOCS]
    # Admin calls last (delete removes a namespace another call reads).
    routes.sort(key=lambda r: r in GATEWAY_ADMIN)
    for method, template in routes:
        path, body, status = known.get(
            (method, template),
            (template.replace("{namespace}", "sec"), {} if method != "GET" else None, 0),
        )
        if (method, template) in GATEWAY_ADMIN:
            # A trainer key is a known key without the right: 403, and nothing happens.
            before = _state(url)
            _assert_refused(_call(url, method, path, TRAINER_KEY, body), 403, ("admin",))
            assert _state(url) == before
            resp = _call(url, method, path, ADMIN_KEY, body)
            assert _state(url) != before  # while the admin key's call did act
        else:
            resp = _call(url, method, path, TRAINER_KEY, body)
            # The admin key is accepted on trainer endpoints too (docs/gateway.md).
            also = _call(url, method, path, ADMIN_KEY, body)
            assert also.status_code not in (401, 403), (path, also.text)
        if status:
            assert resp.status_code == status, (method, path, resp.text)
        else:  # a route this test has no sample for: at least the key was accepted
            assert resp.status_code not in (401, 403), (method, path, resp.text)


def _state(url: str) -> tuple[Any, ...]:
    """What the admin calls change: the namespaces and the folded log position of ``sec``."""
    names = _call(url, "GET", "/v1/namespaces", TRAINER_KEY).json()["namespaces"]
    post = _call(url, "GET", "/v1/posteriors?namespace=sec", TRAINER_KEY).json()
    return tuple(sorted(names)), post["seq"]


def test_gateway_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``key_matches`` compares with ``hmac.compare_digest`` against every key, no early exit."""
    from reward_router import http

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert http.key_matches("k1", ["k1", "k2", "k3"]) is True
    assert len(calls) == 3  # the match on the first key did not stop the loop
    calls.clear()
    assert http.key_matches("nope", ["k1", "k2"]) is False and len(calls) == 2
    # No plain == on a key anywhere in the auth code of either app.
    for mod in ("gateway/api.py", "services/api.py", "reward_router/http.py"):
        tree = ast.parse((ROOT / mod).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
            ):
                text = ast.unparse(node)
                assert "secret" not in text and "credentials" not in text, (mod, text)


# ---- 2. RM services: optional api_key, sent by the gateway and by `rm collect` ------------------


def test_rm_service_every_endpoint_refuses_a_missing_or_wrong_key(stack: Stack) -> None:
    from services.app import create_app
    from services.settings import load_settings

    routes = _routes(create_app(load_settings(stack.rm_config)))
    url = stack.rm.url
    guarded = [(m, p) for m, p in routes if p not in OPEN | DOCS]
    assert {("POST", "/v1/score"), ("POST", "/v1/compare"), ("GET", "/v1/info")} <= set(guarded)
    valid = {
        "/v1/score": {"items": [{"prompt": "hi", "response": "hello there"}]},
        "/v1/compare": {"pairs": [PAIR]},
    }
    for method, path in guarded:
        body = valid.get(path, {}) if method != "GET" else None
        resp = _call(url, method, path, None, body)
        _assert_refused(resp, 401, ("missing",))
        assert resp.json()["error"]["rm"] == "len-keyed"
        for bad in ("wrong", RM_KEY[:-1], TRAINER_KEY):
            _assert_refused(_call(url, method, path, bad, body), 401, ("invalid",))
        ok = _call(url, method, path, RM_KEY, body)
        if path in valid or method == "GET":
            assert ok.status_code == 200, (path, ok.text)
        else:
            assert ok.status_code not in (401, 403), (path, ok.text)
    for path in OPEN | DOCS:
        assert httpx.get(url + path, timeout=30).status_code == 200, path
    # Refusals are counted like every other error.
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert 'reward_router_rm_errors_total{rm="len-keyed",type="unauthorized"}' in metrics


def test_rm_settings_key_from_env_and_never_shown(tmp_path: Path) -> None:
    from services.settings import ServiceSettings, load_settings

    cfg = tmp_path / "rm.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "backend": "length", "api_key": RM_KEY}))
    s = load_settings(cfg, port=9000)  # an override goes through the model_dump round trip
    assert s.api_key is not None and s.api_key.get_secret_value() == RM_KEY
    for shown in (repr(s), str(s), json.dumps(s.model_dump(mode="json")), str(s.model_dump())):
        assert RM_KEY not in shown
    assert load_settings(None, name="x", backend="length").api_key is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RR_RM_API_KEY", "from-env")
        got = ServiceSettings(name="x", backend="length").api_key
        assert got is not None and got.get_secret_value() == "from-env"
        mp.setenv("RR_RM_API_KEY", "")  # an unset compose variable: no key, not the empty key
        assert ServiceSettings(name="x", backend="length").api_key is None


def test_gateway_sends_the_rm_key_and_treats_a_refusal_as_an_rm_failure(stack: Stack) -> None:
    from gateway.rm_client import RMClient, RMUnavailable

    # Through the running gateway (configured with the RM's key): answered by that RM.
    _call(stack.gateway.url, "POST", "/v1/namespaces/k", TRAINER_KEY, {}).raise_for_status()
    resp = _call(
        stack.gateway.url, "POST", "/v1/route", TRAINER_KEY, {"namespace": "k", "pairs": [PAIR]}
    )
    assert resp.status_code == 200, resp.text
    res = resp.json()["results"][0]
    assert res["rm"] == "len-keyed" and res["fallback"] is False

    async def ask(key: str | None) -> Any:
        client = RMClient("len-keyed", stack.rm.url, api_key=key, failure_threshold=1)
        try:
            return await client.compare([PAIR]), client
        except RMUnavailable as exc:
            return exc, client
        finally:
            await client.aclose()

    got, _ = asyncio.run(ask(RM_KEY))
    assert got[0].preferred == "b"  # the length RM prefers the longer answer
    for key in (None, "wrong"):
        err, client = asyncio.run(ask(key))
        # The gateway's misconfiguration, not the caller's input: a failure that cools the RM
        # down and falls back (a 4xx of the caller's would be RMRejected, a 422).
        assert isinstance(err, RMUnavailable) and "api_key" in str(err), err
        assert client.in_cooldown()
        assert RM_KEY not in str(err)


def test_gateway_settings_never_show_the_rm_key(stack: Stack) -> None:
    from gateway.settings import load_settings

    s = load_settings(stack.gateway_config)
    assert s.rms[0].api_key is not None
    safe = json.dumps(s.safe_dict())
    assert s.safe_dict()["rms"][0]["api_key"] == "configured"
    for shown in (repr(s), str(s), safe, json.dumps(s.model_dump(mode="json"))):
        for secret in SECRETS:
            assert secret not in shown, secret
    info = _call(stack.gateway.url, "GET", "/v1/info", TRAINER_KEY)
    assert info.status_code == 200 and info.json()["settings"]["rms"][0]["api_key"] == "configured"
    assert info.json()["settings"]["redis_url"].startswith("redis://***@")
    for secret in SECRETS:
        assert secret not in info.text
        assert secret not in httpx.get(stack.gateway.url + "/metrics", timeout=30).text
        assert secret not in stack.gateway.logs()
        assert secret not in stack.rm.logs()


def test_rm_collect_sends_the_pool_key(stack: Stack, tmp_path: Path) -> None:
    from reward_router.data import Pair
    from services.pool import collect, load_pool

    pairs = [
        Pair(id=f"p{i}", prompt=f"q{i}", chosen="a longer answer here", rejected="short")
        for i in range(3)
    ]
    pool_file = tmp_path / "pool.yaml"
    entry = {"config": str(stack.rm_config), "url": stack.rm.url}
    pool_file.write_text(yaml.safe_dump({"rms": [entry]}))
    (member,) = load_pool(pool_file)  # the key comes from the service's own file
    assert member.api_key is not None and RM_KEY not in repr(member)
    assert collect(pairs, [member], tmp_path / "b.jsonl") == 3
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [1.0, 1.0, 1.0]
    # A pool entry's own key wins over the service file's: a wrong one is refused.
    pool_file.write_text(yaml.safe_dump({"rms": [{**entry, "api_key": "wrong"}]}))
    with pytest.raises(RuntimeError, match="401"):
        collect(pairs, load_pool(pool_file), tmp_path / "c.jsonl")


# ---- 3. Redis with a password and an ACL user ----------------------------------------------------


def test_gateway_on_redis_acl_user_keeps_its_state_there(stack: Stack) -> None:
    import redis

    url = stack.gateway.url
    _call(url, "POST", "/v1/namespaces/acl", TRAINER_KEY, {}).raise_for_status()
    resp = _call(url, "POST", "/v1/route", TRAINER_KEY, {"namespace": "acl", "pairs": [PAIR]})
    assert resp.status_code == 200, resp.text
    rid = resp.json()["results"][0]["route_id"]
    fb = _call(
        url, "POST", "/v1/feedback", TRAINER_KEY, {"feedback": [{"route_id": rid, "reward": -0.2}]}
    )
    assert fb.json() == {"applied": 1, "duplicate": 0, "unknown": 0}
    post = _call(url, "GET", "/v1/posteriors?namespace=acl", TRAINER_KEY).json()
    assert post["seq"] == 1
    # This ACL (-@dangerous) refuses INFO, so the gateway cannot check Redis persists: it says so.
    ready = httpx.get(url + "/readyz", timeout=30).json()
    assert ready["ready"] is True and ready["durable"] is False
    assert "cannot tell whether redis persists" in ready["warning"]
    admin = stack.redis_admin
    try:
        assert admin.sismember("rr:namespaces", "acl")
        gen = admin.hget("rr:ns:{acl}:meta", "gen").decode()
        assert admin.llen(f"rr:ns:{{acl}}:g:{gen}:log") == 1
        # Every key the gateway wrote is under the prefix its ACL user is allowed.
        assert all(k.startswith(b"rr:") for k in admin.scan_iter(count=1000))
    finally:
        admin.close()
    # The ACL is in force: the gateway's credentials cannot leave their prefix or flush.
    as_gw = redis.Redis(host="127.0.0.1", port=stack.redis.port, username=GW_USER, password=GW_PW)
    try:
        assert as_gw.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_gw.get("other:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_gw.flushall()
    finally:
        as_gw.close()
    # Without the password (the default user needs one too) nothing is readable.
    anon = redis.Redis(host="127.0.0.1", port=stack.redis.port)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anon.get("rr:namespaces")
    finally:
        anon.close()


def test_gateway_with_a_wrong_redis_password_is_not_ready_and_says_why(
    stack: Stack, tmp_path: Path
) -> None:
    port = free_port()
    cfg = yaml.safe_load(stack.gateway_config.read_text())
    cfg["port"] = port
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
    bad_pw = "wrong-redis-pw-1b2c3d"
    env = {"REDIS_URL": f"redis://{GW_USER}:{bad_pw}@127.0.0.1:{stack.redis.port}/0"}
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "gw.yaml")]
    gw = start_process(args, port, env=env, timeout=120)  # the port opens; readiness must not
    admin = stack.redis_admin
    try:
        admin.execute_command("ACL", "LOG", "RESET")
        ready = httpx.get(gw.url + "/readyz", timeout=60)
        assert ready.status_code == 503, ready.text
        store = ready.json()["store"]
        assert isinstance(store, str) and "invalid username-password" in store, store
        # A refused login is final: one AUTH try, not the reconnect back-off's 9 (which took
        # ~6 s, past the compose healthcheck's 5 s timeout, hiding the reason behind a timeout).
        assert _auth_failures(admin, GW_USER) == 1
        resp = _call(gw.url, "POST", "/v1/route", TRAINER_KEY, {"namespace": "x", "pairs": [PAIR]})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "store_unavailable"
        shown = ready.text + resp.text + gw.logs()
        info = _call(gw.url, "GET", "/v1/info", TRAINER_KEY)
        assert info.status_code == 200
        shown += info.text
        for secret in (bad_pw, *SECRETS):
            assert secret not in shown, secret
    finally:
        admin.close()
        _stop(gw)


def _auth_failures(admin: Any, user: str) -> int:
    """Failed logins of ``user`` in the server's ACL log (entries aggregate a ``count``)."""
    total = 0
    for entry in admin.acl_log():
        if entry.get("reason") == "auth" and entry.get("username") == user:
            total += int(entry.get("count", 1))
    return total


# ---- 4. no pickle ------------------------------------------------------------------------------

_PICKLE_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}
)


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def pickle_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every unguarded way ``source`` could read or write a pickle, as ``file:line: what``."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _PICKLE_MODULES:
                    found.append(f"{where}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in _PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import")
            if node.module == "torch" and any(a.name in ("load", "save") for a in node.names):
                found.append(f"{where}: from torch import load/save")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name == "torch.save":
                found.append(f"{where}: torch.save (writes a pickle)")
            elif last == "load" and name.split(".")[0] in ("np", "numpy"):
                if not _is_const(_kw(node, "allow_pickle"), False) and _kw(node, "allow_pickle"):
                    found.append(f"{where}: np.load with allow_pickle")
            elif last in ("read_pickle", "to_pickle"):
                found.append(f"{where}: {last}")
            elif last == "from_pretrained" and _is_const(_kw(node, "use_safetensors"), False):
                found.append(f"{where}: from_pretrained(use_safetensors=False)")
    return found


def _package_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_pickle_scan_catches_each_forbidden_use() -> None:
    bad = textwrap.dedent(
        """
        import pickle
        import joblib, dill
        from cloudpickle import dumps
        from torch import load
        import numpy as np, torch
        torch.load("w.pt")
        torch.load("w.pt", weights_only=False)
        torch.save(obj, "w.pt")
        np.load("a.npy", allow_pickle=True)
        df.to_pickle("x")
        M.from_pretrained("m", use_safetensors=False)
        """
    )
    assert len(pickle_uses(bad)) == 11, pickle_uses(bad)
    good = (
        'torch.load("w.pt", weights_only=True)\n'
        'np.load("a.npz", allow_pickle=False)\n'
        'np.load("b.npy")\n'
    )
    assert pickle_uses(good) == []


def test_packages_never_read_or_write_pickles() -> None:
    files = _package_files()
    assert len(files) > 40 and all(
        pkg in {f.relative_to(ROOT).parts[0] for f in files} for pkg in PACKAGES
    )
    found = [u for f in files for u in pickle_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _plant(path: Path, marker: Path) -> Path:
    """A torch checkpoint (zip + pickle, as torch.save writes) that runs code when unpickled."""
    import torch

    torch.save({"weight": _Payload(marker)}, path)
    return path


def _payload_is_live(path: Path, marker: Path) -> None:
    """Control: unpickling the planted file the unsafe way does create the marker."""
    import torch

    torch.load(path, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()


def test_hf_backend_loads_safetensors_and_never_the_planted_pickle(tmp_path: Path) -> None:
    from reward_router.errors import ConfigError
    from services.backends import make_backend
    from services.settings import load_settings

    marker = tmp_path / "PWNED"
    folder = tiny_bert(tmp_path / "rm", seq_cls=True)
    for name in ("pytorch_model.bin", "model.pt"):
        _plant(folder / name, marker)
    _payload_is_live(folder / "pytorch_model.bin", marker)
    backend = make_backend(load_settings(None, name="p", backend="hf", model=str(folder)))
    backend.load()  # safetensors next to the pickles: the pickles are never opened
    assert math.isfinite(backend.score_batch([_score_input()])[0].score)
    assert not marker.exists()
    (folder / "model.safetensors").unlink()  # pickles only: refused, not unpickled
    backend = make_backend(load_settings(None, name="p", backend="hf", model=str(folder)))
    with pytest.raises(ConfigError, match="safetensors"):
        backend.load()
    assert not marker.exists()


def _score_input() -> Any:
    from services.backends import ScoreInput

    return ScoreInput([{"role": "user", "content": "hi"}], "hello", None)


def _tiny_router(root: Path) -> tuple[Path, Path]:
    import numpy as np

    from gateway.offline.model import RouterConfig
    from gateway.offline.train import train_router

    enc = tiny_bert(root / "encoder", hidden=16)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(32, 32)).astype(np.float32)
    correct = rng.integers(0, 2, size=(32, 2)).astype(np.float64)
    cfg = RouterConfig(hidden_sizes=(8,), dim=4, epochs=2, patience=0, seed=0)
    router, _ = train_router(
        feats, correct, ["a", "b"], cfg, valid_fraction=0.0, encoder_ref=str(enc), max_length=32
    )
    return router.save(root / "router"), enc


def test_router_artifact_loads_safetensors_and_never_the_planted_pickle(tmp_path: Path) -> None:
    from gateway.offline.model import OfflineRouter
    from reward_router.errors import DataFormatError

    marker = tmp_path / "PWNED"
    router_dir, enc = _tiny_router(tmp_path)
    for folder in (router_dir, enc):
        for name in ("pytorch_model.bin", "model.pt", "router.pkl"):
            _plant(folder / name, marker)
    _payload_is_live(router_dir / "model.pt", marker)
    loaded = OfflineRouter.load(router_dir)
    feats = loaded.load_featurizer()  # the encoder folder: safetensors next to the pickles
    assert feats is not None and not marker.exists()
    # A pickle where the weights should be is refused as "not a safetensors file".
    weights = router_dir / "model.safetensors"
    good = weights.read_bytes()
    shutil.copy(router_dir / "model.pt", weights)
    with pytest.raises(DataFormatError, match="not a safetensors file"):
        OfflineRouter.load(router_dir)
    assert not marker.exists()
    # An encoder folder holding only pickles is refused too.
    weights.write_bytes(good)
    (enc / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"model\.safetensors"):
        OfflineRouter.load(router_dir).load_featurizer()
    assert not marker.exists()


# ---- 5. trust_remote_code ------------------------------------------------------------------------

_CUSTOM_CODE = """
from pathlib import Path

Path({marker!r}).touch()  # runs the moment transformers imports this file

from transformers import BertConfig, BertForSequenceClassification


class RRCustomConfig(BertConfig):
    model_type = "rr-custom-bert"


class RRCustomModel(BertForSequenceClassification):
    config_class = RRCustomConfig
"""


def _custom_code_folder(root: Path, marker: Path) -> Path:
    """A working 1-label model folder whose config.json asks to run the folder's own code."""
    folder = tiny_bert(root, seq_cls=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "rr-custom-bert"  # unknown to transformers: only the code defines it
    cfg["architectures"] = ["RRCustomModel"]
    cfg["auto_map"] = {
        "AutoConfig": "rr_custom.RRCustomConfig",
        "AutoModelForSequenceClassification": "rr_custom.RRCustomModel",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "rr_custom.py").write_text(_CUSTOM_CODE.format(marker=str(marker)))
    return folder


def test_trust_remote_code_is_false_unless_the_config_sets_it(tmp_path: Path) -> None:
    from services.settings import load_settings

    cfg = tmp_path / "rm.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "backend": "hf", "model": "m"}))
    assert load_settings(cfg).trust_remote_code is False
    cfg.write_text(
        yaml.safe_dump({"name": "x", "backend": "hf", "model": "m", "trust_remote_code": True})
    )
    assert load_settings(cfg).trust_remote_code is True
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RR_RM_TRUST_REMOTE_CODE", "false")
        assert load_settings(cfg).trust_remote_code is False  # env beats the file


def _trust_values(source: str, filename: str) -> list[str]:
    """``from_pretrained`` calls whose trust_remote_code is not False or a setting of that name."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("from_pretrained")):
            continue
        if ast.unparse(node.func).startswith("PeftModel"):
            continue  # the trainer's own adapter checkpoint: peft runs no folder code
        value = _kw(node, "trust_remote_code")
        ok = _is_const(value, False) or (
            isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"
        )
        loads_weights = "Model" in ast.unparse(node.func) and _kw(node, "gguf_file") is None
        if loads_weights and not _is_const(_kw(node, "use_safetensors"), True):
            ok = False
        if not ok:
            bad.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_every_from_pretrained_passes_trust_remote_code_explicitly() -> None:
    """Explicit, not left to transformers: with ``None`` it asks on a terminal whether to run a
    folder's code (a 15 s prompt at start-up, and a "y" runs it). Model loads also pass
    ``use_safetensors=True``."""
    sample = (
        "AutoModel.from_pretrained(p)\nAutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
    )
    assert len(_trust_values(sample, "<s>")) == 2  # the check can fail
    found = [u for f in _package_files() for u in _trust_values(f.read_text(), str(f))]
    assert found == []


def test_hf_backend_refuses_custom_code_by_default(tmp_path: Path) -> None:
    """In process (fast): the hf backend's real load, settings without trust_remote_code."""
    from services.backends import make_backend
    from services.settings import load_settings

    marker = tmp_path / "RAN"
    folder = _custom_code_folder(tmp_path / "custom", marker)
    backend = make_backend(load_settings(None, name="c", backend="hf", model=str(folder)))
    with pytest.raises(ValueError, match="trust_remote_code"):
        backend.load()
    assert not marker.exists()


@pytest.mark.slow
def test_custom_model_code_runs_only_when_the_config_turns_it_on(tmp_path: Path) -> None:
    """Two real services, each on a model folder whose config.json maps to its own Python file
    (one folder and marker each, so both start at once): the default refuses, ``true`` runs it.
    """
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    markers = {"off": tmp_path / "RAN-off", "on": tmp_path / "RAN-on"}

    # Folders first, one after the other (transformers' lazy imports are not thread-safe).
    folders = {w: _custom_code_folder(tmp_path / f"custom-{w}", m) for w, m in markers.items()}

    def start(which: str) -> Proc:
        folder = folders[which]
        port = free_port()
        cfg: dict[str, Any] = {"name": which, "backend": "hf", "model": str(folder), "port": port}
        if which == "on":
            cfg["trust_remote_code"] = True
        path = tmp_path / f"{which}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = [sys.executable, "-m", "services", "serve", "--config", str(path)]
        return start_process(
            args, port, env=env, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=120
        )

    with ThreadPoolExecutor(2) as pool:
        futures = {w: pool.submit(start, w) for w in markers}
    procs = {w: f.result() for w, f in futures.items() if f.exception() is None}
    try:
        for f in futures.values():
            f.result()  # a start that failed fails the test (after the others are stopped)
        reason = _wait_settled(procs["off"].url)
        assert reason.status_code == 503 and "trust_remote_code" in reason.text, reason.text
        assert not markers["off"].exists()
        assert _wait_settled(procs["on"].url).status_code == 200
        assert markers["on"].exists()  # the value reached from_pretrained and the code ran
        body = {"items": [{"prompt": "hi", "response": "ok"}]}
        r = httpx.post(procs["on"].url + "/v1/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        for p in procs.values():
            _stop(p)


def _wait_settled(url: str, timeout: float = 120.0) -> httpx.Response:
    """``/readyz`` once the load finished: 200, or 503 with the load error (not "loading")."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url + "/readyz", timeout=10)
        if r.status_code == 200 or "loading" not in r.text or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_gateway_encoder_with_custom_code_is_refused(tmp_path: Path) -> None:
    from gateway.features import load_encoder

    marker = tmp_path / "CUSTOM-CODE-RAN"
    folder = _custom_code_folder(tmp_path / "enc", marker)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_encoder(str(folder), max_length=32)
    assert not marker.exists()


# ---- 6. loopback by default ----------------------------------------------------------------------


def _listening(pid: int) -> set[tuple[str, int]]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def test_defaults_bind_loopback() -> None:
    from gateway.settings import GatewaySettings
    from services.settings import ServiceSettings

    assert ServiceSettings(name="x", backend="length").host == "127.0.0.1"
    assert (
        GatewaySettings(
            rms=[{"name": "x", "url": "http://127.0.0.1:1"}], policy={"name": "random"}
        ).host
        == "127.0.0.1"
    )


def test_services_started_with_default_host_listen_on_loopback_only(stack: Stack) -> None:
    # Neither config names a host (see the stack fixture).
    assert "host" not in yaml.safe_load(stack.rm_config.read_text())
    assert "host" not in yaml.safe_load(stack.gateway_config.read_text())
    for proc in (stack.rm, stack.gateway):
        assert _listening(proc.popen.pid) == {("127.0.0.1", proc.port)}


def test_containers_bind_all_interfaces_explicitly() -> None:
    """Inside a container loopback is unreachable, so the compose stack says 0.0.0.0 itself:
    RM services publish no port (compose network only); the gateways, which do, have keys."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    rms = {n: s for n, s in services.items() if s.get("command", [None])[0] == "rm"}
    assert rms
    for name, svc in rms.items():
        cmd = svc["command"]
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0", name
        assert "ports" not in svc, name
    gw_yaml = yaml.safe_load((ROOT / "deploy/gateway.yaml").read_text())
    assert gw_yaml["host"] == "0.0.0.0"
    for name, svc in services.items():
        if svc.get("command", [None])[0] == "gateway":
            env = svc.get("environment") or {}
            assert (
                "REWARD_ROUTER_GATEWAY_API_KEYS" in env and "REWARD_ROUTER_GATEWAY_ADMIN_KEY" in env
            )
            assert env["REDIS_URL"].startswith("redis://:"), name  # Redis has a password
