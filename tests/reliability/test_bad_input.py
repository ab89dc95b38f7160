"""Bad input (issue 7): generated requests against the OpenAPI documents, then the edge cases a
fuzzer rarely reaches, on real processes: a gateway (Redis store, tiny real router) over two RM
services that need no model (``length``, ``verifier``), and a private redis-server.

* schemathesis (the ``schemathesis run`` CLI, a subprocess) against each one's
  ``/openapi.json``: the cases it sent are counted from its HAR log; none may answer 5xx, every
  4xx carries the one error body with a message (and, for 413/422, the field at fault). A short
  run is in the default suite; the >= 1,000-case run per service is ``slow``.
* oversized bodies (Content-Length and chunked), JSON nested 10,000 deep, strings over the
  per-field limits, NaN / ±Infinity / overflowing numbers, Unicode edge cases (lone surrogates,
  NUL, RTL marks, emoji, combining marks, invalid UTF-8 bytes), non-JSON content types, empty
  bodies and wrong top-level types: each answered 200 or a 4xx naming the field, never a 5xx.
* nothing stored is lost: a namespace's feedback applied before all of this is still there,
  bit for bit, and both services still answer valid requests correctly afterwards.

The gateway has an ``admin_key`` that schemathesis is not given (a trainer's bad input must not
be able to reset or delete state); trainer endpoints are open (no ``api_keys``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.helpers import (
    build_router,
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
    start_rm,
)
from tests.procs import Proc, free_port, start_redis

MAX_BODY = 64 * 1024
MAX_TEXT = 2000
MAX_PAIRS = 50
ADMIN_KEY = "admin-key-bad-input-3f9c"
#: A namespace given feedback before any bad input; checked bit for bit at the end.
KEPT_NS = "kept-before-abuse"
JSON_CT = {"content-type": "application/json"}

# max_examples per operation. Smoke: a few hundred cases per service in the default run;
# full: >= 1,000 cases per service (slow). Measured counts are in docs/reliability.md.
SMOKE_EXAMPLES = {"gateway": 5, "rm": 5}
FULL_EXAMPLES = {"gateway": 50, "rm": 200}
SMOKE_MIN_CASES = 150
FULL_MIN_CASES = 1000


# ---- real parts ---------------------------------------------------------------------------


@dataclass
class Stand:
    gw: Proc
    rm: Proc  # length RM: prefers the longer response
    ver: Proc  # verifier RM: compares final answers with the reference
    redis: Proc
    kept: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> None:
        for p in (self.gw, self.rm, self.ver, self.redis):
            assert p.popen.poll() is None, f"{p.args[:4]} died:\n{p.logs()[-3000:]}"


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    root = tmp_path_factory.mktemp("bad-input")
    router = build_router(root, ("len", "ver"))
    (root / "redis").mkdir()
    procs: list[Proc] = []
    try:
        redis = start_redis(free_port(), root / "redis")
        procs.append(redis)
        rm = start_rm(root, "len", backend="length")
        procs.append(rm)
        ver = start_rm(root, "ver", backend="verifier")
        procs.append(ver)
        cfg = gateway_config(
            root,
            {"len": rm.url, "ver": ver.url},
            router=router,
            redis_url=f"redis://127.0.0.1:{redis.port}/0",
            admin_key=ADMIN_KEY,
            max_body_bytes=MAX_BODY,
            max_text_chars=MAX_TEXT,
            max_pairs=MAX_PAIRS,
        )
        gw = start_gateway(cfg)
        procs.append(gw)
        res = route(gw.url, pairs(8), ns=KEPT_NS)["results"]
        out = feedback(gw.url, [(r["route_id"], -0.25 * i) for i, r in enumerate(res)])
        assert out == {"applied": 8, "duplicate": 0, "unknown": 0}
        yield Stand(gw, rm, ver, redis, kept=posteriors(gw.url, KEPT_NS))
    finally:
        for p in reversed(procs):
            p.kill()
            p.log.unlink(missing_ok=True)


def post(url: str, body: bytes | str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url, content=body, headers=JSON_CT if headers is None else headers, timeout=60
    )


def error_of(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """The one error body of a ``status`` answer; ``field`` (if given) is the one named."""
    assert r.status_code == status, f"{r.status_code} {r.text[:500]}"
    err: dict[str, Any] = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    if field is not None:
        assert err["field"] == field, err
    return err


# ---- schemathesis -------------------------------------------------------------------------


@dataclass
class FuzzRun:
    cases: int  # requests schemathesis sent (entries of its HAR log)
    generated: int  # its own count of generated test cases (JSON report)
    statuses: Counter[int]
    server_errors: list[str]  # 5xx answers: "METHOD URL -> status body"
    unclear: list[str]  # 4xx answers without the one error body (or without a field)
    errored: int  # cases that raised instead of answering (a crash, a dropped connection)
    seconds: float


def _body_text(content: dict[str, Any]) -> str:
    import base64

    text = str(content.get("text", ""))
    return base64.b64decode(text).decode() if content.get("encoding") == "base64" else text


def _clear_4xx(status: int, text: str) -> bool:
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if not isinstance(err, dict) or not err.get("message"):
        return False
    return status not in (413, 422) or bool(err.get("field"))


def fuzz(url: str, max_examples: int, workdir: Path, seed: int = 7) -> FuzzRun:
    """``schemathesis run`` against ``url``'s OpenAPI document; what it sent and got back."""
    workdir.mkdir(parents=True, exist_ok=True)
    har, report = workdir / "run.har", workdir / "run.json"
    args = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--checks",
        "not_a_server_error",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--report",
        "json,har",
        "--report-json-path",
        str(report),
        "--report-har-path",
        str(har),
        "--no-color",
    ]
    t0 = time.perf_counter()
    # cwd: schemathesis keeps a cache folder in the working directory.
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=1500)
    seconds = time.perf_counter() - t0
    assert har.exists() and report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    summary = json.loads(report.read_text())
    statuses: Counter[int] = Counter()
    server_errors, unclear = [], []
    for e in entries:
        status = int(e["response"]["status"])
        statuses[status] += 1
        text = _body_text(e["response"]["content"])
        where = f"{e['request']['method']} {e['request']['url'][:200]} -> {status} {text[:300]}"
        if status >= 500:
            server_errors.append(where)
        elif status >= 400 and not _clear_4xx(status, text):
            unclear.append(where)
    return FuzzRun(
        cases=len(entries),
        generated=int(summary["test_cases"]["generated"]),
        statuses=statuses,
        server_errors=server_errors,
        unclear=unclear,
        errored=int(summary["test_cases"]["errored"]) + len(summary["errors"]),
        seconds=seconds,
    )


