"""Dtype rules: which element types the kernels move and which conversions exist."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastfuse.aliases import DTypeLike
from fastfuse.errors import DtypeMismatchError

__all__ = ["ML_DTYPE_NAMES", "WIDENINGS", "as_dtype", "check_movable", "ml_dtype", "result_dtype"]

# (source dtype name, destination dtype name) -> kernel conversion mode, besides identity (0).
WIDENINGS = {("float16", "float32"): 1, ("bfloat16", "float32"): 2}

#: The element types numpy has only through ml_dtypes, by the name numpy, torch and ml_dtypes share.
ML_DTYPE_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")


def ml_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype ml_dtypes defines as ``name`` (one of :data:`ML_DTYPE_NAMES`); ml_dtypes is
    imported now, not before. AttributeError when the installed ml_dtypes lacks it (older versions
    lack some float8 types).

    >>> ml_dtype("bfloat16").itemsize
    2
    """
    import ml_dtypes

    dtype: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
    return dtype


def as_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """``np.dtype(dtype)``, also for ``"bfloat16"`` (imports ml_dtypes only when asked) and for a
    torch dtype (``torch.float32``, by its name; torch is not imported)."""
    if type(dtype).__module__ == "torch":  # torch.dtype: "torch.float32" -> "float32"
        dtype = str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        return ml_dtype("bfloat16")
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise DtypeMismatchError(
            f"unknown dtype {dtype!r} ({exc}); expected a numpy or torch dtype, or a name such as "
            "'float32', 'float16' or 'bfloat16'"
        ) from None


def result_dtype(source: np.dtype[Any], requested: DTypeLike | None) -> np.dtype[Any]:
    """The fused dtype for ``source`` parts: ``source`` itself, or ``requested`` if reachable.

    Supported conversions: identity, and float16 / bfloat16 -> float32 (exact widening).
    Raises DtypeMismatchError for anything else, naming both dtypes.
    """
    if requested is None:
        return source
    target = as_dtype(requested)
    if target == source or (source.name, target.name) in WIDENINGS:
        return target
    raise DtypeMismatchError(
        f"cannot fuse {source.name} parts into {target.name}: fastfuse moves bits and only "
        f"widens float16/bfloat16 to float32; pass dtype=None to keep {source.name}"
    )


def check_movable(dtype: np.dtype[Any], where: str) -> None:
    """Raise DtypeMismatchError unless the kernels can move ``dtype`` (plain 1/2/4/8 bytes)."""
    if dtype.itemsize not in (1, 2, 4, 8) or dtype.hasobject or dtype.fields is not None:
        raise DtypeMismatchError(f"{where}: dtype {dtype} is not a plain 1, 2, 4 or 8-byte element type")
