"""Fusion work described by memory, never by arrays or keys: where the bytes are, their strides
and element size.

Two ways to name memory, for two kinds of engine:

- :class:`Block`: ``rows x cols`` elements at a byte *address* of a device's memory, with a row
  and a column stride in bytes (any strides: a transposed, sliced or memory-mapped view is a
  block too). The host engines (``engine.run_copies``: the numba kernels, or numpy) run
  :class:`Copy` jobs between blocks; callers build them from arrays (:meth:`Copy.of`: each
  block holds its array, so the memory lives as long as the job).
- :class:`Region`: the same, at a byte offset of a *buffer* the caller holds and numbers (one
  device allocation carved into the results, a scratch allocation, ...), its rows' elements
  adjacent. A device engine cannot take an address of the process's memory; it runs
  :class:`Move` jobs over its buffers. :class:`Move` is one part of a fused tensor: ``rows x
  cols`` elements at ``source`` become ``cols x rows`` (``transpose``, the ``in_out`` layout) or
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
from typing import Any, NamedTuple

import numpy as np

from fastfuse.kernels.numpy_engine import widen_bits

__all__ = ["Block", "Copy", "Move", "Placement", "Region", "run_moves_numpy"]


class Block(NamedTuple):
    """``rows x cols`` elements of ``itemsize`` bytes in the memory of ``device``: element ``(r, c)``
    at byte address ``address + r * row_stride + c * col_stride`` (strides may be negative).
    ``owner``: what keeps that memory alive. A block made by :meth:`of` (or its :attr:`T`) holds
    the numpy array it *is*, which the numpy engine then uses as it is, saving a view per block.
    (Blocks and copies are named tuples, not dataclasses: a fusion builds hundreds per call, and a
    frozen dataclass costs three times as much to make.)"""

    address: int
    rows: int
    cols: int
    row_stride: int
    col_stride: int
    itemsize: int
    device: str = "cpu"
    owner: object = None

    @classmethod
    def of(cls, array: np.ndarray) -> Block:
        """The block of a 2-D numpy array (host memory; any strides, read-only or not).

        >>> block = Block.of(np.zeros((3, 4), np.float32)[:, 1:].T)
        >>> block.rows, block.cols, block.row_stride, block.col_stride, block.itemsize
        (3, 3, 4, 16, 4)
        """
        rows, cols = array.shape
        row_stride, col_stride = array.strides
        return cls(array.ctypes.data, rows, cols, row_stride, col_stride, array.itemsize, "cpu", array)

    @property
    def T(self) -> Block:
        """The same elements as ``cols x rows``."""
        rows, cols, row_stride, col_stride = self.cols, self.rows, self.col_stride, self.row_stride
        owner = self.owner.T if isinstance(self.owner, np.ndarray) else self.owner
        return Block(self.address, rows, cols, row_stride, col_stride, self.itemsize, self.device, owner)


class Copy(NamedTuple):
    """``destination[r, c] = source[r, c]`` for every element of two blocks of one shape: bits
    copied, or float16/bfloat16 bits widened to float32 (exactly, NaN payloads kept) when
    ``widen`` names the source type. A fusion is a copy into a strided view of the fused tensor.

    The host engines need the destination's rows or its columns adjacent (one of its strides
    equal to its element size) and no overlap of source and destination.
    """

    source: Block
    destination: Block
    widen: str | None = None

    @classmethod
    def of(cls, source: np.ndarray, destination: np.ndarray) -> Copy:
        """The copy of 2-D array ``source`` into ``destination`` (same shape; the same dtype, or
        float16/bfloat16 into float32)."""
        widen = None if source.dtype == destination.dtype else source.dtype.name
        return cls(Block.of(source), Block.of(destination), widen)


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
