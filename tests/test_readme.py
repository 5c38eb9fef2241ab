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
def test_readme_python_examples_run(block: str) -> None:
    if "import torch" in block and importlib.util.find_spec("torch") is None:
        pytest.skip("this example needs torch (the hf or torch extra)")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own examples


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