def _check_fuzz(stand: Stand, proc: Proc, run: FuzzRun, min_cases: int, name: str) -> None:
    print(
        f"\nschemathesis {name}: {run.cases} cases sent ({run.generated} generated), "
        f"{sum(n for s, n in run.statuses.items() if s >= 500)} 5xx, "
        f"statuses {dict(sorted(run.statuses.items()))}, {run.seconds:.1f} s"
    )
    assert run.cases >= min_cases, run
    assert run.server_errors == [], "\n".join(run.server_errors[:10]) + proc.logs()[-3000:]
    assert run.errored == 0, run
    assert run.unclear == [], "\n".join(run.unclear[:10])
    assert run.statuses[200] > 0, run.statuses  # some generated requests were valid ones
    stand.alive()


def _target(stand: Stand, which: str) -> Proc:
    return stand.gw if which == "gateway" else stand.rm


@pytest.mark.parametrize("which", ["gateway", "rm"])
def test_schemathesis_short_run_finds_no_5xx(stand: Stand, which: str, tmp_path: Path) -> None:
    proc = _target(stand, which)
    run = fuzz(proc.url, SMOKE_EXAMPLES[which], tmp_path)
    _check_fuzz(stand, proc, run, SMOKE_MIN_CASES, which)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("which", ["gateway", "rm"])
def test_schemathesis_1000_cases_find_no_5xx(stand: Stand, which: str, tmp_path: Path) -> None:
    proc = _target(stand, which)
    run = fuzz(proc.url, FULL_EXAMPLES[which], tmp_path, seed=11)
    _check_fuzz(stand, proc, run, FULL_MIN_CASES, which)


# ---- oversized bodies ---------------------------------------------------------------------


def _big_route_body(chars: int) -> bytes:
    pair = {"prompt": "x" * chars, "response_a": "a", "response_b": "b"}
    return json.dumps({"pairs": [pair]}).encode()


