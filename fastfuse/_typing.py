"""Type aliases shared by the package (one place, as opt_einsum does)."""

from __future__ import annotations

import os
from typing import Any, Protocol, Union

import numpy as np

DTypeLike = Union[str, type, "np.dtype[Any]"]
PathLike = Union[str, "os.PathLike[str]"]


class TensorLike(Protocol):
    """What planning needs of a tensor: a numpy array, or a file header entry."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...
