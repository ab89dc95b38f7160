"""A pool of RM services: its YAML file, collecting behaviour files, accuracy tables.

A pool file lists the RM services of a pool; each entry points at a service YAML file
(relative to the pool file) and may give the URL it runs at (default ``http://HOST:PORT`` of
that file)::

    rms:
      - config: chat-rm.yaml
      - config: judge.yaml
        url: http://judge.internal:8104
        api_key: ...        # optional; default the service file's own api_key

When a member has a key (the entry's ``api_key``, else its service file's / ``RR_RM_API_KEY``),
``collect`` sends it as ``Authorization: Bearer <key>``.

``collect`` sends every pair to every RM's ``/v1/compare`` (chosen as ``response_a``) and
writes one behaviour line per (pair, RM) in the format of data/README.md: ``correct`` is 1 when
the RM preferred the chosen response, 0 when the rejected one, 0.5 for a tie (an abstaining
verifier ties), with the RM's two scores. The offline router trains on such a file exactly as
on the published RM outputs.

>>> pool = load_pool("deploy/rms/pool.yaml")                           # doctest: +SKIP
>>> collect(load_pairs("pairs.jsonl.gz"), pool, Path("behavior.jsonl.gz"))  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from reward_router.data import Pair, load_behavior
from reward_router.errors import ConfigError
from reward_router.readiness import is_ready
from services.settings import ServiceSettings, load_settings, read_yaml


@dataclass(frozen=True)
class PoolMember:
    """One RM of a pool: its settings file, its settings, where it answers."""

    config: Path
    settings: ServiceSettings
    url: str
    # `rm evaluate` scores this RM on only the first `eval_limit` pairs of each column's sample
    # (for RMs too slow on a CPU to score the whole sample, e.g. an LM judge).
    eval_limit: int | None = None
    # The service's key: the pool entry's ``api_key``, else the service settings' own.
    api_key: SecretStr | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def headers(self) -> dict[str, str]:
        """The auth header for this member's service (none when it has no key)."""
        if self.api_key is None:
            return {}
        return {"authorization": f"Bearer {self.api_key.get_secret_value()}"}


