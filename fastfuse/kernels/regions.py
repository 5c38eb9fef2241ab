"""Fusion work described by buffers, byte offsets, strides and element sizes: no arrays, no keys.

A device engine cannot take numpy arrays: its memory is not the process's. So a fusion job
names a *buffer* (an index into the buffers the caller holds: one device allocation carved
into the results, a scratch allocation, ...), a byte offset in it, a 2-D shape, a row stride
in bytes and an element size. :class:`Move` is one part of a fused tensor: ``rows x cols``
elements at ``source`` become ``cols x rows`` (``transpose``, the ``in_out`` layout) or
``rows x cols`` (``out_in``, biases) at ``destination``, widened from float16/bfloat16 to
float32 bits when ``widen`` names the source type, or zeros when ``source`` is None (a missing
bias). Engines that run moves: :func:`run_moves_numpy` here (the reference, for host buffers,
and what CI runs) and ``cuda_engine.run_moves`` (torch ops on the device, at HBM speed).

Example: the first column block of a ``[4, 6]`` float32 output from a ``[2, 4]`` part::

    Move(Region(0, 0, 2, 4, 16, 4), Region(1, 0, 4, 2, 24, 4), transpose=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastfuse.kernels.numpy_engine import widen_bits

__all__ = ["Move", "Placement", "Region", "run_moves_numpy"]


@dataclass(frozen=True)
class Region:
    """``rows x cols`` elements of ``itemsize`` bytes, row ``r`` at ``offset + r * row_stride`` of
    buffer number ``buffer``; the elements of a row are adjacent."""

    buffer: int
    offset: int
    rows: int
    cols: int
    row_stride: int
    itemsize: int

    @property
    def span(self) -> int:
        """Bytes from the first element to just past the last."""
        if not self.rows or not self.cols:
            return 0
        return (self.rows - 1) * self.row_stride + self.cols * self.itemsize


@dataclass(frozen=True)
class Move:
    """One part of a fused tensor: ``source`` (``[rows, cols]``, or None for zeros) into
    ``destination`` (``[cols, rows]`` when ``transpose``, else ``[rows, cols]``).

    ``widen``: ``"float16"`` or ``"bfloat16"`` when the source holds those bits and the
    destination float32 (exact, NaN payloads kept); None copies bits.
    """

    source: Region | None
    destination: Region
    transpose: bool = False
    widen: str | None = None


@dataclass(frozen=True)
class Placement:
    """A result tensor: ``shape`` of ``dtype`` at byte ``offset`` of buffer 0, C-contiguous."""

    key: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _view(buffers: Sequence[np.ndarray], region: Region) -> np.ndarray:
    """The numpy view of ``region`` (unsigned integers of its element size)."""
    flat = buffers[region.buffer]
    span = flat[region.offset : region.offset + region.span] if region.span else flat[:0]
    dtype = np.dtype(f"u{region.itemsize}")
    return (
        np.ndarray((region.rows, region.cols), dtype, buffer=span, strides=(region.row_stride, region.itemsize))
        if region.span
        else np.empty((region.rows, region.cols), dtype)
    )


def run_moves_numpy(buffers: Sequence[np.ndarray], moves: Sequence[Move]) -> None:
    """Run ``moves`` over host buffers (flat, writable uint8 arrays), bit for bit as the kernels.

    >>> src, out = np.arange(8, dtype=np.float32).view(np.uint8), np.zeros(24, np.uint8)
    >>> run_moves_numpy([src, out], [Move(Region(0, 0, 2, 3, 12, 4), Region(1, 0, 3, 2, 8, 4), transpose=True)])
    >>> out[:24].view(np.float32).reshape(3, 2).tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    for move in moves:
        destination = _view(buffers, move.destination)
        if move.source is None:
            destination[...] = 0
            continue
        bits = _view(buffers, move.source)
        if move.widen is not None:
            bits = widen_bits(bits, move.widen)
        destination[...] = bits.T if move.transpose else bits