@pytest.mark.parametrize("path", ["/v1/route", "/v1/feedback", "/v1/namespaces/big", "/get_reward"])
def test_body_over_the_limit_is_413_with_or_without_content_length(stand: Stand, path: str) -> None:
    body = _big_route_body(MAX_BODY + 10)
    err = error_of(post(stand.gw.url + path, body), 413, "body")
    assert str(MAX_BODY) in err["message"] and err["type"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts streamed bytes
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    r = httpx.post(stand.gw.url + path, content=chunks(), headers=JSON_CT, timeout=60)
    assert "content-length" not in r.request.headers
    err = error_of(r, 413, "body")  # was a 400 "error parsing the body" before the fix
    assert err["type"] == "body_too_large"
    stand.alive()


def test_body_just_under_the_limit_is_read(stand: Stand) -> None:
    # Under max_body_bytes the body is parsed: the answer is about the text, not the size.
    body = _big_route_body(MAX_BODY - 200)
    assert len(body) < MAX_BODY
    error_of(post(stand.gw.url + "/v1/route", body), 422, "pairs.0.prompt")


def test_rm_service_scores_a_big_body_and_refuses_one_over_its_limit(stand: Stand) -> None:
    """The RM services' own max_body_bytes (default 16 MiB, twice the gateway's default): an
    8 MiB body is scored; one over 16 MiB is a 413 naming the limit (it used to be read and
    scored: an RM service had no body limit). tests/services/test_body_limit.py has the rest."""
    pair = {"prompt": "p " * (4 << 20), "response_a": "a b c", "response_b": "a"}
    r = post(stand.rm.url + "/v1/compare", json.dumps({"pairs": [pair]}))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["results"][0]["preferred"] == "a"
    pair["prompt"] = "p " * (8 << 20)
    err = error_of(post(stand.rm.url + "/v1/compare", json.dumps({"pairs": [pair]})), 413, "body")
    assert err["type"] == "body_too_large" and str(16 << 20) in err["message"], err
    stand.alive()


# ---- deeply nested JSON -------------------------------------------------------------------

DEEP_LIST = "[" * 10_000 + "]" * 10_000
DEEP_OBJECT = '{"a":' * 10_000 + "1" + "}" * 10_000


@pytest.mark.parametrize("deep", [DEEP_LIST, DEEP_OBJECT], ids=["list", "object"])
@pytest.mark.parametrize(
    ("which", "path"),
    [
        ("gw", "/v1/route"),
        ("gw", "/v1/feedback"),
        ("gw", "/v1/namespaces/deep"),
        ("gw", "/get_reward"),
        ("rm", "/v1/compare"),
        ("rm", "/v1/score"),
        ("ver", "/v1/compare"),
    ],
)
def test_json_nested_10000_deep_is_422_not_a_crash(
    stand: Stand, which: str, path: str, deep: str
) -> None:
    url = getattr(stand, which).url
    for body in (deep, '{"pairs": ' + deep + "}"):
        err = error_of(post(url + path, body), 422, "body")
        assert "nested too deeply" in err["message"], err
    stand.alive()
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize("depth", [500, 900, 970])
def test_json_nested_just_under_the_parser_limit_is_answered(stand: Stand, depth: int) -> None:
    """Parsed, then walked by the validators and the handlers: 200 or 422, never a 5xx."""
    nest = "[" * depth + '"x"' + "]" * depth
    gw = stand.gw.url
    cases = [
        (gw + "/v1/namespaces/nest", '{"policy": "random", "params": {"x": @}}'),
        (gw + "/v1/namespaces/nest2", '{"normalizer_params": {"window": @}}'),
        (gw + "/get_reward", '{"query": ["q a"], "prompts": ["q"], "labels": [@]}'),
        (gw + "/v1/route", '{"pairs": [{"prompt": @, "response_a": "a", "response_b": "b"}]}'),
        (gw + "/v1/feedback", '{"feedback": [{"route_id": "x", "reward": @}]}'),
        (stand.rm.url + "/v1/compare", '{"pairs": [{"prompt": @}]}'),
    ]
    for url, template in cases:
        r = post(url, template.replace("@", nest))
        if r.status_code != 200:  # (a nested label is just text to /get_reward)
            err = error_of(r, 422)
            assert err["field"], err
    stand.alive()


# ---- huge strings -------------------------------------------------------------------------


def _pair(**over: Any) -> dict[str, Any]:
    return {"prompt": "2+2?", "response_a": "4", "response_b": "5", **over}


LONG = "y" * (MAX_TEXT + 1)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/route", {"pairs": [_pair(prompt=LONG)]}, "pairs.0.prompt"),
        ("/v1/route", {"pairs": [_pair(), _pair(response_a=LONG)]}, "pairs.1.response_a"),
        ("/v1/route", {"pairs": [_pair(response_b=LONG)]}, "pairs.0.response_b"),
        ("/v1/route", {"pairs": [_pair(reference=LONG)]}, "pairs.0.reference"),
        (
            "/v1/route",
            {"pairs": [_pair(prompt=[{"role": "user", "content": LONG[:1500]}] * 2)]},
            "pairs.0.prompt",
        ),
        ("/v1/route", {"pairs": [_pair(id="i" * 257)]}, "pairs.0.id"),
        ("/v1/route", {"namespace": "n" * 65, "pairs": [_pair()]}, "namespace"),
        ("/v1/route", {"pairs": [_pair()] * (MAX_PAIRS + 1)}, "pairs"),
        (
            "/v1/feedback",
            {"feedback": [{"route_id": "r" * 257, "reward": 0.0}]},
            "feedback.0.route_id",
        ),
    ],
)
def test_strings_over_the_limits_are_422_naming_the_field(
    stand: Stand, path: str, body: dict[str, Any], field: str
) -> None:
    err = error_of(post(stand.gw.url + path, json.dumps(body)), 422, field)
    assert field.split(".")[-1] in err["message"], err


