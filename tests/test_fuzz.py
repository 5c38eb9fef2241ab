"""A bounded fuzz run of each reader (tests/fuzz_readers.py): a fixed budget of mutated inputs
from real seed files, deterministic seed, in a child process (hangs and memory are its own). Any
exception other than a FuseError, or 2 GB of memory, fails; no wall time is asserted (the child's
timeout only ends a hang)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fuzz_readers.py")
BUDGET = {"safetensors": 3000, "zip": 2000, "pickle": 3000}


def fuzz(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("target", sorted(BUDGET))
def test_mutation_fuzz(target: str) -> None:
    result = fuzz(target, "--inputs", str(BUDGET[target]), "--seed", "1", "--time-limit", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.startswith(f"{target}: {BUDGET[target] + 3}") or "inputs in" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
# atheris instruments every loaded module first (~27k functions with torch installed): minutes on a
# 2-core machine, over CI's budget. The coverage-guided run is the documented longer run.
@pytest.mark.skipif(not os.environ.get("FASTFUSE_FUZZ_ATHERIS"), reason="set FASTFUSE_FUZZ_ATHERIS=1 to run")
@pytest.mark.parametrize("target", sorted(BUDGET))
def test_coverage_guided_fuzz(target: str) -> None:
    result = fuzz(target, "--atheris", "--time-limit", "0", "--", "-runs=3000", "-seed=1")
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_time_limit_reaches_both_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--time-limit 0`` (what the tests pass: they assert no wall time) turns the per-input
    limit off in the coverage-guided driver too, libFuzzer's ``-timeout`` included."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import fuzz_readers

    seen: list[tuple[str, list[str], float]] = []
    monkeypatch.setattr(fuzz_readers, "_atheris", lambda *args: seen.append(args))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "pickle", "--atheris", "--time-limit", "0", "--", "-runs=1"])
    assert fuzz_readers.main() == 0
    assert seen == [("pickle", ["-runs=1"], 0.0)]
    slow = fuzz_readers.run_one(lambda data: time.sleep(0.02), b"", time_limit=0.01)
    assert slow is not None and slow.startswith("took")  # a limit, when given, still reports
    assert fuzz_readers.run_one(lambda data: time.sleep(0.02), b"", time_limit=0) is None
