"""Safetensors bytes: validate a header, memory-map its tensors, write a file atomically.

This module knows the file format and nothing else (no key names, no fusion). A file is an
8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON (``{name: {"dtype",
"shape", "data_offsets"}}`` and an optional ``__metadata__`` of str -> str), then the data
section, which the tensors cover exactly. Every format violation raises MalformedFileError
naming the file, the tensor and the values found.

>>> prefix, offsets = layout([OutputTensor("b", np.dtype("u1"), (3,)),
...                           OutputTensor("a", np.dtype("<f4"), (2,))], {"format": "pt"})
>>> offsets, len(prefix) % 8, dtype_code(np.float16)
({'a': (0, 8), 'b': (8, 11)}, 0, 'F16')
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import mmap
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ._typing import DTypeLike, PathLike
from .errors import DtypeMismatchError, FuseError, MalformedFileError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "AtomicWriter",
    "Header",
    "OutputTensor",
    "TensorInfo",
    "dtype_code",
    "dtype_of",
    "layout",
    "map_tensors",
    "read_header",
    "read_index",
    "write_bytes_atomic",
]

MAX_HEADER_BYTES = 100_000_000  # as the reference reader (safetensors) limits it
_ITEMSIZE = {
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
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_FIELDS = ["data_offsets", "dtype", "shape"]
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)  # tests set 0 to exercise the named fallback
_CHUNK = 16 << 20  # largest preadv when copy_file_range is unavailable
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python < 3.13 lacks the name


@functools.cache
def dtype_of(code: str) -> np.dtype[Any]:
    """numpy dtype of a safetensors dtype code (KeyError if unknown); ml_dtypes is imported
    only for BF16 and F8."""
    if code in _ML_DTYPES:
        import ml_dtypes

        dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
        return dt
    return np.dtype(_NUMPY[code])


class _Dtypes(Mapping[str, "np.dtype[Any]"]):
    def __getitem__(self, code: str) -> np.dtype[Any]:
        return dtype_of(code)

    def __iter__(self) -> Iterator[str]:
        return iter(_ITEMSIZE)

    def __len__(self) -> int:
        return len(_ITEMSIZE)


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
            f"dtype {dt.str} ({dt}) cannot be stored in safetensors; supported (little-endian): {', '.join(_ITEMSIZE)}"
        )
    return codes[0]


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``start``/``end`` are relative to the data section, as in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated header: ``tensors`` (file order) cover ``[data_offset, file_size)`` exactly."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_offset: int  # 8 + header length
    file_size: int

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


def _open_regular(path: str) -> tuple[int, int]:
    """(fd, size) of ``path`` opened read-only, checked to be a regular file before opening (a
    FIFO would block) and after (the path may be swapped in between)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                return fd, st.st_size
            os.close(fd)
    except FileNotFoundError:
        raise MalformedFileError(f"{path}: no such file") from None
    except PermissionError:
        raise MalformedFileError(f"{path}: permission denied (cannot read the file)") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise MalformedFileError(f"{path}: cannot open: {reason}") from None
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, socket or device)"
    raise MalformedFileError(f"{path}: is {kind}; expected a safetensors file")


def _pread(fd: int, n: int, offset: int, path: str) -> bytes:
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


