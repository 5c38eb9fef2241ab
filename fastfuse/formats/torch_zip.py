"""``torch.save`` archives (``.pt``, ``.bin``): validate, and describe their tensors zero-copy.

No torch import and no pickle code run: the zip directory is parsed here (ZIP64 included),
``<prefix>/data.pkl`` is interpreted by :mod:`fastfuse.formats.unpickler` (an allow-list, nothing
called), and each tensor becomes a :class:`~fastfuse.formats.stored.StoredTensor` pointing into its
storage member ``<prefix>/data/<key>`` (torch stores members uncompressed, 64-byte aligned).
The top-level object is a state dict (name -> tensor; Hugging Face's ``pytorch_model.bin``)
or openai-whisper's ``{"dims": {...}, "model_state_dict": {...}}``, whose ``dims`` become the
metadata ``{"dims": <compact JSON>}``. Tied weights share one storage; views may be strided
or offset. Every violation is a one-line MalformedFileError naming the file, the member, key
or global, and the values found; nothing is read past the end of the file.

The CRCs of the members read into memory (``data.pkl``, ``byteorder``) are checked; storage
data is not read (a second per GB): :func:`verify_crcs` checks everything when asked.

>>> claims(b"PK\\x03\\x04" + bytes(12)), claims(LEGACY_MAGIC), claims(b"\\x08" + bytes(15))
(True, True, False)
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import MalformedFileError
from fastfuse.formats.pickle_objects import PickledDict, TensorRef, a_kind
from fastfuse.formats.stored import (
    StoredFile,
    StoredTensor,
    c_strides,
    check_expansion,
    check_shape,
    map_private,
    open_regular,
    pread_exactly,
)
from fastfuse.formats.unpickler import MAX_PICKLE_BYTES, load

__all__ = ["LEGACY_MAGIC", "MAX_DIRECTORY_BYTES", "claims", "read_torch", "torch_dtype", "verify_crcs"]

#: Start of a legacy (pre-1.6) torch.save file: pickle PROTO 2, then LONG1 of torch's magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
MAX_DIRECTORY_BYTES = 64 << 20  # ~600k members; large-v3 has ~1300
_CHUNK = 16 << 20  # verify_crcs reads this much at a time
_MAX_DIM = 2**62
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_LOCATOR = struct.Struct("<4sLQL")  # ZIP64 end of central directory locator
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_METHODS = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd", 95: "xz"}
_NUMPY = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
}


def claims(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 16 bytes) looks like a torch.save file:
    a zip (local header ``PK\\x03\\x04``) or the legacy format."""
    return head.startswith((b"PK\x03\x04", LEGACY_MAGIC))


def torch_dtype(name: str) -> np.dtype[Any]:
    """numpy dtype of a torch dtype name (``"bfloat16"``...); ml_dtypes only for bf16 and float8."""
    if name in _NUMPY:
        return np.dtype(_NUMPY[name])
    import ml_dtypes

    dtype: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
    return dtype


@dataclass(frozen=True)
class _Member:
    name: str
    crc: int
    size: int
    data: int  # absolute offset of its first byte


