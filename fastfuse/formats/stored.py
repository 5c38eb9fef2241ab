"""Tensors stored in a file, whatever its format: where their bytes are, and zero-copy views.

Each reader (``safetensors_file`` for safetensors, ``torch_zip`` for ``torch.save`` archives)
validates its format and describes a file as a :class:`StoredFile`; everything downstream
(checkpoints, planning, the file sink) sees only this description. This module opens files
without following them into FIFOs or devices and maps them copy-on-write: an in-place write
through a view lands in the process's private pages, never in the file, and never faults.

>>> t = StoredTensor("w", np.dtype("<f2"), (2, 3), offset=64)
>>> t.nbytes, t.contiguous, t.span()
(12, True, (64, 76))
>>> StoredTensor("w.T", np.dtype("<f2"), (3, 2), offset=64, strides=(2, 6)).contiguous
False
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseFileNotFoundError, FusePermissionError, MalformedFileError

__all__ = [
    "MAX_DIMS",
    "MAX_EXPANSION",
    "StoredFile",
    "StoredTensor",
    "c_strides",
    "check_expansion",
    "check_shape",
    "map_arrays",
    "map_private",
    "open_regular",
    "pread_exactly",
]

MAX_DIMS = 64  # numpy's limit on dimensions
MAX_ELEMENTS = 2**62  # of a tensor, zero dims left out (numpy refuses shapes whose product overflows)
MAX_EXPANSION = 4  # the tensors of a file may hold at most this many times the file's bytes (tied weights: 2)


def check_shape(where: str, shape: tuple[int, ...] | list[int]) -> None:
    """Refuse a shape numpy cannot build: more than ``MAX_DIMS`` dimensions, or a product of its
    non-zero dims over ``MAX_ELEMENTS`` (also when another dim is 0). Raises MalformedFileError.

    >>> check_shape("t", (0, 2**40, 2**40))
    Traceback (most recent call last):
    fastfuse.errors.MalformedFileError: t: shape [0, 1099511627776, 1099511627776] has more than 2**62 elements (zero dims left out); numpy cannot hold it
    """
    if len(shape) > MAX_DIMS:
        raise MalformedFileError(f"{where}: shape has {len(shape)} dimensions, more than numpy's {MAX_DIMS}")
    product = 1
    for d in shape:
        product *= max(d, 1)
        if product > MAX_ELEMENTS:
            shown = list(shape) if len(shape) <= 8 else f"{list(shape[:8])[:-1]}, ...]"
            raise MalformedFileError(
                f"{where}: shape {shown} has more than 2**62 elements (zero dims left out); numpy cannot hold it"
            )


def check_expansion(path: str, tensors: list[StoredTensor], file_size: int) -> None:
    """Refuse a file whose tensors, counted one by one, hold more than ``MAX_EXPANSION`` times
    its size (plus 1 MB): views whose elements overlap (a stride 0, as ``expand`` makes) or many
    keys viewing one storage would make fused outputs far larger than the bytes stored (a
    decompression bomb). Raises MalformedFileError."""
    total = sum(t.nbytes for t in tensors)
    if total > MAX_EXPANSION * file_size + (1 << 20):
        raise MalformedFileError(
            f"{path}: its tensors hold {total} bytes, more than {MAX_EXPANSION}x the file's {file_size} bytes "
            "(keys sharing storage many times over); re-save each tensor with its own storage"
        )


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Byte strides of a C-contiguous array of ``shape``."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a file: element ``[0, ..., 0]`` at absolute byte ``offset``.

    ``strides`` are in bytes (``None``: C-contiguous). The reader guarantees every element
    lies inside the file.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    strides: tuple[int, ...] | None = None

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements (what a contiguous copy of it takes)."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def byte_strides(self) -> tuple[int, ...]:
        return self.strides if self.strides is not None else c_strides(self.shape, self.dtype.itemsize)

    @functools.cached_property
    def contiguous(self) -> bool:
        """Its bytes are one C-ordered run of the file (strides of size-1 axes do not matter)."""
        if self.strides is None or self.nbytes == 0:
            return True
        expected = c_strides(self.shape, self.dtype.itemsize)
        return all(n == 1 or s == e for n, s, e in zip(self.shape, self.strides, expected))

    def span(self) -> tuple[int, int]:
        """``[first, end)``: the bytes of the file its elements occupy, gaps included."""
        if self.nbytes == 0:
            return self.offset, self.offset
        low = high = self.offset
        for n, s in zip(self.shape, self.byte_strides):
            if s < 0:
                low += (n - 1) * s
            else:
                high += (n - 1) * s
        return low, high + self.dtype.itemsize


@dataclass(frozen=True)
class StoredFile:
    """A validated checkpoint file: its tensors (file order) and string metadata."""

    path: str
    file_size: int
    format: str  # "safetensors" or "torch"
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str] = field(default_factory=dict)


def open_regular(path: PathLike, expected: str = "a checkpoint file") -> tuple[int, int]:
    """(fd, size) of ``path`` opened read-only; checked to be a regular file before opening
    (a FIFO would block) and after (the path may be swapped in between).

    Raises FuseFileNotFoundError, FusePermissionError or MalformedFileError, each naming the path.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
        if stat.S_ISREG(st.st_mode):
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                return fd, st.st_size
            os.close(fd)
    except FileNotFoundError:
        raise FuseFileNotFoundError(f"{p}: no such file") from None
    except PermissionError:
        raise FusePermissionError(f"{p}: permission denied (cannot read the file)") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise MalformedFileError(f"{p}: cannot open: {reason}") from None
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, socket or device)"
    raise MalformedFileError(f"{p}: is {kind}; expected {expected}")


def pread_exactly(fd: int, n: int, offset: int, path: str) -> bytes:
    """``n`` bytes at ``offset``; MalformedFileError naming ``path`` if the file ends first."""
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not chunk:
            raise MalformedFileError(
                f"{path}: file ended at byte {offset + got}, expected {n} bytes from byte {offset}"
            )
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def map_private(path: PathLike, expected_size: int) -> mmap.mmap:
    """A copy-on-write map of the whole file (``MAP_PRIVATE``, writable).

    Reading costs the same as a shared map (page-cache pages); writing copies the touched
    pages into the process, so the file never changes. MalformedFileError if the file's size
    changed since it was read. A file truncated while mapped kills the process (SIGBUS).
    """
    p = os.fspath(path)
    fd, size = open_regular(p)
    try:
        if size != expected_size:
            raise MalformedFileError(f"{p}: file is now {size} bytes but was {expected_size} when it was read")
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise MalformedFileError(f"{p}: cannot memory-map the file: {e.strerror}") from None
    finally:
        os.close(fd)


def map_arrays(stored: StoredFile, *, writeable: bool = False) -> dict[str, np.ndarray[Any, Any]]:
    """Zero-copy views of every tensor of ``stored``, in file order, over one private map.

    The map lives as long as any view does. ``writeable=False`` flags the views read-only
    (numpy's default here: a write is almost always a bug); writes through writeable views
    stay in the process.
    """
    if not stored.tensors:
        return {}
    mm = map_private(stored.path, stored.file_size)
    arrays = {}
    for name, t in stored.tensors.items():
        if t.nbytes == 0:
            array = np.empty(t.shape, t.dtype)
        else:
            array = np.ndarray(t.shape, t.dtype, buffer=mm, offset=t.offset, strides=t.byte_strides)
        array.flags.writeable = writeable
        arrays[name] = array
    return arrays