def test_strings_at_the_limit_are_accepted(stand: Stand) -> None:
    at = "z " * (MAX_TEXT // 2)
    body = {"pairs": [_pair(prompt=at, response_a=at, response_b="z", id="i" * 256)]}
    r = post(stand.gw.url + "/v1/route", json.dumps(body))
    assert r.status_code == 200, r.text[:300]
    res = r.json()["results"][0]
    assert res["id"] == "i" * 256 and res["rm"] in ("len", "ver")


def test_rm_service_scores_huge_strings(stand: Stand) -> None:
    """No per-field limit on an RM service (truncation: left): a 1 MB response is scored."""
    huge = "w " * 500_000
    r = post(stand.rm.url + "/v1/score", json.dumps({"items": [{"prompt": "p", "response": huge}]}))
    assert r.status_code == 200, r.text[:300]
    assert all(math.isfinite(s) for s in r.json()["scores"])
    r = post(stand.rm.url + "/v1/compare", json.dumps({"pairs": [_pair(response_b=huge)]}))
    assert r.status_code == 200 and r.json()["results"][0]["preferred"] == "b", r.text[:300]


# ---- NaN, infinities, overflowing numbers -------------------------------------------------

BAD_REWARDS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"nan"', '"inf"', "1e308"]
BAD_REWARDS += ["-1e7", str(10**400), "null", '"0.5x"', "[1]", '{"v": 1}']
# Strings that parse as numbers and booleans: refused too (strict), not coerced.
BAD_REWARDS += ['"0.5"', '" 7 "', '"1e3"', "true", "false"]


def test_nan_and_inf_rewards_are_422_and_change_nothing(stand: Stand) -> None:
    gw = stand.gw.url
    ns = "nan-inf"
    ids = [r["route_id"] for r in route(gw, pairs(3, offset=40), ns=ns)["results"]]
    feedback(gw, [(ids[0], -0.5)])
    before = posteriors(gw, ns)
    for bad in BAD_REWARDS:
        # A valid item first: the whole request is refused, the valid item not applied either.
        items = (
            f'{{"route_id": "{ids[1]}", "reward": -0.1}}, {{"route_id": "{ids[2]}", "reward": @}}'
        )
        body = '{"feedback": [' + items.replace("@", bad) + "]}"
        err = error_of(post(gw + "/v1/feedback", body), 422, "feedback.1.reward")
        assert "reward" in err["message"], (bad, err)
    assert posteriors(gw, ns) == before  # not one observation more, posterior bit for bit
    # The refused requests consumed nothing: the same route ids are applied once now.
    assert feedback(gw, [(ids[1], -0.1), (ids[2], -0.2)])["applied"] == 2
    after = posteriors(gw, ns)
    assert after["seq"] == before["seq"] + 2 and after["params"] != before["params"]


def test_extreme_reward_cannot_poison_a_zscore_namespace(stand: Stand) -> None:
    """Regression: a finite 1e308 reward overflowed the z-score normaliser (a 500) and, being
    already logged, made every later route / posteriors call of the namespace fail."""
    gw = stand.gw.url
    ns = "zscore-extreme"
    cfg = {"normalizer": "zscore", "normalizer_params": {"warmup": 2}}
    assert post(f"{gw}/v1/namespaces/{ns}", json.dumps(cfg)).status_code == 200
    ids = [r["route_id"] for r in route(gw, pairs(4, offset=60), ns=ns)["results"]]
    for big in (1e308, -1e308, 2e6):
        body = {"feedback": [{"route_id": i, "reward": big} for i in ids[:2]]}
        error_of(post(gw + "/v1/feedback", json.dumps(body)), 422, "feedback.0.reward")
    assert feedback(gw, [(i, float(k)) for k, i in enumerate(ids)])["applied"] == 4
    post_ = posteriors(gw, ns)
    assert post_["seq"] == 4
    assert all(math.isfinite(x) for row in post_["params"]["means"] for x in row)
    assert len(route(gw, pairs(2, offset=70), ns=ns)["results"]) == 2


@pytest.mark.parametrize(
    ("cfg", "field", "named"),
    [
        ('{"params": {"lambda0": NaN}}', "params", "lambda0"),
        ('{"params": {"sigma2": Infinity}}', "params", "sigma2"),
        ('{"params": {"lambda0": 1' + "0" * 400 + "}}", "params", "lambda0"),  # was a 500
        ('{"normalizer_params": {"window": -Infinity}}', "normalizer_params", "window"),
        ('{"params": {"": 1}}', "params", "names"),  # was a 422 naming no field
        ('{"params": {"lambda0": 1e-400}}', "lambda0", "lambda0"),  # 0.0: out of [0.001, 1e6]
    ],
)
def test_non_finite_namespace_params_are_422(
    stand: Stand, cfg: str, field: str, named: str
) -> None:
    err = error_of(post(stand.gw.url + "/v1/namespaces/bad-params", cfg), 422, field)
    assert named in err["message"], err
    r = httpx.get(stand.gw.url + "/v1/namespaces", timeout=30)
    assert "bad-params" not in r.json()["namespaces"]  # nothing half-created


#: Finite, accepted before, and breaking the math of the namespace that took them.
MATH_BREAKING_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"params": {"lambda0": 5e-324}}, "lambda0"),  # precision not positive definite later
    ({"params": {"sigma2": 5e-324}}, "sigma2"),  # posterior means NaN
    ({"params": {"lambda0": 1e-6, "sigma2": 1e-6}}, "lambda0"),
    ({"params": {"sigma2": 1e7}}, "sigma2"),
    ({"policy": "weighted-score", "params": {"sigma2": 1e-5}}, "sigma2"),
    ({"policy": "laser", "params": {"ridge": 5e-324}}, "ridge"),  # numpy LinAlgError: a 500
    ({"policy": "laser", "params": {"alpha": 1e308}}, "alpha"),  # UCB overflows to inf
    ({"policy": "uwo", "params": {"lam": 1e308}}, "lam"),
]