def _end_records(fd: int, size: int, p: str) -> tuple[int, int, int, int]:
    """(members, directory offset, directory size, where the end records start)."""
    start = max(0, size - _EOCD.size - 0xFFFF)
    tail = pread_exactly(fd, size - start, start, p)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and (at + _EOCD.size > len(tail) or _EOCD.unpack_from(tail, at)[-1] != len(tail) - at - _EOCD.size):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise MalformedFileError(
            f"{p}: no zip end-of-central-directory record in its last {len(tail)} bytes (truncated archive?)"
        )
    _, disk, cd_disk, on_disk, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    disks = [disk, cd_disk, on_disk - count]  # one file: disk 0 holds everything
    records = start + at
    locator = pread_exactly(fd, _LOCATOR.size, records - _LOCATOR.size, p) if records >= _LOCATOR.size else b""
    if locator.startswith(b"PK\x06\x07"):  # read from the file: the tail may start after it
        _, disk64, eocd64, total = _LOCATOR.unpack(locator)
        if eocd64 + _EOCD64.size > records - _LOCATOR.size:
            raise MalformedFileError(f"{p}: ZIP64 end record at byte {eocd64} runs past its locator")
        fields = _EOCD64.unpack(pread_exactly(fd, _EOCD64.size, eocd64, p))
        if fields[0] != b"PK\x06\x06" or not 44 <= fields[1] <= records - _LOCATOR.size - eocd64 - 12:
            raise MalformedFileError(f"{p}: no valid ZIP64 end record at byte {eocd64}, where its locator points")
        disks = [d % 0xFFFF for d in disks[:2]] + [disk64, total - 1, fields[4], fields[5], fields[6] - fields[7]]
        count, cd_size, cd_offset, records = fields[7], fields[8], fields[9], eocd64
    elif 0xFFFF == count or 0xFFFFFFFF in (cd_size, cd_offset):
        raise MalformedFileError(f"{p}: ZIP64 sizes in the end record but no ZIP64 locator (truncated archive?)")
    if any(disks):
        raise MalformedFileError(f"{p}: is a multi-disk (split) zip archive; torch.save writes one file")
    if cd_offset + cd_size > records or cd_size > MAX_DIRECTORY_BYTES or count * _CENTRAL.size > cd_size:
        raise MalformedFileError(
            f"{p}: central directory [{cd_offset}, {cd_offset + cd_size}) of {count} members does not fit "
            f"before its end records at byte {records} (or exceeds {MAX_DIRECTORY_BYTES} bytes)"
        )
    return count, cd_offset, cd_size, records


def _zip64(p: str, name: str, extra: bytes, values: list[int]) -> list[int]:
    """Replace the 0xFFFFFFFF fields of ``values`` (size, compressed size, offset) from the ZIP64 extra."""
    at = 0
    while at + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4 : at + 4 + n]
        if tag == 1:
            out = list(values)
            for i, v in enumerate(values):
                if v == 0xFFFFFFFF:
                    if len(body) < 8:
                        break
                    out[i], body = int.from_bytes(body[:8], "little"), body[8:]
            else:
                return out
        at += 4 + n
    raise MalformedFileError(f"{p}: member {name!r} has ZIP64 sizes but no valid ZIP64 extra field")


