"""Type aliases shared by the package (one place, as opt_einsum does)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, TypedDict, Union

import numpy as np

DTypeLike = Union[str, type, "np.dtype[Any]"]
PathLike = Union[str, "os.PathLike[str]"]


class TensorLike(Protocol):
    """What planning needs of a tensor: a numpy array, or a file header entry."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...


class FuseKwargs(TypedDict, total=False):
    """The keyword options of ``plan``, ``fuse``, ``load`` and ``fuse_file``: exactly the fields of
    ``fastfuse.planning.options.FuseOptions`` (same names and types; tests/test_options.py checks),
    so that a type checker knows them. Their meaning: ``fastfuse.plan``."""

    cross_kv: bool
    logits: bool
    convert: bool
    keep_originals: bool | None
    dtype: DTypeLike | None
    scheme: str
    names: Mapping[str, str] | None
    overwrite: bool
    layout: str | None
    tp: int
    rank: int | None
    heads: int | None
    kv_heads: int | None
    target: str
    quantization: str | None
    tokenizer_from: str | None