def test_namespace_params_that_break_the_math_are_422_and_change_nothing(stand: Stand) -> None:
    """Regression: ``lambda0: 5e-324`` was accepted, and after the first feedback every route
    and posteriors call of that namespace was a 422 (precision not positive definite);
    ``sigma2: 5e-324`` made its posterior means NaN. Now refused at creation (422 naming the
    field and its range), for a new name and for an existing namespace alike."""
    gw = stand.gw.url
    ns = "tight-params"
    good = {"policy": "bayesian", "params": {"lambda0": 2.0, "sigma2": 0.25}}
    assert post(f"{gw}/v1/namespaces/{ns}", json.dumps(good)).json()["created"] is True
    ids = [r["route_id"] for r in route(gw, pairs(3, offset=80), ns=ns)["results"]]
    assert feedback(gw, [(i, -0.5 * k) for k, i in enumerate(ids)])["applied"] == 3
    before = posteriors(gw, ns)
    names = httpx.get(gw + "/v1/namespaces", timeout=30).json()["namespaces"]
    for cfg, field_ in MATH_BREAKING_PARAMS:
        for target in (ns, "tight-params-new"):
            r = post(f"{gw}/v1/namespaces/{target}", json.dumps(cfg))
            err = error_of(r, 422, field_)  # not a 409 for the existing one: checked first
            assert err["type"] == "invalid_config" and "1e+06]" in err["message"], err
    assert httpx.get(gw + "/v1/namespaces", timeout=30).json()["namespaces"] == names
    again = post(f"{gw}/v1/namespaces/{ns}", json.dumps(good)).json()
    assert again["created"] is False and again["config"]["params"] == good["params"]
    assert posteriors(gw, ns) == before
    ids = [r["route_id"] for r in route(gw, pairs(2, offset=90), ns=ns)["results"]]
    assert feedback(gw, [(i, -0.1) for i in ids])["applied"] == 2