class _DuplicateKey(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _loads(path: str, what: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except UnicodeDecodeError as e:
        message = f"is not valid UTF-8 (byte {e.start} of the {what})"
    except _DuplicateKey as e:
        message = f"has duplicated key {e.args[0]!r} (the format forbids duplicates)"
    except json.JSONDecodeError as e:
        message = f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except ValueError as e:  # e.g. an integer longer than Python converts
        message = f"is not valid JSON: {e}"
    except RecursionError:
        message = "is not valid JSON: nested too deeply"
    raise MalformedFileError(f"{path}: {what} {message}")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return "JSON " + names.get(type(value), "number")


def read_header(path: PathLike) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Checks all the reference reader checks, and duplicated keys: file size, header length
    (<= MAX_HEADER_BYTES and inside the file), UTF-8, a JSON object, ``__metadata__`` str ->
    str, entries of exactly ``dtype`` (known), ``shape`` (non-negative ints) and
    ``data_offsets`` ([start, end]) whose sizes agree, covering the data section with no
    overlap, gap or trailing byte. JSON whitespace around the header (the writer's padding)
    is accepted. Raises MalformedFileError, also for a missing path, a directory, a FIFO or
    an unreadable file.
    """
    p = os.fspath(path)
    fd, size = _open_regular(p)
    try:
        if size < 8:
            raise MalformedFileError(
                f"{p}: file is {size} bytes, too short for a safetensors file (it starts with an 8-byte header length)"
            )
        n = int.from_bytes(_pread(fd, 8, 0, p), "little")
        if n > MAX_HEADER_BYTES:
            raise MalformedFileError(f"{p}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if n > size - 8:
            raise MalformedFileError(
                f"{p}: header length {n} runs past the end of the file ({size} bytes, so at most {size - 8})"
            )
        raw = _pread(fd, n, 8, p)
    finally:
        os.close(fd)
    obj = _loads(p, "header", raw)
    if not isinstance(obj, dict):
        raise MalformedFileError(f"{p}: header is a {_kind(obj)}, expected an object")
    meta = obj.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise MalformedFileError(f"{p}: __metadata__ is a {_kind(meta)}, expected an object of string to string")
    for key, value in (meta or {}).items():
        if not isinstance(value, str):
            raise MalformedFileError(
                f"{p}: __metadata__ key {key!r} holds a {_kind(value)} {_show(value)}, expected a string"
            )
    data_size = size - 8 - n
    tensors = {name: _tensor(p, name, entry, data_size) for name, entry in obj.items()}
    _check_coverage(p, tensors.values(), data_size)
    return Header(p, tensors, meta, 8 + n, size)


def _tensor(path: str, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or sorted(entry) != _FIELDS:
        found = sorted(entry) if isinstance(entry, dict) else f"a {_kind(entry)}"
        raise MalformedFileError(f"{where} entry has {found}, expected exactly the keys {_FIELDS}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise MalformedFileError(f"{where} has unsupported dtype {_show(dtype)} (supported: {', '.join(_ITEMSIZE)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MalformedFileError(f"{where} shape {_show(shape)} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise MalformedFileError(
            f"{where} data_offsets {_show(offsets)} are not [start, end] integers with 0 <= start <= end"
        )
    start, end = offsets
    if end > data_size:
        raise MalformedFileError(
            f"{where} data_offsets [{start}, {end}] run past the end of the "
            f"data section ({data_size} bytes; is the file truncated?)"
        )
    need = 0 if 0 in shape else _ITEMSIZE[dtype]
    for d in shape:  # Python ints, stopped past 2**64: no overflow and no huge products
        if need > 2**64:
            break
        need *= d
    if need != end - start:
        needs = str(need) if need <= 2**64 else "more than 2**64 (it overflows)"
        raise MalformedFileError(
            f"{where} data_offsets [{start}, {end}] hold {end - start} "
            f"bytes but shape {_show(shape)} of {dtype} needs {needs}"
        )
    return TensorInfo(name, dtype, tuple(shape), start, end)


def _check_coverage(path: str, tensors: Iterable[TensorInfo], data_size: int) -> None:
    end, prev = 0, None
    for t in sorted(tensors, key=lambda t: (t.start, t.end)):
        if t.start > end:
            after = f"tensor {prev.name!r} [{prev.start}, {prev.end}]" if prev else "the data section start"
            raise MalformedFileError(
                f"{path}: gap of {t.start - end} bytes between {after} and "
                f"tensor {t.name!r} [{t.start}, {t.end}] (the format forbids gaps)"
            )
        if t.start < end and prev is not None:
            raise MalformedFileError(
                f"{path}: tensor {t.name!r} data_offsets [{t.start}, {t.end}] "
                f"overlap tensor {prev.name!r} [{prev.start}, {prev.end}]"
            )
        end, prev = t.end, t
    if end != data_size:
        raise MalformedFileError(
            f"{path}: {data_size - end} trailing bytes after the last tensor "
            f"(tensors end at {end}, the data section is {data_size} bytes)"
        )


def map_tensors(header: Header) -> dict[str, np.ndarray[Any, Any]]:
    """Read-only zero-copy views of every tensor, in header order, over one read-only mmap.

    The map lives as long as any view does. A file whose size changed since ``read_header``
    is a MalformedFileError; one truncated while views are alive kills the process (SIGBUS).
    """
    if not header.tensors:
        return {}
    fd, size = _open_regular(header.path)
    try:
        if size != header.file_size:
            raise MalformedFileError(
                f"{header.path}: file is now {size} bytes but was {header.file_size} when its header was read"
            )
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)  # size >= 8: never an empty map
    except OSError as e:
        raise MalformedFileError(f"{header.path}: cannot memory-map the file: {e.strerror}") from None
    finally:
        os.close(fd)
    whole, base = np.frombuffer(mm, dtype=np.uint8), header.data_offset
    return {
        name: whole[base + t.start : base + t.end].view(dtype_of(t.dtype)).reshape(t.shape)
        for name, t in header.tensors.items()
    }


def read_index(path: PathLike) -> dict[str, str]:
    """``weight_map`` of a sharded index, shard names resolved to absolute paths in its folder.

    MalformedFileError for bad JSON, a missing ``weight_map`` object, or a shard that is not
    a plain file name (not a string, absolute, ``..``, path separators).
    """
    p = os.fspath(path)
    fd, size = _open_regular(p)
    try:
        if size > MAX_HEADER_BYTES:
            raise MalformedFileError(f"{p}: index is {size} bytes, over the {MAX_HEADER_BYTES} limit")
        obj = _loads(p, "index", _pread(fd, size, 0, p))
    finally:
        os.close(fd)
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict):
        raise MalformedFileError(
            f'{p}: index has no "weight_map" object mapping tensor names to shard files (found {_show(weight_map)})'
        )
    folder, out = os.path.dirname(os.path.abspath(p)), {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            raise MalformedFileError(
                f"{p}: weight_map[{key!r}] = {_show(shard)} is not a plain file name in the index's folder"
            )
        out[key] = os.path.join(folder, shard)
    return out


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write; ``dtype`` is normalised with ``np.dtype`` and ``shape`` to ints."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def layout(
    tensors: Sequence[OutputTensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file prefix (length + compact JSON, ``__metadata__`` first, padded with spaces so
    the data starts at a multiple of 8) and each tensor's (start, end) in the data section.

    Order: item size descending, then name, so each tensor is aligned to its item size, with
    no gaps. FuseError for duplicated or reserved names, negative shapes, non-str metadata;
    DtypeMismatchError for a dtype safetensors cannot store.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FuseError(f"metadata must map str to str, found {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.name)):
        if t.name in offsets or t.name == "__metadata__" or min(t.shape, default=0) < 0:
            raise FuseError(
                f"output tensor {t.name!r} shape {list(t.shape)}: the name is "
                "duplicated or reserved, or the shape is negative"
            )
        offsets[t.name] = (pos, pos + t.nbytes)
        header[t.name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise FuseError(f"a tensor name or metadata is not valid UTF-8: {e}") from None
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise FuseError(f"header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
    return len(raw).to_bytes(8, "little") + raw, offsets


class AtomicWriter:
    """Write ``prefix`` (from :func:`layout`) + a ``data_size``-byte data section to ``dst``,
    all or nothing.

    The constructor checks the destination (folder exists and is writable, ``dst`` is not a
    directory and, unless ``overwrite``, does not exist) and creates nothing. ``__enter__``
    creates an unnamed O_TMPFILE in the destination folder (else a hidden
    ``.{name}.fastfuse-XXXXXXXX.tmp``), reserves its space (disk full is a FuseError now, not
    a SIGBUS later), writes the prefix and maps the data section; fill it with :meth:`view`
    and :meth:`copy_from`. A clean exit flushes, fsyncs and publishes the file with one
    rename (without ``overwrite``: one link, which also refuses a ``dst`` created meanwhile),
    then fsyncs the folder. An exception (KeyboardInterrupt too) removes the temporary and
    leaves ``dst`` untouched; so does SIGKILL with O_TMPFILE (the named fallback leaves its
    temporary). Views are invalid after exit: one still held keeps the map alive, and
    writing through it would change the published file.
    """

    def __init__(self, dst: PathLike, prefix: bytes, data_size: int, *, overwrite: bool = False) -> None:
        if data_size < 0:
            raise ValueError(f"data_size must be >= 0, got {data_size}")
        self.dst, self.prefix, self.data_size = os.fspath(dst), bytes(prefix), data_size
        self.overwrite, self.folder = overwrite, os.path.dirname(os.path.abspath(self.dst))
        self._name = os.path.basename(self.dst)
        self._fd = self._dir = -1  # the temporary file, the destination folder
        self._tmp = ""  # name in the folder of the named temporary, or of the O_TMPFILE's link
        self._mm: mmap.mmap | None = None
        self._data: np.ndarray[Any, np.dtype[np.uint8]] = np.empty(0, np.uint8)
        self._check()

    def _check(self) -> None:
        dst, folder = self.dst, self.folder
        if not os.path.isdir(folder):
            state = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise FuseError(f"{dst}: destination folder {folder} {state}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FuseError(f"{dst}: destination folder {folder} is not writable")
        if not self._name or os.path.isdir(dst):
            raise FuseError(f"{dst}: is a directory; expected a file name")
        if os.path.lexists(dst) and not self.overwrite:
            raise FuseError(f"{dst}: exists; pass --force / overwrite=True to replace it")

    def _new_temp(self, fd: int = -1) -> int:
        """Take a fresh hidden name in the folder: link it to ``fd``, or create a file there."""
        self._tmp = f".{self._name}.fastfuse-{os.urandom(4).hex()}.tmp"
        if fd >= 0:  # a dir fd makes os.link use linkat(AT_SYMLINK_FOLLOW); bare link() fails
            os.link(f"/proc/self/fd/{fd}", self._tmp, dst_dir_fd=self._dir, follow_symlinks=True)
            return fd
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return os.open(self._tmp, flags, 0o644, dir_fd=self._dir)

    def __enter__(self) -> Self:
        self._check()
        total = len(self.prefix) + self.data_size
        try:
            self._dir = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not _O_TMPFILE or not os.path.isdir("/proc/self/fd"):
                    raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
                flags = _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
                self._fd = os.open(".", flags, 0o644, dir_fd=self._dir)
            except OSError:  # not supported here: a named temporary instead
                self._fd = self._new_temp()
            os.ftruncate(self._fd, total)
            try:
                os.posix_fallocate(self._fd, 0, total)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
            done = 0
            while done < len(self.prefix):
                done += os.pwrite(self._fd, self.prefix[done:], done)
            if self.data_size:
                self._mm = mmap.mmap(self._fd, total, access=mmap.ACCESS_WRITE)
                self._data = np.frombuffer(self._mm, np.uint8)[len(self.prefix) :]
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise FuseError(
                    f"{self.folder}: not enough space for {self.dst}: it needs {total} bytes ({e.strerror})"
                ) from None
            if isinstance(e, OSError):
                raise FuseError(f"{self.dst}: cannot create a temporary file in {self.folder}: {e.strerror}") from None
            raise
        return self

    def view(self, start: int, end: int, dtype: DTypeLike, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        """Writable zero-copy view of data bytes ``[start, end)`` as ``dtype`` and ``shape``."""
        dt = np.dtype(dtype)
        if self._fd < 0 or not 0 <= start <= end <= self.data_size or math.prod(shape) * dt.itemsize != end - start:
            raise ValueError(
                f"view [{start}, {end}) as {dt} {shape} does not fit the open data section of {self.data_size} bytes"
            )
        self._populate(len(self.prefix) + start, len(self.prefix) + end)
        return self._data[start:end].view(dt).reshape(shape)

    def _populate(self, start: int, end: int) -> None:
        """Fault in map bytes ``[start, end)`` for writing in one system call (Linux >= 5.14).

        A kernel writing into a fresh shared file map otherwise takes one page fault per 4 KB,
        serialised across its threads: measured 0.14 s here instead of 0.14-0.39 s of faults
        for large-v3's 630 MB of fused tensors. Older kernels refuse the advice; that is fine.
        """
        if self._mm is None or end <= start:
            return
        page = start - start % mmap.PAGESIZE
        with contextlib.suppress(OSError):
            self._mm.madvise(_MADV_POPULATE_WRITE, page, end - page)

    def copy_from(self, src: int | PathLike, src_offset: int, start: int, length: int) -> None:
        """Copy ``length`` bytes at ``src_offset`` of ``src`` (fd or path) to data byte ``start``
        file to file: copy_file_range, else preadv straight into the map (no buffer)."""
        if self._fd < 0 or min(src_offset, start, length) < 0 or start + length > self.data_size:
            raise ValueError(
                f"copy of {length} bytes to data byte {start} does not fit the open "
                f"data section of {self.data_size} bytes"
            )
        if not isinstance(src, int):
            fd = _open_regular(os.fspath(src))[0]
            try:
                self.copy_from(fd, src_offset, start, length)
            finally:
                os.close(fd)
            return
        done, fast, at = 0, hasattr(os, "copy_file_range"), len(self.prefix) + start
        while done < length:
            try:
                if fast:
                    n = os.copy_file_range(src, self._fd, length - done, src_offset + done, at + done)
                else:
                    assert self._mm is not None  # length > 0, so there is a mapped data section
                    stop = at + min(length, done + _CHUNK)
                    with memoryview(self._mm) as whole, whole[at + done : stop] as part:
                        n = os.preadv(src, [part], src_offset + done)
            except OSError as e:
                if fast and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    fast = False  # not between these files: copy through the map instead
                    continue
                raise FuseError(
                    f"{self.dst}: copying {length} bytes from byte {src_offset} of the source failed: {e.strerror}"
                ) from None
            if n == 0:
                raise MalformedFileError(
                    f"source ended at byte {src_offset + done} while copying "
                    f"{length} bytes from byte {src_offset} into {self.dst}"
                )
            done += n

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is not None:
                return
            if self._mm is not None:
                self._mm.flush()
            self._release_map()
            os.fsync(self._fd)
            if self.overwrite:
                if not self._tmp:
                    self._new_temp(self._fd)
                os.replace(self._tmp, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
                self._tmp = ""
            else:  # a named temporary, now a second name, is unlinked by _abort below
                source = self._tmp or f"/proc/self/fd/{self._fd}"
                os.link(source, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir, follow_symlinks=True)
            with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
                os.fsync(self._dir)
        except FileExistsError:
            raise FuseError(f"{self.dst}: exists; pass --force / overwrite=True to replace it") from None
        except OSError as e:
            raise FuseError(f"{self.dst}: could not write the file: {e.strerror}") from None
        finally:
            self._abort()

    def _release_map(self) -> None:
        self._data = np.empty(0, np.uint8)
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # views still held: it closes when they die
                mm.close()

    def _abort(self) -> None:
        """Unmap, remove the named temporary (if any) and close both descriptors."""
        self._release_map()
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir)
            self._tmp = ""
        for fd in (self._fd, self._dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dir = -1


def write_bytes_atomic(dst: PathLike, data: bytes, *, overwrite: bool = False) -> None:
    """Write a small file (e.g. a sharded index) with the guarantees of :class:`AtomicWriter`."""
    with AtomicWriter(dst, data, 0, overwrite=overwrite):
        pass
