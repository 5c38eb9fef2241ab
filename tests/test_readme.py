"""The README tells the truth: its examples run, and CI runs its test command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 2, "the README lost its Python examples"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example-{n}" for n in range(len(BLOCKS))])
def test_readme_python_examples_run(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example runs, and leaves nothing behind in the temporary folders it makes."""
    import tempfile

    if "import torch" in block and importlib.util.find_spec("torch") is None:
        pytest.skip("this example needs torch (the hf or torch extra)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    scope: dict[str, object] = {}  # kept alive: a folder left to a finalizer is a leftover
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own examples
    assert list(scratch.iterdir()) == []


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    command = ci[-1]
    assert command == 'PIP_CONSTRAINT=.ci/constraints.txt pip install -e ".[test,hf]" && pytest'
    assert f"```bash\n{command}\n```" in README


def test_the_readme_lists_every_cli_command() -> None:
    from fastfuse.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"fastfuse {name}" in README, name