def test_namespace_at_the_ends_of_the_ranges_keeps_working(stand: Stand) -> None:
    """The smallest lambda0 and sigma2 allowed, raw rewards (normaliser ``none``) at
    |reward| = 1e6: feedback is applied and the posterior stays finite."""
    gw = stand.gw.url
    ns = "tight-ends"
    cfg = {"params": {"lambda0": 1e-3, "sigma2": 1e-3}, "normalizer": "none"}
    assert post(f"{gw}/v1/namespaces/{ns}", json.dumps(cfg)).status_code == 200
    for step in range(3):
        ids = [r["route_id"] for r in route(gw, pairs(8, offset=100), ns=ns)["results"]]
        rewards = [1e6 if k % 2 else -1e6 for k in range(len(ids))]
        assert feedback(gw, list(zip(ids, rewards, strict=True)))["applied"] == 8, step
    out = posteriors(gw, ns)
    assert out["seq"] == 24
    assert all(math.isfinite(x) for row in out["params"]["means"] for x in row)
    assert all(math.isfinite(r["uncertainty"]) for r in out["rms"] if r["observations"])


# ---- Unicode --------------------------------------------------------------------------------

#: Valid Unicode that must go through (round trip of the caller's id included).
ODD_TEXT = {
    "nul": "a\u0000b",
    "rtl": "\u202eevil\u202c \u200f\u200e",
    "bom": "\ufeffbom",
    "emoji-zwj": "\U0001f600 \U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "combining": "e" + "\u0301" * 250,
    "nonchar": "\uffff\ufffe\U0010ffff",
    "separators": "\u0085\u2028\u2029\r\n\t",
    "astral": "\U0001d54f\U00020000",
}
#: No UTF-8 encoding exists for these: refused with a 422 naming the field.
LONE_SURROGATES = {
    "high": "\ud800",
    "low": "\udfff",
    "reversed-pair": "\ude00\ud83d",
    "inside": "ab\udbffcd",
}


@pytest.mark.parametrize("name", list(ODD_TEXT))
def test_odd_but_valid_unicode_is_answered(stand: Stand, name: str) -> None:
    s = ODD_TEXT[name]
    gw = stand.gw.url
    pair = {"id": s, "prompt": s, "response_a": s + " a b", "response_b": s, "reference": s}
    r = post(gw + "/v1/route", json.dumps({"pairs": [pair]}))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["results"][0]["id"] == s  # echoed back exactly
    msg = {
        "pairs": [_pair(prompt=[{"role": "system", "content": s}, {"role": "user", "content": s}])]
    }
    assert post(gw + "/v1/route", json.dumps(msg)).status_code == 200
    out = post(gw + "/v1/feedback", json.dumps({"feedback": [{"route_id": s, "reward": 0.1}]}))
    assert out.status_code == 200 and out.json()["unknown"] == 1, out.text
    q = {"query": [s + " answer"], "prompts": [s], "labels": [s]}
    r = post(gw + "/get_reward", json.dumps(q))
    assert r.status_code == 200 and 0.0 <= r.json()["rewards"][0] <= 1.0, r.text[:300]
    for rm in (stand.rm, stand.ver):
        r = post(rm.url + "/v1/compare", json.dumps({"pairs": [_pair(prompt=s, reference=s)]}))
        assert r.status_code == 200, r.text[:300]
        r = post(rm.url + "/v1/score", json.dumps({"items": [{"prompt": s, "response": s}]}))
        assert r.status_code == 200 and math.isfinite(r.json()["scores"][0]), r.text[:300]


GW_TEXT_FIELDS = {
    "pairs.0.id": lambda s: {"pairs": [_pair(id=s)]},
    "pairs.0.prompt": lambda s: {"pairs": [_pair(prompt=s)]},
    "pairs.0.response_a": lambda s: {"pairs": [_pair(response_a=s)]},
    "pairs.0.response_b": lambda s: {"pairs": [_pair(response_b=s)]},
    "pairs.0.reference": lambda s: {"pairs": [_pair(reference=s)]},
    "pairs.0.prompt.1.content": lambda s: {
        "pairs": [_pair(prompt=[{"role": "user", "content": "x"}, {"role": "user", "content": s}])]
    },
}
RM_TEXT_FIELDS = {
    ("/v1/compare", "pairs[0].prompt"): lambda s: {"pairs": [_pair(prompt=s)]},
    ("/v1/compare", "pairs[0].response_b"): lambda s: {"pairs": [_pair(response_b=s)]},
    ("/v1/compare", "pairs[0].reference"): lambda s: {"pairs": [_pair(reference=s)]},
    ("/v1/compare", "pairs[0].prompt[0].content"): lambda s: {
        "pairs": [_pair(prompt=[{"role": "user", "content": s}])]
    },
    ("/v1/score", "items[0].response"): lambda s: {"items": [{"prompt": "p", "response": s}]},
}


