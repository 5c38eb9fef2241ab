"""The package's shape: which way imports go (import-linter contracts in pyproject.toml), lint, no
module named like a public function, the CLI imported by nothing, and small modules."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import fastfuse

PACKAGE = Path(fastfuse.__file__).parent


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(PACKAGE)], "fastfuse.")]


def test_the_import_contracts_hold() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter), "--no-cache"], capture_output=True, text=True, cwd=PACKAGE.parent, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_code_is_linted_and_formatted() -> None:
    """``ruff check`` and ``ruff format --check`` (rules in pyproject.toml) on the package, tests, bench."""
    ruff = Path(sys.executable).with_name("ruff")
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run(
            [str(ruff), *command, "fastfuse", "tests", "bench"],
            capture_output=True,
            text=True,
            cwd=PACKAGE.parent,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_named_like_a_public_function() -> None:
    public = {name for name in fastfuse.__all__ if callable(getattr(fastfuse, name))}
    clashes = [m for m in _modules() if m.rsplit(".", 1)[-1] in public]
    assert clashes == []


def test_no_other_function_is_named_like_a_public_one() -> None:
    """``unpickler.load`` read like ``fastfuse.load``: a public name means one function."""
    import ast

    public = {name for name in fastfuse.__all__ if callable(getattr(fastfuse, name))}
    clashes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in public:
                module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                if getattr(fastfuse, node.name).__module__ != module:
                    clashes.append(f"{module}.{node.name}")
    assert clashes == []


def test_every_folder_is_one_kind() -> None:
    folders = sorted({m.split(".")[1] for m in _modules() if m.count(".") >= 2})
    assert folders == ["cli", "formats", "kernels", "planning", "sinks", "staging"]


MAX_MODULE_LINES = 410  # "about 400": a module past it owns more than one thing; split it


def test_modules_stay_small() -> None:
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
    assert sizes["kernels/engine.py"] > 100  # the walk found the package's modules
