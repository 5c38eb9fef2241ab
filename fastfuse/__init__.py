"""fastfuse: pre-fuse attention weights of Whisper (and other transformer) checkpoints.

Q, K and V stored as ``[out, in]`` matrices become one ``[in, 3*out]`` tensor, so that
``x @ W == concat(x @ Wq.T, x @ Wk.T, x @ Wv.T)``, in one parallel pass, bit-exact.

Importing fastfuse does not import numba; the kernels compile (or load from the on-disk cache)
the first time they are worth it. The file functions (``load``, ``fuse_file``, ``verify``,
``unfuse``) import their modules on first use, so that ``import fastfuse`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core import execute, fuse, plan, transpose_concat
from .errors import (
    DtypeMismatchError,
    FuseError,
    FuseFileNotFoundError,
    FusePermissionError,
    KeyConflictError,
    MalformedFileError,
    MissingTensorError,
    SchemeNotDetectedError,
    ShapeMismatchError,
)
from .plan import FusedTensor, Plan

if TYPE_CHECKING:
    from ._engine import warm_up
    from .inverse import unfuse
    from .loader import load
    from .recipe import verify
    from .sink import fuse_file

_LAZY = {"load": ".loader", "fuse_file": ".sink", "verify": ".recipe", "unfuse": ".inverse", "warm_up": "._engine"}

__version__ = "0.1.0"

__all__ = [
    "DtypeMismatchError",
    "FuseError",
    "FuseFileNotFoundError",
    "FusePermissionError",
    "FusedTensor",
    "KeyConflictError",
    "MalformedFileError",
    "MissingTensorError",
    "Plan",
    "SchemeNotDetectedError",
    "ShapeMismatchError",
    "__version__",
    "execute",
    "fuse",
    "fuse_file",
    "load",
    "plan",
    "transpose_concat",
    "unfuse",
    "verify",
    "warm_up",
]


def __getattr__(name: str) -> Any:
    """The file functions, imported on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fastfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