@pytest.mark.parametrize("name", list(LONE_SURROGATES))
def test_lone_surrogates_are_422_naming_the_field(stand: Stand, name: str) -> None:
    """Regression: a lone surrogate in a text field was a 500 (UnicodeEncodeError in the
    gateway's feature cache key; TypeError in a tokenizer), and the 500 also reset the
    connection."""
    s = LONE_SURROGATES[name]
    gw = stand.gw.url
    for field_, make in GW_TEXT_FIELDS.items():
        # json.dumps escapes the surrogate (\ud800): the body itself is valid ASCII JSON.
        err = error_of(post(gw + "/v1/route", json.dumps(make(s))), 422, field_)
        assert "surrogate" in err["message"] or field_ == "pairs.0.id", err
    body = {"feedback": [{"route_id": s, "reward": 0.0}]}
    error_of(post(gw + "/v1/feedback", json.dumps(body)), 422, "feedback.0.route_id")
    for q, field_ in (
        ({"query": [s]}, "query.0"),
        ({"query": ["a"], "prompts": [s]}, "prompts.0"),
        ({"query": ["a"], "labels": [s]}, "labels"),
    ):
        err = error_of(post(gw + "/get_reward", json.dumps(q)), 422, field_)
        assert "surrogate" in err["message"], err
    for rm in (stand.rm, stand.ver):
        for (path, field_), make in RM_TEXT_FIELDS.items():
            err = error_of(post(rm.url + path, json.dumps(make(s))), 422, field_)
            assert "surrogate" in err["message"] and err["rm"] in ("len", "ver"), err
    stand.alive()


INVALID_UTF8 = {
    "ff": b"\xff",
    "latin1": b"caf\xe9",
    "overlong": b"\xc0\xaf",
    "truncated": b"\xe2\x82",
    "above-max": b"\xf4\x90\x80\x80",
}


@pytest.mark.parametrize("name", list(INVALID_UTF8))
def test_invalid_utf8_bytes_are_422_on_the_body(stand: Stand, name: str) -> None:
    raw = INVALID_UTF8[name]
    route_body = b'{"pairs": [{"prompt": "' + raw + b'", "response_a": "a", "response_b": "b"}]}'
    for url in (stand.gw.url + "/v1/route", stand.rm.url + "/v1/compare"):
        err = error_of(post(url, route_body), 422, "body")
        assert "UTF-8" in err["message"], err
    fb = b'{"feedback": [{"route_id": "' + raw + b'", "reward": 1}]}'
    error_of(post(stand.gw.url + "/v1/feedback", fb), 422, "body")
    stand.alive()


def test_utf8_encoded_surrogate_is_422_naming_the_field(stand: Stand) -> None:
    # ED A0 80 (CESU-8 for U+D800): Python's JSON reader lets it through as a lone surrogate,
    # which the text fields then refuse.
    body = b'{"pairs": [{"prompt": "\xed\xa0\x80", "response_a": "a", "response_b": "b"}]}'
    err = error_of(post(stand.gw.url + "/v1/route", body), 422, "pairs.0.prompt")
    assert "surrogate" in err["message"]
    err = error_of(post(stand.rm.url + "/v1/compare", body), 422, "pairs[0].prompt")
    assert "surrogate" in err["message"]


@pytest.mark.parametrize(
    "namespace",
    ["", "\u202ereverse", "\U0001f600", "a\u0000b", "%ED%A0%80", "..", "a" * 65, "x:y", "{tag}"],
)
def test_odd_namespaces_are_4xx_naming_the_namespace(stand: Stand, namespace: str) -> None:
    gw = stand.gw.url
    body = json.dumps({"namespace": namespace, "pairs": [_pair()]})
    err = error_of(post(gw + "/v1/route", body), 422, "namespace")
    assert "namespace" in err["message"]
    r = httpx.get(gw + "/v1/posteriors", params={"namespace": namespace}, timeout=30)
    assert r.status_code in (404, 422) and error_of(r, r.status_code)["field"] == "namespace"
    # Regression: /get_reward's ?namespace= was not checked (an empty one was a 500).
    r = httpx.post(gw + "/get_reward", params={"namespace": namespace}, json={"query": ["q"]})
    error_of(r, 422, "namespace")


