"""Array conversions of CTranslate2's converter, in numpy, bit for bit (no key names here).

Each function works on a block of rows, so a caller streams a tensor of any size through
bounded buffers: float casts with torch's ``.to`` rounding, int8 with one float32 scale per
row (the scale multiplies; CTranslate2 dequantizes ``q / scale``), int16 with one scale per
tensor, and a content digest that treats ``-0.0`` as ``0.0`` (the converter aliases equal values).

Example:
    >>> import numpy as np
    >>> q, scale = int8_rows(np.array([[0.5, -1.0], [0.0, 0.0]], np.float32))
    >>> q.tolist(), scale.tolist()
    ([[64, -127], [0, 0]], [127.0, 1.0])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastfuse.dtypes import as_dtype

__all__ = ["Digest", "cast", "int8_rows", "int16_rows", "int16_scale"]

_TINY = np.float32(127) / np.finfo(np.float32).max
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64, 1: np.uint8}


def cast(block: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """``block`` as ``dtype`` (float32, float16 or bfloat16) rounded as torch's ``.to`` rounds.

    float32 -> bfloat16 rounds to nearest even on the bits (NaN becomes 0x7FC0, torch's scalar
    path); bfloat16 -> float16 goes through float32 (exact). Same dtype: ``block`` itself.
    """
    if block.dtype.name == dtype:
        return block
    if block.dtype.name == "bfloat16":
        block = block.astype(np.float32)
    if dtype != "bfloat16":
        with np.errstate(over="ignore"):  # out of float16's range is inf, as in torch
            return block.astype(dtype)
    wide = np.ascontiguousarray(block, dtype=np.float32)
    bits = wide.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    rounded[np.isnan(wide)] = 0x7FC0
    return rounded.view(as_dtype("bfloat16"))


def int8_rows(block: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``(int8 values, float32 scale per row)`` of a 2-D or 3-D block (rows: the first axis).

    ``scale = 127 / max|row|`` (an all-zero row gets 1.0), ``q = rint(row * scale)`` rounding
    half to even, as CTranslate2's converter computes it in float32.
    """
    values = np.array(block, dtype=np.float32).reshape(block.shape[0], -1)
    amax = np.amax(np.absolute(values), axis=1)
    amax[amax == 0] = 127.0
    scale = np.float32(127) / np.maximum(amax, _TINY)
    values *= scale[:, None]
    return np.rint(values).astype(np.int8).reshape(block.shape), scale


def int16_scale(amax: float) -> np.float32:
    """The one float32 scale of an int16 tensor whose largest magnitude is ``amax``."""
    return np.float32(np.float32(2**10) / np.float32(amax))


def int16_rows(block: np.ndarray[Any, Any], scale: np.float32) -> np.ndarray[Any, Any]:
    """``clip(rint(block * scale))`` as int16, in float32."""
    values = np.array(block, dtype=np.float32) * scale
    quantized: np.ndarray[Any, Any] = np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    return quantized


class Digest:
    """A running content digest of a float tensor's values: ``-0.0`` counts as ``0.0``; ``nan`` is
    recorded (a tensor holding NaN equals nothing, not even itself)."""

    def __init__(self) -> None:
        import hashlib

        self._hash = hashlib.blake2b(digest_size=20)
        self.has_nan = False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def update(self, block: np.ndarray[Any, Any]) -> None:
        """Add ``block``'s values (C order)."""
        flat = np.ascontiguousarray(block).reshape(-1)
        bits = flat.view(_UNSIGNED[flat.dtype.itemsize])
        negative_zero = bits.dtype.type(1 << (8 * flat.dtype.itemsize - 1))
        if np.any(bits == negative_zero):
            bits = np.where(bits == negative_zero, bits.dtype.type(0), bits)
        self.has_nan = self.has_nan or bool(np.isnan(flat).any())
        self._hash.update(np.ascontiguousarray(bits).tobytes())
