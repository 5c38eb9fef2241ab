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

from fastfuse.errors import (
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
from fastfuse.fusion import execute, fuse, plan, transpose_concat
from fastfuse.planning.planner import FusedTensor, Plan

if TYPE_CHECKING:
    from fastfuse.kernels.engine import warm_up
    from fastfuse.loading import load
    from fastfuse.sinks.file_writer import fuse_file
    from fastfuse.sinks.unfusing import unfuse
    from fastfuse.sinks.verification import verify

_LAZY = {
    "load": ".loading",
    "fuse_file": ".sinks.file_writer",
    "verify": ".sinks.verification",
    "unfuse": ".sinks.unfusing",
    "warm_up": ".kernels.engine",
}

from fastfuse.version import __version__

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


def __dir__() -> list[str]:
    """The module's names, the lazily imported file functions included (``dir(fastfuse)``)."""
    return sorted(set(globals()) | set(_LAZY))
