"""Safetensors dtype codes: each code's element size and numpy dtype, and back.

>>> dtype_code(np.float16), ITEMSIZE["BF16"], dtype_of("F32")
('F16', 2, dtype('float32'))
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fastfuse.aliases import DTypeLike
from fastfuse.dtypes import ml_dtype
from fastfuse.errors import DtypeMismatchError

__all__ = ["DTYPES", "ITEMSIZE", "dtype_code", "dtype_of"]

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "C64": 8,
}
_NUMPY = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
    "C64": "<c8",
}
_ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


@functools.cache
def dtype_of(code: str) -> np.dtype[Any]:
    """numpy dtype of a safetensors dtype code (KeyError if unknown); ml_dtypes is imported
    only for BF16 and F8."""
    if code in _ML_DTYPES:
        return ml_dtype(_ML_DTYPES[code])
    return np.dtype(_NUMPY[code])


class _Dtypes(Mapping[str, "np.dtype[Any]"]):
    def __getitem__(self, code: str) -> np.dtype[Any]:
        return dtype_of(code)

    def __iter__(self) -> Iterator[str]:
        return iter(ITEMSIZE)

    def __len__(self) -> int:
        return len(ITEMSIZE)


#: Read-only mapping safetensors dtype code -> numpy dtype (lazy: see :func:`dtype_of`).
DTYPES: Mapping[str, np.dtype[Any]] = _Dtypes()


def dtype_code(dtype: DTypeLike) -> str:
    """Safetensors code of a numpy dtype (``"F32"``...); DtypeMismatchError if not storable."""
    dt = np.dtype(dtype)
    codes = [c for c in _NUMPY if dt == np.dtype(_NUMPY[c])]
    if not codes and dt.name in _ML_DTYPES.values():
        codes = [c for c in _ML_DTYPES if dt == dtype_of(c)]
    if not codes:
        raise DtypeMismatchError(
            f"dtype {dt.str} ({dt}) cannot be stored in safetensors; supported (little-endian): {', '.join(ITEMSIZE)}"
        )
    return codes[0]
