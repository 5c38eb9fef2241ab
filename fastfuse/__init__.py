"""fastfuse: pre-fuse attention weights of Whisper (and other transformer) checkpoints.

Q, K and V stored as ``[out, in]`` matrices become one ``[in, 3*out]`` tensor, so that
``x @ W == concat(x @ Wq.T, x @ Wk.T, x @ Wv.T)``, in one parallel pass, bit-exact.

Importing fastfuse does not import numba; the kernels compile (or load from the on-disk cache)
the first time they run.
"""

from __future__ import annotations

from ._engine import warm_up
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
from .inverse import unfuse
from .loader import load
from .plan import FusedTensor, Plan
from .recipe import verify
from .sink import fuse_file

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
