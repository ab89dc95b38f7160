"""The import rules of docs/architecture.md hold, and break loudly when someone breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reward_router", "reward_router_cli", "gateway", "services", "trainer_client")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

needs_lint_imports = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[dev]')"
)


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_tree(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


@needs_lint_imports
def test_the_tree_keeps_every_contract() -> None:
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@needs_lint_imports
@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a room importing another room
        ("gateway/keys.py", "import services.errors", "gateway.keys -> services.errors"),
        # the ground importing a room
        ("reward_router/data.py", "import gateway.keys", "reward_router.data -> gateway.keys"),
        # the routing core importing I/O
        ("gateway/routing/posterior.py", "import redis", "gateway.routing.posterior -> redis"),
        # the light client importing the web framework
        ("trainer_client/errors.py", "import starlette", "trainer_client.errors -> starlette"),
    ],
)
def test_a_wrong_way_import_breaks_the_gate(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    tree = _copy_tree(tmp_path)
    with (tree / module).open("a") as fh:
        fh.write(f"\n{line}  # noqa: E402, F401\n")
    res = _lint_imports(tree)
    assert res.returncode != 0
    assert "0 broken" not in res.stdout
    assert broken in res.stdout


def test_import_trainer_client_loads_no_web_framework_or_torch() -> None:
    heavy = ("fastapi", "starlette", "uvicorn", "torch", "transformers", "trl", "gateway")
    code = f"import sys, trainer_client\nprint(','.join(m for m in {heavy!r} if m in sys.modules))"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
