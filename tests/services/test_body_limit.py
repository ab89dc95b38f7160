"""``max_body_bytes`` on an RM scoring service (issue 7): bodies over it are refused with a 413 in
the one error body before they are parsed, whether they carry a Content-Length or are streamed
(chunked); bodies up to it are scored as before. A real service process on loopback, with the
``length`` backend (no model) and a 4 KiB limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reward_router.errors import ConfigError
from services.settings import load_settings
from tests.procs import Proc
from tests.services.conftest import rm_service, write_config
from tests.services.test_service import error_of, metric

LIMIT = 4096
NAME = "small-body-rm"
JSON_CT = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def small_rm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    d = tmp_path_factory.mktemp("body-limit")
    cfg = write_config(d / "rm.yaml", name=NAME, backend="length", max_body_bytes=LIMIT)
    with rm_service(cfg) as proc:
        yield proc


def body_of(path: str, size: int) -> bytes:
    """A valid request for ``path`` of exactly ``size`` bytes (the prompt is the padding); the
    longer response is ``a``."""

    def make(pad: int) -> dict[str, Any]:
        prompt = "p" * pad
        if path == "/v1/score":
            return {"items": [{"prompt": prompt, "response": "a b c"}]}
        return {"pairs": [{"prompt": prompt, "response_a": "a b c", "response_b": "a"}]}

    base = len(json.dumps(make(0)).encode())
    body = json.dumps(make(size - base)).encode()
    assert len(body) == size
    return body


def chunks(body: bytes, size: int = 1024) -> Iterator[bytes]:
    """The body streamed: httpx sends a generator chunked, without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def check_413(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text[:300]
    err = error_of(r)
    assert err["type"] == "body_too_large" and err["field"] == "body" and err["rm"] == NAME
    assert str(LIMIT) in str(err["message"]), err


@pytest.mark.parametrize("path", ["/v1/compare", "/v1/score"])
def test_body_over_the_limit_with_content_length_is_413(small_rm: Proc, path: str) -> None:
    for size in (LIMIT + 1, 4 * LIMIT):
        r = httpx.post(small_rm.url + path, content=body_of(path, size), headers=JSON_CT)
        assert r.request.headers["content-length"] == str(size)
        check_413(r)


@pytest.mark.parametrize("path", ["/v1/compare", "/v1/score"])
def test_chunked_body_over_the_limit_is_413(small_rm: Proc, path: str) -> None:
    r = httpx.post(small_rm.url + path, content=chunks(body_of(path, LIMIT + 1)), headers=JSON_CT)
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    check_413(r)  # FastAPI's body reader would make any other exception a 400


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_body_up_to_the_limit_is_scored(small_rm: Proc, streamed: bool) -> None:
    for size in (LIMIT - 1, LIMIT):
        body = body_of("/v1/compare", size)
        content = chunks(body) if streamed else body
        r = httpx.post(small_rm.url + "/v1/compare", content=content, headers=JSON_CT)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["results"][0]["preferred"] == "a"  # the longer response
    scores = []
    for size in (200, LIMIT):  # the same item, padded: the same score
        body = body_of("/v1/score", size)
        r = httpx.post(small_rm.url + "/v1/score", content=body, headers=JSON_CT)
        assert r.status_code == 200, r.text[:300]
        scores.append(r.json()["scores"][0])
    assert scores[0] == scores[1] > 0


def test_refusals_are_counted_and_the_service_keeps_answering(small_rm: Proc) -> None:
    def scrape() -> str:
        return httpx.get(small_rm.url + "/metrics").text

    before = scrape()
    big = body_of("/v1/compare", 2 * LIMIT)
    with httpx.Client(base_url=small_rm.url, headers=JSON_CT) as client:
        check_413(client.post("/v1/compare", content=big))
        check_413(client.post("/v1/compare", content=chunks(big)))
        ok = client.post("/v1/compare", content=body_of("/v1/compare", 200))
        assert ok.status_code == 200 and ok.json()["results"][0]["preferred"] == "a", ok.text
    after = scrape()
    errors = "reward_router_rm_errors_total"
    delta = metric(after, errors, type="body_too_large") - metric(
        before, errors, type="body_too_large"
    )
    assert delta == 2
    requests = "reward_router_rm_requests_total"
    assert metric(after, requests, status="413") - metric(before, requests, status="413") == 2
    assert httpx.get(small_rm.url + "/readyz").status_code == 200


def test_max_body_bytes_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(None, name="x", backend="length").max_body_bytes == 16 * 1024 * 1024
    with pytest.raises(ConfigError) as exc:
        load_settings(None, name="x", backend="length", max_body_bytes=1023)
    assert exc.value.field == "max_body_bytes" and "1024" in str(exc.value)
    cfg = write_config(tmp_path / "rm.yaml", name="x", backend="length", max_body_bytes=8192)
    assert load_settings(cfg).max_body_bytes == 8192
    monkeypatch.setenv("RR_RM_MAX_BODY_BYTES", "2048")  # the environment wins over the file
    assert load_settings(cfg).max_body_bytes == 2048