def load_pool(path: str | Path) -> list[PoolMember]:
    """Read a pool file; every entry's service settings are validated now."""
    p = Path(path)
    data = read_yaml(p)
    entries = data.get("rms")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("rms", f"{p}: must be a non-empty list of {{config, url?}} entries")
    members: list[PoolMember] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), str):
            raise ConfigError(f"rms[{i}].config", f"{p}: each entry needs a 'config' file")
        cfg = (p.parent / entry["config"]).resolve()
        settings = load_settings(cfg)
        url = entry.get("url") or f"http://{settings.host}:{settings.port}"
        limit = entry.get("eval_limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"rms[{i}].eval_limit", f"{p}: must be a positive integer")
        key = entry.get("api_key")
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigError(f"rms[{i}].api_key", f"{p}: must be a non-empty string")
        api_key = SecretStr(key) if key else settings.api_key
        members.append(PoolMember(cfg, settings, str(url).rstrip("/"), limit, api_key))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError("rms", f"{p}: RM names must be unique, got {names}")
    return members


@contextmanager
def started(members: Sequence[PoolMember], timeout_s: float = 600.0) -> Iterator[None]:
    """Start (as child processes) the members not already answering; stop them after."""
    import subprocess
    import time

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for m in members:
            if is_ready(m.url):
                continue
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services", "serve", "--config", str(m.config)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + timeout_s
        for m in members:
            while not is_ready(m.url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rm {m.name} at {m.url} not ready within {timeout_s}s")
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"an RM service exited during start-up (rm {m.name}?)")
                time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _compare_all(
    member: PoolMember,
    pairs: Sequence[Pair],
    batch_size: int,
    timeout_s: float,
    progress: Callable[[int], None],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with httpx.Client(base_url=member.url, timeout=timeout_s, headers=member.headers()) as client:
        info = client.get("/v1/info")
        if info.status_code != 200:
            raise RuntimeError(f"rm {member.name} answered {info.status_code}: {info.text[:500]}")
        limit = int(info.json().get("max_request_items", batch_size))
        step = max(1, min(batch_size, limit))
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            body = {
                "pairs": [
                    {
                        "prompt": p.prompt,
                        "response_a": p.chosen,
                        "response_b": p.rejected,
                        "reference": p.reference,
                    }
                    for p in chunk
                ]
            }
            r = client.post("/v1/compare", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"rm {member.name} answered {r.status_code}: {r.text[:500]}")
            got = r.json()["results"]
            if len(got) != len(chunk):
                raise RuntimeError(f"rm {member.name} returned {len(got)} of {len(chunk)} results")
            results.extend(got)
            progress(len(chunk))
    return results


def collect(
    pairs: Sequence[Pair],
    members: Sequence[PoolMember],
    out: Path,
    *,
    batch_size: int = 32,
    timeout_s: float = 600.0,
    progress: bool = False,
) -> int:
    """Ask every RM about every pair (RMs in parallel) and write the behaviour file.

    Returns the number of lines written (pairs x RMs).
    """
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        tasks = {m.name: bar.add_task(m.name, total=len(pairs)) for m in members}

        def run(m: PoolMember) -> list[dict[str, Any]]:
            return _compare_all(
                m, pairs, batch_size, timeout_s, lambda n: bar.update(tasks[m.name], advance=n)
            )

        with ThreadPoolExecutor(max_workers=len(members)) as ex:
            answers = dict(zip([m.name for m in members], ex.map(run, members), strict=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    opener: Callable[..., Any] = gzip.open if out.suffix == ".gz" else open
    lines = 0
    with opener(out, "wt", encoding="utf-8") as fh:
        for i, pair in enumerate(pairs):
            for m in members:
                res = answers[m.name][i]
                correct = {"a": 1.0, "b": 0.0, "tie": 0.5}[res["preferred"]]
                row = {
                    "pair_id": pair.id,
                    "rm": m.name,
                    "correct": correct,
                    "score_chosen": res["score_a"],
                    "score_rejected": res["score_b"],
                }
                fh.write(json.dumps(row) + "\n")
                lines += 1
    return lines


def accuracy_table(
    pairs: Sequence[Pair], behavior: Path, by: str = "domain"
) -> tuple[list[str], dict[str, dict[str, tuple[float, int]]]]:
    """Mean ``correct`` per RM per group (``domain`` | ``source`` | ``subset`` | ``all``).

    Returns the RM names and ``{group: {rm: (accuracy, n_pairs)}}``.
    """
    if by not in ("domain", "source", "subset", "all"):
        raise ConfigError("by", f"must be domain, source, subset or all, got {by!r}")
    matrix = load_behavior(behavior, pairs)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(matrix.pairs):
        rows["all" if by == "all" else str(getattr(pair, by))].append(i)
    table: dict[str, dict[str, tuple[float, int]]] = {}
    for group, idx in sorted(rows.items()):
        table[group] = {
            rm: (float(matrix.correct[idx, n].mean()), len(idx)) for n, rm in enumerate(matrix.rms)
        }
    return matrix.rms, table


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy over ``n`` pairs (ties make the true one a bit smaller).

    >>> round(binomial_se(0.5, 100), 3)
    0.05
    """
    return math.sqrt(max(acc * (1 - acc), 0.0) / n) if n > 0 else float("nan")


def matrix_summary(pairs: Sequence[Pair], behavior: Path) -> dict[str, Any]:
    """What routing can gain on a behaviour matrix: best single RM, the best RM of each domain
    (chosen on the same pairs, so an upper bound for a domain-aware router), majority vote of
    every RM, and the oracle (the best any RM did on each pair: 1, or 0.5 for a tie), each as
    ``(accuracy, standard error)``."""
    matrix = load_behavior(behavior, pairs)
    c = matrix.correct
    n = matrix.n_pairs
    per_rm = c.mean(axis=0)
    best = int(per_rm.argmax())
    domains = sorted({p.domain for p in matrix.pairs})
    dom = [p.domain for p in matrix.pairs]
    best_in: dict[str, str] = {}
    routed = 0.0
    for d in domains:
        idx = [i for i, x in enumerate(dom) if x == d]
        j = int(c[idx].mean(axis=0).argmax())
        best_in[d] = matrix.rms[j]
        routed += float(c[idx, j].sum())
    votes = (2.0 * c - 1.0).sum(axis=1)
    majority = float(((votes > 0) + 0.5 * (votes == 0)).mean())
    oracle = float(c.max(axis=1).mean())  # a tie is worth 0.5, as in the replay

    def cell(acc: float) -> tuple[float, float]:
        return acc, binomial_se(acc, n)

    return {
        "pairs": n,
        "rms": matrix.rms,
        "best_single": (matrix.rms[best], *cell(float(per_rm[best]))),
        "best_per_domain": (best_in, *cell(routed / n)),
        "majority": cell(majority),
        "oracle": cell(oracle),
    }


def markdown_table(
    columns: dict[str, dict[str, tuple[float, int]]], rms: Sequence[str], *, se: bool = False
) -> str:
    """RMs as rows, the given columns (e.g. eval sets) as columns, best per column in bold.

    A cell measured on fewer pairs than its column's largest count shows its own ``n``; with
    ``se`` each cell shows its binomial standard error.
    """
    names = list(columns)
    size = {c: max(n for _, n in columns[c].values()) for c in names}
    head = "| RM | " + " | ".join(f"{c} (n={size[c]})" for c in names)
    lines = [head + " |", "|---|" + "---:|" * len(names)]
    best = {c: max(v[0] for v in columns[c].values()) for c in names}
    for rm in rms:
        cells = []
        for c in names:
            acc, n = columns[c].get(rm, (float("nan"), 0))
            text = f"{acc:.3f}"
            text = f"**{text}**" if acc == best[c] else text
            if se:
                text += f" ± {binomial_se(acc, n):.3f}"
            cells.append(text if n == size[c] else f"{text} (n={n})")
        lines.append(f"| {rm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeded_sample(pairs: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """At most ``limit`` pairs in a seeded random order. Prefix-stable: the sample of 100 is the
    first 100 of the sample of 200, so a smaller ``eval_limit`` or ``--limit`` reuses work.

    >>> [p for p in seeded_sample(list(range(10)), 3)] == seeded_sample(list(range(10)), 5)[:3]
    True
    """
    order = list(pairs)
    random.Random(seed).shuffle(order)
    return order if limit is None else order[:limit]


def _reusable(path: Path, pairs: Sequence[Pair], rm: str) -> bool:
    """Whether ``path`` already holds ``rm``'s lines for exactly these pairs."""
    if not path.exists():
        return False
    try:
        matrix = load_behavior(path, pairs)
    except ValueError:
        return False
    return matrix.rms == [rm] and matrix.n_pairs == len(pairs) and matrix.skipped_pairs == 0


def run_evaluation(
    members: Sequence[PoolMember],
    out_dir: Path,
    *,
    data_dir: Path = Path("data/pairs"),
    limit: int = 200,
    eval_sets: Sequence[str] = (
        "rm-bench",
        "llmbar",
        "hhh-alignment",
        "evalbiasbench",
        "rewardbench-math-prm",
    ),
    seed: int = 0,
    reuse: bool = False,
    progress: bool = True,
) -> str:
    """Held-out accuracy of every pool RM on chat / safety / math and on the eval sets.

    Each column is a seeded sample of at most ``limit`` pairs (a member's ``eval_limit`` takes
    the first pairs of it). One behaviour file per (column, RM) lands in ``out_dir``; with
    ``reuse`` a file already there for the same pairs is read instead of asking the RM again,
    so an interrupted evaluation resumes. Writes and returns the markdown table.
    """
    from reward_router.data import load_pairs
    from services.train import domain_split

    sets: list[tuple[str, list[Pair]]] = []
    for domain in ("chat", "safety", "math"):
        _, held = domain_split(domain, data_dir)
        sets.append((f"{domain} held-out", held))
    for name in eval_sets:
        sets.append((name, load_pairs(data_dir / f"{name}.jsonl.gz")))
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: dict[str, dict[str, tuple[float, int]]] = {}

    def one(label: str, sample: Sequence[Pair], m: PoolMember) -> tuple[float, int]:
        mine = sample[: m.eval_limit] if m.eval_limit else sample
        path = out_dir / f"{label.replace(' ', '-')}.{m.name}.behavior.jsonl.gz"
        if not (reuse and _reusable(path, mine, m.name)):
            collect(mine, [m], path, progress=progress)
        _, table = accuracy_table(mine, path, by="all")
        return table["all"][m.name]

    for label, pairs in sets:
        sample = seeded_sample(pairs, limit, seed)
        with ThreadPoolExecutor(max_workers=len(members)) as ex:
            cells = list(ex.map(lambda m, lb=label, sm=sample: one(lb, sm, m), members))
        columns[label] = {m.name: cell for m, cell in zip(members, cells, strict=True)}
    text = markdown_table(columns, [m.name for m in members])
    (out_dir / "accuracy.md").write_text(text + "\n")
    return text


def open_all(members: Sequence[PoolMember], start: bool) -> ExitStack:
    """An ExitStack that, with ``start``, owns the started services."""
    stack = ExitStack()
    if start:
        stack.enter_context(started(members))
    return stack
