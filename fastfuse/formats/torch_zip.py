"""``torch.save`` archives (``.pt``, ``.bin``): validate, and describe their tensors zero-copy.

No torch import and no pickle code run: the zip container is read by
:mod:`fastfuse.formats.zip_archive` (ZIP64 included), ``<prefix>/data.pkl`` is interpreted by :mod:`fastfuse.formats.unpickler` (an allow-list, nothing
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
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.dtypes import ml_dtype
from fastfuse.errors import MalformedFileError
from fastfuse.formats.pickle_objects import PickledDict, TensorRef, a_kind
from fastfuse.formats.stored import (
    StoredFile,
    StoredTensor,
    c_strides,
    check_expansion,
    check_shape,
    open_regular,
    pread_exactly,
)
from fastfuse.formats.unpickler import MAX_PICKLE_BYTES, unpickle
from fastfuse.formats.zip_archive import Member, check_crcs, check_entries, locate, read_entries, read_member

__all__ = ["LEGACY_MAGIC", "claims", "read_torch", "torch_dtype", "verify_crcs"]

#: Start of a legacy (pre-1.6) torch.save file: pickle PROTO 2, then LONG1 of torch's magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAX_DIM = 2**62
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
    return ml_dtype(name)


def _directory(fd: int, size: int, p: str) -> tuple[str, dict[str, Member]]:
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
    entries, cd_offset = read_entries(fd, size, p)
    if any(entry.name.split("/")[1:2] in (["code"], ["constants.pkl"]) for entry in entries):
        raise MalformedFileError(
            f"{p}: is a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with torch.save"
        )
    check_entries(p, entries)
    prefixes = sorted({entry.name.split("/")[0] if "/" in entry.name else "" for entry in entries})
    if len(prefixes) != 1 or not prefixes[0]:
        raise MalformedFileError(
            f"{p}: members are not all under one folder <prefix>/ (found {prefixes[:4]}); torch.save writes one"
        )
    return prefixes[0], locate(fd, p, entries, cd_offset)


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
        raw = read_member(fd, pkl, p)
        order = members.get(f"{prefix}/byteorder")  # absent: little (older torch wrote none)
        found = b"little" if order is None else read_member(fd, order, p) if order.size <= 16 else None
        if found != b"little":
            shown = repr(found) if found is not None else f"{order.size if order else 0} bytes"
            raise MalformedFileError(
                f"{p}: member '{prefix}/byteorder' is {shown}; only little-endian archives are read"
            )
    finally:
        os.close(fd)
    tensors, metadata = _top_level(p, unpickle(raw, f"{p}: member {pkl.name!r}"))
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


def _locate(p: str, prefix: str, members: dict[str, Member], name: str, t: TensorRef) -> StoredTensor:
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
    check_crcs(p, size, members)
