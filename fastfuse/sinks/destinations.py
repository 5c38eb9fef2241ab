"""Where outputs may go: destination names and sizes, and what an earlier output in a folder was.

Knows paths and fastfuse's own file names, not formats or plans.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError
from fastfuse.formats.checkpoint import INDEX_NAME, SINGLE_NAME, TP_INDEX_NAME

__all__ = ["check_destination", "parse_size", "previous_output"]

_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_RANK_NAME = re.compile(r"rank-\d+-of-\d+\.safetensors")


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an integer (as transformers reads sizes)."""
    if isinstance(text, int):
        size = text
    else:
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        number = text.strip().upper().rstrip("BIKMGT")
        try:
            size = int(float(number) * units[text.strip().upper()[len(number) :]])
        except (KeyError, ValueError):
            raise FuseError(f"max shard size {text!r}: expected bytes like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise FuseError(f"max shard size {text!r}: expected a positive size")
    return size


def check_destination(sources: Iterable[PathLike], dst: Path, *, folder: bool, why: str = "") -> None:
    """Refuse a destination whose name does not say what it will be, or that is a source.

    A single file must be called ``*.safetensors`` (fastfuse writes nothing else); a folder of
    files must not be. A source file, or (for folders) the folder of a source, is never a
    destination.
    """
    suffix = dst.suffix.lower()
    if folder and suffix == ".safetensors":
        raise FuseError(f"{dst}: this output is a folder of files ({why}); give a folder name without .safetensors")
    if not folder and suffix != ".safetensors":
        wrote = " (fastfuse writes safetensors, never torch files)" if suffix in (".bin", ".pt", ".pth") else ""
        if dst.is_dir():
            raise FuseError(
                f"{dst}: is a folder, and a fused checkpoint file must be named *.safetensors; pass "
                f"{dst / SINGLE_NAME} (or a folder source, to write a model folder)"
            )
        raise FuseError(f"{dst}: a fused checkpoint file must be named *.safetensors{wrote}")
    if not dst.exists():
        return
    for source in sources:
        if os.path.samefile(source, dst) or (
            dst.is_dir() and os.path.samefile(os.path.dirname(os.path.abspath(source)), dst)
        ):
            raise FuseError(f"destination {dst} is the source checkpoint or its folder; write to a new path")


def previous_output(folder: Path) -> set[str]:
    """Names of the files an earlier fastfuse output in ``folder`` consists of (its index and
    the shards or ranks it lists, as fastfuse names them); unreadable indexes count for nothing."""
    names: set[str] = set()
    for index_name, pattern, field in ((INDEX_NAME, _SHARD_NAME, "weight_map"), (TP_INDEX_NAME, _RANK_NAME, "ranks")):
        try:
            listed = json.loads((folder / index_name).read_text())[field]
            listed = listed.values() if isinstance(listed, dict) else listed
            files = {name for name in listed if isinstance(name, str) and pattern.fullmatch(name)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        names |= files | {index_name}
    return names
