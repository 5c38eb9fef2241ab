"""The package's shape: which way imports go (import-linter contracts in pyproject.toml), no
module named like a public function, and the CLI imported by nothing."""

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


def test_no_module_is_named_like_a_public_function() -> None:
    public = {name for name in fastfuse.__all__ if callable(getattr(fastfuse, name))}
    clashes = [m for m in _modules() if m.rsplit(".", 1)[-1] in public]
    assert clashes == []


def test_every_folder_is_one_kind() -> None:
    folders = sorted({m.split(".")[1] for m in _modules() if m.count(".") >= 2})
    assert folders == ["cli", "formats", "kernels", "planning", "sinks", "staging"]