def _directory(fd: int, size: int, p: str) -> tuple[str, dict[str, _Member]]:
    """The archive's ``<prefix>`` and its members by name, each validated against its local header."""
    head = pread_exactly(fd, min(size, 16), 0, p)
    if head.startswith(LEGACY_MAGIC):
        raise MalformedFileError(
            f"{p}: is a legacy (pre-1.6) torch.save file; re-save it with torch >= 1.6 "
            "(torch.save(torch.load(path), new_path)) or convert it to safetensors"
        )
    if not head.startswith(b"PK\x03\x04"):
        raise MalformedFileError(
            f"{p}: is not a zip archive (starts with {head[:8]!r}); expected a torch.save file (torch >= 1.6)"
        )
    count, cd_offset, cd_size, _ = _end_records(fd, size, p)
    cd, at = pread_exactly(fd, cd_size, cd_offset, p), 0
    entries: list[tuple[str, bytes, int, int, int, int, int]] = []  # name, raw, flags, method, crc, size, offset
    for _ in range(count):
        if at + _CENTRAL.size > cd_size or cd[at : at + 4] != b"PK\x01\x02":
            raise MalformedFileError(f"{p}: central directory entry at byte {cd_offset + at} is not a file header")
        (_, _, _, flags, method, _, _, crc, csize, usize, n, e, c, disk, _, attrs, offset) = _CENTRAL.unpack_from(
            cd, at
        )
        raw, extra = cd[at + 46 : at + 46 + n], cd[at + 46 + n : at + 46 + n + e]
        at += 46 + n + e + c
        if at > cd_size:
            raise MalformedFileError(f"{p}: central directory entry runs past the directory's end")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFileError(f"{p}: member name {raw[:200]!r} is not valid UTF-8") from None
        if 0xFFFFFFFF in (usize, csize, offset):
            usize, csize, offset = _zip64(p, name, extra, [usize, csize, offset])
        if attrs & 0x10:  # the DOS directory attribute: zip readers (torch's too) read no data
            raise MalformedFileError(f"{p}: member {name!r} is marked as a directory (attributes 0x{attrs:08x})")
        if disk != 0:
            raise MalformedFileError(f"{p}: member {name!r} starts on disk {disk} of a multi-disk (split) zip archive")
        if csize != usize and method == 0:
            raise MalformedFileError(f"{p}: stored member {name!r} has size {usize} but occupies {csize} bytes")
        entries.append((name, raw, flags, method, crc, usize, offset))
    if at != cd_size:
        raise MalformedFileError(f"{p}: central directory has {cd_size - at} bytes after its {count} entries")
    if any(e[0].split("/")[1:2] in (["code"], ["constants.pkl"]) for e in entries):
        raise MalformedFileError(
            f"{p}: is a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with torch.save"
        )
    for name, _, flags, method, *_ in entries:
        if name.startswith("/") or "\\" in name or "\0" in name or {"", ".", ".."} & set(name.split("/")):
            raise MalformedFileError(f"{p}: member name {name!r} is not a plain relative path (absolute, .., \\)")
        if flags & 0x2061:  # encrypted, strongly encrypted, patch data, masked directory
            raise MalformedFileError(f"{p}: member {name!r} is encrypted or patch data (flags 0x{flags:04x})")
        if method != 0:
            how = _METHODS.get(method, f"method {method}")
            raise MalformedFileError(
                f"{p}: member {name!r} is compressed ({how}); torch.save stores members uncompressed"
                " - was the archive re-zipped?"
            )
    prefixes = sorted({e[0].split("/")[0] if "/" in e[0] else "" for e in entries})
    if len(prefixes) != 1 or not prefixes[0]:
        raise MalformedFileError(
            f"{p}: members are not all under one folder <prefix>/ (found {prefixes[:4]}); torch.save writes one"
        )
    members: dict[str, _Member] = {}
    end = 0
    for name, raw, flags, _, crc, usize, offset in sorted(entries, key=lambda e: e[6]):
        if name in members:
            raise MalformedFileError(f"{p}: member {name!r} appears twice in the central directory")
        if offset < end or offset + _LOCAL.size + len(raw) > cd_offset:
            raise MalformedFileError(
                f"{p}: member {name!r} local header at byte {offset} overlaps the previous member "
                f"(which ends at byte {end}) or runs past the central directory at byte {cd_offset}"
            )
        head = pread_exactly(fd, _LOCAL.size + len(raw), offset, p)
        sig, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, n, e = _LOCAL.unpack_from(head)
        described = lflags & 8 and lcrc == lcsize == lusize == 0  # sizes in a data descriptor
        if (
            sig != b"PK\x03\x04"
            or head[_LOCAL.size :] != raw
            or lmethod != 0
            or lflags != flags
            or not (described or (lcrc == crc and lcsize in (usize, 0xFFFFFFFF) and lusize in (usize, 0xFFFFFFFF)))
        ):
            raise MalformedFileError(
                f"{p}: local header of member {name!r} at byte {offset} disagrees with the central directory "
                f"(name, flags, method, CRC or sizes)"
            )
        data = offset + _LOCAL.size + n + e
        end = data + usize
        if end > cd_offset:
            raise MalformedFileError(
                f"{p}: data of member {name!r} [{data}, {end}) runs past the central directory at byte {cd_offset}"
            )
        members[name] = _Member(name, crc, usize, data)
    return prefixes[0], members


def _read_member(fd: int, m: _Member, p: str) -> bytes:
    raw = pread_exactly(fd, m.size, m.data, p)
    if zlib.crc32(raw) != m.crc:
        raise MalformedFileError(
            f"{p}: member {m.name!r} [{m.data}, {m.data + m.size}) has CRC-32 {zlib.crc32(raw):08x}, "
            f"the directory says {m.crc:08x} (corrupted file)"
        )
    return raw


