"""CTranslate2's ``model.bin`` (binary version 6), read: each variable's name, dtype, shape and bytes.

The layout is the one ``fastfuse.sinks.ctranslate2_writer`` writes (see its docstring). Reading
maps the file; a variable's data is a zero-copy view.

Example:
    >>> TYPE_NAMES[4]
    'float16'
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from fastfuse.aliases import PathLike
from fastfuse.errors import MalformedFileError

__all__ = ["TYPE_NAMES", "ModelBin", "read_model_bin"]

TYPE_NAMES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


@dataclass
class ModelBin:
    """A parsed model.bin: spec, revision, variables (name -> (dtype, shape, bytes)) and aliases."""

    spec: str
    revision: int
    variables: dict[str, tuple[str, tuple[int, ...], memoryview]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


def read_model_bin(path: PathLike) -> ModelBin:
    """Parse ``path``; MalformedFileError naming the file for anything truncated or unknown."""
    path = Path(path)
    with open(path, "rb") as f:
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    at = 0

    def take(n: int) -> memoryview:
        nonlocal at
        if at + n > len(data):
            raise MalformedFileError(f"{path}: truncated at byte {at} (needs {n} more)")
        at += n
        return data[at - n : at]

    def number(fmt: str) -> int:
        return int(struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0])

    def string() -> str:
        return bytes(take(number("H")))[:-1].decode("utf-8")

    version = number("I")
    if version != 6:
        raise MalformedFileError(f"{path}: CTranslate2 binary version {version}, expected 6")
    model = ModelBin(string(), number("I"))
    for _ in range(number("I")):
        name = string()
        shape = tuple(number("I") for _ in range(number("B")))
        kind = number("B")
        if kind >= len(TYPE_NAMES):
            raise MalformedFileError(f"{path}: {name}: unknown type id {kind}")
        model.variables[name] = (TYPE_NAMES[kind], shape, take(number("I")))
    for _ in range(number("I")):
        alias = string()
        model.aliases[alias] = string()
    return model
