"""One source for the options: ``FuseOptions`` defines them; the typed keywords (``FuseKwargs``),
``plan``'s docstring, the CLI's flags and ``--help`` choices, and the README's code (under
``mypy --strict``) must agree with it."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest

import fastfuse
from fastfuse import aliases
from fastfuse.aliases import FuseKwargs
from fastfuse.cli.main import build_parser
from fastfuse.planning import options as options_module
from fastfuse.planning.options import WRITE_ONLY, FuseOptions, options

ROOT = Path(__file__).resolve().parent.parent


def _subcommand(name: str) -> typing.Any:
    return build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


def _flags(parser: typing.Any) -> dict[str, typing.Any]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_the_typed_keywords_are_the_options() -> None:
    namespace = {**vars(aliases), **vars(options_module)}  # DTypeLike names np.dtype lazily
    declared = typing.get_type_hints(FuseOptions, globalns=namespace)
    typed = typing.get_type_hints(FuseKwargs)
    assert typed == declared


def test_plan_documents_every_option_and_no_other() -> None:
    doc = fastfuse.plan.__doc__ or ""
    args = doc.split("Args:")[1].split("Every option")[0]
    documented = {
        name.strip() for line in re.findall(r"^ {8}(\w[\w, ]*):", args, flags=re.MULTILINE) for name in line.split(",")
    }
    assert documented - {"tensors"} == {f.name for f in fields(FuseOptions)}


@pytest.mark.parametrize(("command", "writes"), [("fuse", True), ("inspect", False)])
def test_the_cli_flags_are_derived_from_the_options(command: str, writes: bool) -> None:
    flags = _flags(_subcommand(command))
    for option in options():
        offered = option.flag is not None and (option.scope != WRITE_ONLY or writes)
        assert (option.flag in flags) == offered, option.name
        if offered:
            action = flags[option.flag]
            assert action.dest == option.name
            assert action.default is None  # not given: the library's default holds
            assert action.choices == (list(option.choices) if option.choices else None) or tuple(
                action.choices or ()
            ) == (option.choices or ())


def test_flags_reach_the_options_by_name() -> None:
    from fastfuse.cli.main import _options

    args = _subcommand("fuse").parse_args(["a", "b", "--drop-originals", "--tp", "2", "--layout", "out_in"])
    assert _options(args) == {"keep_originals": False, "tp": 2, "layout": "out_in"}
    assert _options(_subcommand("fuse").parse_args(["a", "b"])) == {}


def test_choices_come_from_the_rules() -> None:
    by_name = {option.name: option for option in options()}
    assert by_name["target"].choices == tuple(fastfuse.planning.rules.TARGETS)
    assert set(by_name["scheme"].choices or ()) == {"auto"} | {s.name for s in fastfuse.planning.rules.SCHEMES}
    assert by_name["layout"].choices == options_module.LAYOUTS


def test_the_readme_code_type_checks_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python(?: no-run)?\n(.*?)```", readme, flags=re.DOTALL)
    # The no-run snippets name a model the reader has; give those names a type.
    preamble = "from typing import Any\nimport fastfuse\nllama_state_dict: dict[str, Any] = {}\n"
    for n, block in enumerate(blocks):
        (tmp_path / f"readme_{n}.py").write_text(preamble + block)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            ".",
        ],
        cwd=tmp_path,
        env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
