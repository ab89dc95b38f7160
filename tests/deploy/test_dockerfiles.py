"""The Dockerfiles under deploy/docker: what they copy exists, what they run is a real command.

No Docker engine here, so the files are read: every COPY/ADD source must exist in the build
context (the repository root, as docker-compose.yml builds), must not be filtered out by the
Dockerfile's own ``.dockerignore``, the torch pin must be the project's, and the entrypoint plus
every command docker-compose.yml gives the image must resolve to a real ``reward-router``
sub-command with real options.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(
    p for p in (ROOT / "deploy" / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore"
)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    """An ENTRYPOINT/CMD argument: JSON array (exec form) or a shell string."""
    if args.startswith("["):
        parsed: list[str] = json.loads(args)
        return parsed
    return shlex.split(args)


def ignored(path: Path) -> list[str]:
    ign = path.with_name(path.name + ".dockerignore")
    lines = ign.read_text().splitlines() if ign.is_file() else []
    return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]


def is_ignored(src: str, patterns: list[str]) -> bool:
    parts = Path(src).parts
    return any(
        fnmatch.fnmatch(src, p) or (parts and fnmatch.fnmatch(parts[0], p)) for p in patterns
    )


def test_there_is_a_cpu_and_a_gpu_dockerfile() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile", "Dockerfile.gpu"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_ignored(path: Path) -> None:
    patterns = ignored(path)
    assert ".venv" in patterns, "the virtualenv must not be sent as build context"
    copies = [args for ins, args in instructions(path) if ins in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        *sources, _dest = words
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such path"
            assert not is_ignored(src, patterns), f"{path.name}: {src} is in .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_and_torch_pin(path: Path) -> None:
    ins = instructions(path)
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for i, args in ins if i == "RUN")
    pins = set(re.findall(r"torch==([\w.]+)", runs))
    project_pin = {
        m.group(1)
        for dep in PYPROJECT["project"]["optional-dependencies"]["train"]
        if (m := re.fullmatch(r"torch==([\w.]+)", dep))
    }
    assert pins == project_pin
    # torch before the project, or `pip install .[train]` resolves torch by itself.
    torch_at = runs.index("torch==")
    assert torch_at < runs.index('-e ".[train')
    if path.name == "Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs


def check_command(argv: list[str]) -> None:
    """Fail unless ``reward-router argv...`` names a real sub-command with real options."""
    from reward_router_cli.main import app

    # Typer's command tree (a group has a ``commands`` dict; typer vendors its own click, so
    # duck typing rather than isinstance).
    group: Any = typer.main.get_command(app)
    rest = list(argv)
    while hasattr(group, "commands") and rest and not rest[0].startswith("-"):
        sub = group.commands.get(rest[0])
        assert sub is not None, f"reward-router {' '.join(argv)}: no command {rest[0]!r}"
        group, rest = sub, rest[1:]
    if hasattr(group, "commands"):
        assert rest == ["--help"], f"reward-router {' '.join(argv)}: needs a sub-command"
        return
    options = {o for p in group.params for o in getattr(p, "opts", [])}
    options |= {o for p in group.params for o in getattr(p, "secondary_opts", [])}
    options.add("--help")
    used = [w for w in rest if w.startswith("--")]
    unknown = [w for w in used if w.split("=")[0] not in options]
    assert not unknown, f"reward-router {' '.join(argv)}: unknown options {unknown}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_the_console_script(path: Path) -> None:
    ins = dict(instructions(path))
    entry = exec_form(ins["ENTRYPOINT"])
    assert entry == ["reward-router"]
    assert PYPROJECT["project"]["scripts"]["reward-router"] == "reward_router_cli.main:main"
    check_command(exec_form(ins["CMD"]))


def test_compose_commands_are_real_subcommands() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for svc in compose["services"].values():
        if "build" not in svc:
            continue
        assert "deploy/docker/" in svc["build"]["dockerfile"]
        check_command([str(c) for c in svc["command"]])
        checked += 1
    assert checked >= 8


def test_check_command_rejects_what_does_not_exist() -> None:
    # The checks above are only worth something if they can fail.
    with pytest.raises(AssertionError, match="no command"):
        check_command(["rm", "serv", "--config", "x"])
    with pytest.raises(AssertionError, match="unknown options"):
        check_command(["gateway", "serve", "--konfig", "x"])
    check_command(["gateway", "serve", "--config", "deploy/gateway.yaml"])