def read_torch(path: PathLike) -> StoredFile:
    """Validate the torch.save archive at ``path`` and describe its tensors (pickle order).

    ``offset`` of each tensor is the absolute file offset of its first element, ``strides`` in
    bytes (None when C-contiguous); ``stored.map_arrays`` then gives arrays bit-identical to
    ``torch.load``. Raises MalformedFileError (also for a legacy pre-1.6 file or a TorchScript
    archive, saying how to convert them), FuseFileNotFoundError or FusePermissionError.
    """
    p = os.fspath(path)
    fd, size = open_regular(p, "a torch.save file")
    try:
        prefix, members = _directory(fd, size, p)
        pkl = members.get(f"{prefix}/data.pkl")
        if pkl is None:
            raise MalformedFileError(f"{p}: has no member '{prefix}/data.pkl' (the pickle of a torch.save archive)")
        if pkl.size > MAX_PICKLE_BYTES:
            raise MalformedFileError(
                f"{p}: member {pkl.name!r} is {pkl.size} bytes, over the limit of {MAX_PICKLE_BYTES}"
            )
        raw = _read_member(fd, pkl, p)
        order = members.get(f"{prefix}/byteorder")  # absent: little (older torch wrote none)
        found = b"little" if order is None else _read_member(fd, order, p) if order.size <= 16 else None
        if found != b"little":
            shown = repr(found) if found is not None else f"{order.size if order else 0} bytes"
            raise MalformedFileError(
                f"{p}: member '{prefix}/byteorder' is {shown}; only little-endian archives are read"
            )
    finally:
        os.close(fd)
    tensors, metadata = _top_level(p, load(raw, f"{p}: member {pkl.name!r}"))
    _check_shared(p, tensors)
    stored = {name: _locate(p, prefix, members, name, t) for name, t in tensors.items()}
    check_expansion(p, list(stored.values()), size)
    return StoredFile(p, size, "torch", stored, metadata)


def _keys(d: PickledDict) -> str:
    keys = list(d)
    return ", ".join(repr(k[:80]) for k in keys[:10]) + (f", ... ({len(keys)} keys)" if len(keys) > 10 else "")


def _top_level(p: str, obj: Any) -> tuple[dict[str, TensorRef], dict[str, str]]:
    expected = "expected a state dict (name -> tensor) or openai-whisper's {'dims': ..., 'model_state_dict': ...}"
    if type(obj) is not PickledDict:
        raise MalformedFileError(f"{p}: top-level object is {a_kind(obj)}; {expected}")
    metadata: dict[str, str] = {}
    state, where = obj, ""
    if set(obj) == {"dims", "model_state_dict"} and not obj.odd_keys:
        dims, state, where = obj["dims"], obj["model_state_dict"], "model_state_dict"
        if type(dims) is not PickledDict or dims.odd_keys or not all(type(v) is int for v in dims.values()):
            raise MalformedFileError(f"{p}: 'dims' is not a dict of str -> int (found {a_kind(dims)})")
        metadata["dims"] = json.dumps(dims, sort_keys=True, separators=(",", ":"))
        if type(state) is not PickledDict:
            raise MalformedFileError(f"{p}: 'model_state_dict' is {a_kind(state)}, expected a dict of name -> tensor")
    elif obj and not any(type(v) is TensorRef for v in obj.values()):
        raise MalformedFileError(f"{p}: top-level keys are {_keys(obj)} (no tensor among them); {expected}")
    if state.odd_keys:
        raise MalformedFileError(
            f"{p}: {where or 'state dict'} has {state.odd_keys} keys that are not strings (first: {state.odd_kind})"
        )
    for name, value in state.items():
        if type(value) is not TensorRef:
            label = f"{where}[{name!r}]" if where else f"key {name!r}"
            raise MalformedFileError(f"{p}: {label} holds {a_kind(value)}, expected a tensor")
    return dict(state), metadata


