"""The pytest configuration itself: a failing property is reported as itself, and warnings
caused by fastfuse or the tests stay errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

THIRD_PARTY = """
import warnings


class Thing:
    def __repr__(self) -> str:  # a library deprecating something while hypothesis prints an example
        warnings.warn("repr is deprecated", DeprecationWarning, stacklevel=1)
        return "Thing()"
"""

TESTS = """
import warnings

from hypothesis import given, strategies as st
from thirdparty import Thing


@given(st.builds(Thing), st.integers(0, 10))
def test_property_fails(thing, x):
    assert x < 5, "the real failure"


def test_own_warning():
    warnings.warn("caused by the tests", UserWarning)
"""


def test_a_failing_property_is_reported_as_itself(tmp_path: Path) -> None:
    (tmp_path / "thirdparty.py").write_text(textwrap.dedent(THIRD_PARTY))
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(TESTS))
    argv = [sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"), f"--rootdir={tmp_path}"]
    result = subprocess.run(
        [*argv, "-p", "no:cacheprovider", str(tmp_path)], check=False, capture_output=True, text=True, cwd=tmp_path
    )
    out = result.stdout
    assert "FAILED test_generated.py::test_property_fails - AssertionError: the real failure" in out, out
    assert "FAILED test_generated.py::test_own_warning - UserWarning: caused by the tests" in out, out
    assert "INTERNALERROR" not in out + result.stderr
