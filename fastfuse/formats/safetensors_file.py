"""Safetensors bytes: validate a header and describe the file; lay out a new header.

This module knows the file format and nothing else (no key names, no fusion; mapping is
``stored``'s, atomic writing ``atomic``'s). A file is an
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

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError, MalformedFileError
from fastfuse.formats.safetensors_dtypes import ITEMSIZE, dtype_code, dtype_of
from fastfuse.formats.stored import StoredFile, StoredTensor, check_shape, open_regular, pread_exactly

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "Header",
    "OutputTensor",
    "TensorInfo",
    "claims",
    "layout",
    "read_header",
    "read_index",
    "read_safetensors",
]

MAX_HEADER_BYTES = 100_000_000  # as the reference reader (safetensors) limits it
MAX_TENSORS = 200_000  # entries of one header: bounds the time to read it (large-v3 has ~1300)
PAGE = 4096
_FIELDS = ["data_offsets", "dtype", "shape"]


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
    fd, size = open_regular(p, "a safetensors file")
    try:
        if size < 8:
            raise MalformedFileError(
                f"{p}: file is {size} bytes, too short for a safetensors file (it starts with an 8-byte header length)"
            )
        n = int.from_bytes(pread_exactly(fd, 8, 0, p), "little")
        if n > MAX_HEADER_BYTES:
            raise MalformedFileError(f"{p}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if n > size - 8:
            raise MalformedFileError(
                f"{p}: header length {n} runs past the end of the file ({size} bytes, so at most {size - 8})"
            )
        raw = pread_exactly(fd, n, 8, p)
    finally:
        os.close(fd)
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # counted before parsing: an upper bound of the entries
        raise MalformedFileError(f"{p}: header has more than {MAX_TENSORS} tensor entries, over the limit")
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
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise MalformedFileError(f"{where} has unsupported dtype {_show(dtype)} (supported: {', '.join(ITEMSIZE)})")
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
    need = 0 if 0 in shape else ITEMSIZE[dtype]
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
    check_shape(where, shape)  # zero-size tensors too: numpy must be able to build them
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


def read_safetensors(path: PathLike) -> StoredFile:
    """The validated file at ``path`` (see :func:`read_header`), as every reader describes files."""
    header = read_header(path)
    tensors = {
        name: StoredTensor(name, dtype_of(t.dtype), t.shape, header.data_offset + t.start)
        for name, t in header.tensors.items()
    }
    return StoredFile(header.path, header.file_size, "safetensors", tensors, dict(header.metadata or {}))


def claims(head: bytes) -> bool:
    """Do a file's first bytes look like safetensors: a header length, then JSON (``{``)?"""
    return head[8:9] in (b"{", b" ", b"\t", b"\n", b"\r")


def read_index(path: PathLike) -> dict[str, str]:
    """``weight_map`` of a sharded index, shard names resolved to absolute paths in its folder.

    MalformedFileError for bad JSON, a missing ``weight_map`` object, or a shard that is not
    a plain file name (not a string, absolute, ``..``, path separators).
    """
    p = os.fspath(path)
    fd, size = open_regular(p, "a safetensors file")
    try:
        if size > MAX_HEADER_BYTES:
            raise MalformedFileError(f"{p}: index is {size} bytes, over the {MAX_HEADER_BYTES} limit")
        obj = _loads(p, "index", pread_exactly(fd, size, 0, p))
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


def _aligned(tensors: Sequence[OutputTensor]) -> bool:
    """Does every tensor start at a multiple of its item size when laid out in this order?"""
    pos = 0
    for t in tensors:
        if pos % t.dtype.itemsize:
            return False
        pos += t.nbytes
    return True


def layout(
    tensors: Sequence[OutputTensor],
    metadata: Mapping[str, str] | None,
    *,
    keep_order: bool = False,
    data_start: int | None = None,
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file prefix (length + compact JSON, ``__metadata__`` first, padded with spaces so
    the data starts at a multiple of 8) and each tensor's (start, end) in the data section.

    ``data_start``: also pad so that the data section starts at this offset modulo ``PAGE``
    (when it is a multiple of 8): a file-to-file copy whose source and destination offsets
    share their place in a page is about twice as fast (the kernel moves whole pages).

    Order: item size descending, then name (safetensors' own), so each tensor is aligned to its
    item size, with no gaps; with ``keep_order``, the given order if every tensor is aligned in
    it. FuseError for duplicated or reserved names, negative shapes, non-str metadata;
    DtypeMismatchError for a dtype safetensors cannot store.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FuseError(f"metadata must map str to str, found {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    ordered = list(tensors)
    if not keep_order or not _aligned(ordered):
        ordered.sort(key=lambda t: (-t.dtype.itemsize, t.name))
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in ordered:
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
    if data_start is not None and data_start % 8 == 0:  # 8 + len(raw) is a multiple of 8 already
        raw += b" " * ((data_start - 8 - len(raw)) % PAGE)
    if len(raw) > MAX_HEADER_BYTES:
        raise FuseError(f"header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
    return len(raw).to_bytes(8, "little") + raw, offsets