def _locate(p: str, prefix: str, members: dict[str, _Member], name: str, t: TensorRef) -> StoredTensor:
    """The StoredTensor of ``t``, every element checked to lie inside its storage member."""
    s, where = t.storage, f"{p}: tensor {name!r}"
    member = members.get(f"{prefix}/data/{s.key}")
    if member is None:
        raise MalformedFileError(f"{where}: storage key {s.key!r} has no member '{prefix}/data/{s.key}'")
    try:
        dtype, storage_item = torch_dtype(t.dtype), torch_dtype(s.dtype).itemsize
    except AttributeError:  # an older ml_dtypes
        raise MalformedFileError(f"{where}: dtype {t.dtype} needs a newer ml_dtypes") from None
    if not 0 <= s.numel <= _MAX_DIM or member.size != s.numel * storage_item:
        raise MalformedFileError(
            f"{where}: storage {s.key!r} is {s.numel} {s.dtype} elements ({s.numel * storage_item} bytes) "
            f"but member {member.name!r} holds {member.size} bytes"
        )
    dims = (*t.size, *t.stride, t.offset)
    if len(t.size) > 64 or len(t.size) != len(t.stride) or not all(0 <= d <= _MAX_DIM for d in dims):
        raise MalformedFileError(
            f"{where}: size {_short(t.size)}, stride {_short(t.stride)}, offset {_short(t.offset)}: expected at most "
            "64 dimensions, as many strides as sizes, all integers in [0, 2**62]"
        )
    check_shape(where, t.size)
    item = dtype.itemsize
    if math.prod(t.size) == 0:
        return StoredTensor(name, dtype, t.size, member.data)
    last = t.offset + sum((n - 1) * st for n, st in zip(t.size, t.stride))
    if (last + 1) * item > member.size:
        raise MalformedFileError(
            f"{where}: view (offset {t.offset}, size {list(t.size)}, stride {list(t.stride)}) of {t.dtype} "
            f"needs {(last + 1) * item} bytes but its storage {s.key!r} holds {member.size}"
        )
    c = c_strides(t.size, item)  # size-1 axes get their C stride: any stride is the same there
    strides = tuple(st * item if n > 1 else cs for n, st, cs in zip(t.size, t.stride, c))
    tensor = StoredTensor(name, dtype, t.size, member.data + t.offset * item, strides)
    return StoredTensor(name, dtype, t.size, tensor.offset) if tensor.contiguous else tensor


def _short(value: Any) -> str:
    text = repr(value) if type(value) is not tuple or len(value) <= 8 else repr(value[:8])[:-1] + ", ...)"
    return text if len(text) <= 120 else text[:117] + "..."


def _check_shared(p: str, tensors: dict[str, TensorRef]) -> None:
    """Two references to one storage key must agree on its class and size."""
    seen: dict[str, tuple[str, str, int]] = {}
    for name, t in tensors.items():
        s = t.storage
        first = seen.setdefault(s.key, (name, s.cls, s.numel))
        if first[1:] != (s.cls, s.numel):
            raise MalformedFileError(
                f"{p}: storage {s.key!r} is a {first[1]} of {first[2]} elements for tensor {first[0]!r} "
                f"but a {s.cls} of {s.numel} elements for tensor {name!r}"
            )


def verify_crcs(path: PathLike) -> None:
    """Check the CRC-32 of every member, storage data included, against the zip directory.

    Reads the whole file through a private map in 16 MB chunks (zlib releases the GIL).
    Raises MalformedFileError naming the first member that differs, or what read_torch
    would say about a broken directory.
    """
    p = os.fspath(path)
    fd, size = open_regular(p, "a torch.save file")
    try:
        members = _directory(fd, size, p)[1]
    finally:
        os.close(fd)
    mm = map_private(p, size)
    try:
        with memoryview(mm) as whole:
            for m in members.values():
                crc = 0
                for start in range(m.data, m.data + m.size, _CHUNK):
                    with whole[start : min(start + _CHUNK, m.data + m.size)] as chunk:
                        crc = zlib.crc32(chunk, crc)
                if crc != m.crc:
                    raise MalformedFileError(
                        f"{p}: member {m.name!r} [{m.data}, {m.data + m.size}) has CRC-32 {crc:08x}, "
                        f"the directory says {m.crc:08x} (corrupted file)"
                    )
    finally:
        mm.close()