# ---- content types, empty bodies, wrong shapes --------------------------------------------

ROUTE_OK = json.dumps({"pairs": [_pair()]})


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_non_json_content_type_is_422_on_the_body(stand: Stand, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for url in (stand.gw.url + "/v1/route", stand.rm.url + "/v1/compare"):
        error_of(post(url, ROUTE_OK, headers), 422, "body")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "body"),
        (b"null", "body"),
        (b"[]", "body"),
        (b"1", "body"),
        (b'"pairs"', "body"),
        (b"true", "body"),
        (b"{}", "pairs"),
        (b'{"pairs": {}}', "pairs"),
        (b'{"pairs": [[]]}', "pairs.0"),
        (b'{"pairs": [1]}', "pairs.0"),
        (b"{not json", "body"),
        (b'{"pairs": []} trailing', "body"),
        (b"\x00\x00\x00{", "body"),
    ],
)
def test_empty_or_wrongly_shaped_bodies_are_422_naming_the_field(
    stand: Stand, body: bytes, field: str
) -> None:
    error_of(post(stand.gw.url + "/v1/route", body), 422, field)
    rm_field = field.replace(".0", "[0]")
    error_of(post(stand.rm.url + "/v1/compare", body), 422, rm_field)
    fb_field = field.replace("pairs", "feedback")
    error_of(
        post(stand.gw.url + "/v1/feedback", body.replace(b"pairs", b"feedback")), 422, fb_field
    )


def test_unknown_role_is_refused_by_the_gateway_before_routing(stand: Stand) -> None:
    """Regression: the gateway took role "tool", which every RM refuses: the pair was routed
    and came back as a 422 ``rejected_by_rm`` naming only ``pairs``."""
    body = {"pairs": [_pair(prompt=[{"role": "tool", "content": "x"}])]}
    err = error_of(post(stand.gw.url + "/v1/route", json.dumps(body)), 422, "pairs.0.prompt.0.role")
    assert err["type"] == "validation_error"


def test_wrong_methods_and_paths_carry_the_error_body(stand: Stand) -> None:
    for url in (stand.gw.url, stand.rm.url):
        r = httpx.request(
            "PATCH", url + "/v1/route" if url == stand.gw.url else url + "/v1/compare"
        )
        assert error_of(r, 405)["type"] == "http_error" and "POST" in r.headers["allow"]
        assert error_of(httpx.get(url + "/v1/nowhere"), 404)["type"] == "http_error"


def test_admin_endpoints_refuse_without_the_admin_key(stand: Stand) -> None:
    for method, path in (
        ("POST", f"/v1/namespaces/{KEPT_NS}/reset"),
        ("DELETE", f"/v1/namespaces/{KEPT_NS}"),
    ):
        r = httpx.request(method, stand.gw.url + path, timeout=30)
        error_of(r, 401, "authorization")


# ---- afterwards: nothing lost, everything still works -------------------------------------


def test_after_the_abuse_state_is_intact_and_valid_requests_work(stand: Stand) -> None:
    """Runs last (file order): the feedback applied before every test above is still there."""
    stand.alive()
    gw = stand.gw.url
    assert posteriors(gw, KEPT_NS) == stand.kept
    res = route(gw, pairs(4, offset=200), ns=KEPT_NS)["results"]
    assert len(res) == 4 and all(r["rm"] in ("len", "ver") for r in res)
    assert feedback(gw, [(r["route_id"], -0.3) for r in res])["applied"] == 4
    now = posteriors(gw, KEPT_NS)
    assert now["seq"] == stand.kept["seq"] + 4
    assert sum(r["observations"] for r in now["rms"]) == 12
    # The RMs answer correctly: the length RM prefers the longer response, the verifier the
    # response whose final answer matches the reference.
    r = post(stand.rm.url + "/v1/compare", json.dumps({"pairs": [_pair(response_b="a b c d")]}))
    assert r.status_code == 200 and r.json()["results"][0]["preferred"] == "b", r.text
    ver_pair = _pair(
        response_a="so the answer is 4", response_b="so the answer is 5", reference="4"
    )
    r = post(stand.ver.url + "/v1/compare", json.dumps({"pairs": [ver_pair]}))
    assert r.status_code == 200 and r.json()["results"][0]["preferred"] == "a", r.text
    assert httpx.get(gw + "/readyz", timeout=10).json()["ready"] is True
