"""Hostile and malformed pickles in torch.save archives: each refused with a named, one-line error.

Archives are assembled here from members (Python's zipfile computes the CRCs), so each test
changes one thing; pickles are written opcode by opcode with the small assembler below. An
audit hook records what runs while fastfuse reads: only opening and mapping the file may
happen (no import, exec, os.system, subprocess, pickle.find_class...). These tests need no
torch, except where a real torch.save file is the starting point.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (imported now: an import while reading would be recorded)
import numpy as np
import pytest

from fastfuse.errors import MalformedFileError
from fastfuse.formats import torch_zip, unpickler
from fastfuse.formats.stored import map_arrays
from fastfuse.formats.torch_zip import read_torch
from fastfuse.formats.unpickler import MAX_DEPTH

# ----------------------------------------------------------------------------- what runs

_SEEN: list[str] = []
_WATCHING = [False]
_HARMLESS = {"open", "mmap.__new__"}  # reading a file: opening and mapping it


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _WATCHING[0] and event not in _HARMLESS:
        _SEEN.append(event)


sys.addaudithook(_audit)  # cannot be removed; it costs one flag test per event


@contextlib.contextmanager
def watched() -> Iterator[list[str]]:
    """Audit events (other than open/mmap) raised inside the block."""
    _SEEN.clear()
    _WATCHING[0] = True
    try:
        yield _SEEN
    finally:
        _WATCHING[0] = False


def refused(path: Path, *fragments: str) -> str:
    """read_torch(path) raises a one-line MalformedFileError holding ``fragments``; nothing ran."""
    with watched() as events, pytest.raises(MalformedFileError) as info:
        read_torch(path)
    message = str(info.value)
    assert events == [], events
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- a pickle assembler


def u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def n(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


HOOKS = g("collections", "OrderedDict") + b")R"
V2 = g("torch._utils", "_rebuild_tensor_v2")


def pid(key: str = "0", numel: int = 6, cls: str = "FloatStorage") -> bytes:
    module = "torch.storage" if cls == "UntypedStorage" else "torch"
    return tup(u("storage"), g(module, cls), u(key), u("cpu"), n(numel)) + b"Q"


def tensor(
    key: str = "0",
    size: tuple[int, ...] = (2, 3),
    stride: tuple[int, ...] | None = None,
    offset: int = 0,
    numel: int | None = None,
    cls: str = "FloatStorage",
) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    if stride is None:
        stride = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
    numel = offset + math.prod(size) if numel is None else numel
    args = tup(pid(key, numel, cls), n(offset), tup(*map(n, size)), tup(*map(n, stride)), b"\x89", HOOKS)
    return V2 + args + b"R"


def state(items: dict[str, bytes]) -> bytes:
    """Protocol-2 pickle of a dict of ``items`` (each value an assembled object)."""
    return b"\x80\x02}(" + b"".join(u(k) + v for k, v in items.items()) + b"u."


# ----------------------------------------------------------------------------- archives


def zip_bytes(members: list[tuple[str, bytes]], *, deflate: tuple[str, ...] = (), comment: bytes = b"") -> bytes:
    """A zip of ``members`` in order (stored unless named in ``deflate``), CRCs correct."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are wanted by some tests
        with zipfile.ZipFile(buffer, "w") as z:
            z.comment = comment
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
                z.writestr(info, data)
    return buffer.getvalue()


def members(pkl: bytes, storages: dict[str, bytes] | None = None, prefix: str = "archive") -> list[tuple[str, bytes]]:
    """What torch.save writes: the pickle, byteorder, one member per storage, version."""
    storages = {"0": bytes(range(24))} if storages is None else storages
    return [
        (f"{prefix}/data.pkl", pkl),
        (f"{prefix}/byteorder", b"little"),
        *((f"{prefix}/data/{k}", v) for k, v in storages.items()),
        (f"{prefix}/version", b"3\n"),
    ]


def write(folder: Path, data: bytes, name: str = "model.pt") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def archive(folder: Path, pkl: bytes, storages: dict[str, bytes] | None = None, **kwargs: Any) -> Path:
    return write(folder, zip_bytes(members(pkl, storages), **kwargs))


# ----------------------------------------------------------------------------- the baseline


def test_assembled_archive_reads(tmp_path: Path) -> None:
    """The assembler's valid archive reads; every other test changes one thing of it."""
    path = archive(tmp_path, state({"w": tensor(), "w.T": tensor(size=(3, 2), stride=(1, 3))}))
    with watched() as events:
        arrays = map_arrays(read_torch(path))
    assert events == []
    assert arrays["w"].tobytes() == bytes(range(24)) and (arrays["w.T"] == arrays["w"].T).all()
    torch = pytest.importorskip("torch")
    loaded = torch.load(path, weights_only=True)
    assert loaded["w"].numpy().tobytes() == bytes(range(24)) and (loaded["w.T"].numpy() == arrays["w.T"]).all()


# ----------------------------------------------------------------------------- globals and calls


class Shell:
    """Pickles as ``os.system(command)``: the classic pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class Custom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Custom, ())


def test_os_system_does_not_run(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    exploit = pickle.dumps({"w": Shell(f"touch {pwned}")}, protocol=2)
    refused(archive(tmp_path, exploit), "data.pkl' byte ", f"global '{os.system.__module__}.system' is refused")
    handmade = state({"w": g("os", "system") + tup(u(f"touch {pwned}")) + b"R"})
    refused(archive(tmp_path, handmade), "global 'os.system' is refused", "nothing was imported or called")
    assert not pwned.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("subprocess", "Popen"),
        ("functools", "partial"),
        ("torch", "load"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "Tensor"),
        ("collections", "Counter"),
        ("torch.cuda", "FloatStorage"),
        ("torch", "QInt8Storage"),
        ("torch", "float32"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("__main__", "Anything"),
    ],
)
def test_globals_outside_the_allow_list(tmp_path: Path, module: str, name: str) -> None:
    call = tup(u("echo hi")) + b"R"
    refused(archive(tmp_path, state({"w": g(module, name) + call})), f"global '{module}.{name}' is refused")
    stacked = b"\x80\x04" + u(module) + u(name) + b"\x93" + call + b"."  # STACK_GLOBAL, protocol 4
    refused(archive(tmp_path, stacked), f"global '{module}.{name}' is refused")


@pytest.mark.parametrize(
    "module, name, hint",
    [
        ("torch._tensor", "_rebuild_from_type_v2", "a tensor subclass or a tensor with Python attributes"),
        ("torch._utils", "_rebuild_parameter_with_state", "a Parameter with Python attributes"),
        ("torch._utils", "_rebuild_qtensor", "a quantized tensor"),
        ("torch", "float4_e2m1fn_x2", "two 4-bit floats per byte"),
        ("torch", "complex32", "a dtype numpy cannot represent"),
    ],
)
def test_torch_globals_we_do_not_support_say_why(tmp_path: Path, module: str, name: str, hint: str) -> None:
    refused(archive(tmp_path, state({"w": g(module, name)})), f"'{module}.{name}' is refused (", hint)


def test_custom_class_reduce(tmp_path: Path) -> None:
    exploit = pickle.dumps({"w": Custom()}, protocol=2)
    refused(archive(tmp_path, exploit), f"global '{__name__}.Custom' is refused")


def test_object_pickled_with_newobj(tmp_path: Path) -> None:
    refused(archive(tmp_path, pickle.dumps({"w": Path("x")}, protocol=2)), "global 'pathlib.PosixPath' is refused")


@pytest.mark.parametrize(
    "opcode, name",
    [
        (b"\x81", "NEWOBJ"),
        (b"\x92", "NEWOBJ_EX"),
        (b"i", "INST"),
        (b"o", "OBJ"),
        (b"\x82", "EXT1"),
        (b"\x83", "EXT2"),
        (b"\x84", "EXT4"),
        (b"P", "PERSID"),
        (b"\x8b", "LONG4"),
        (b"S", "STRING"),
        (b"U", "SHORT_BINSTRING"),
        (b"I", "INT"),
        (b"0", "POP"),
        (b"2", "DUP"),
        (b"\x8f", "EMPTY_SET"),
        (b"\x91", "FROZENSET"),
        (b"\x96", "BYTEARRAY8"),
        (b"\x97", "NEXT_BUFFER"),
        (b"\x98", "READONLY_BUFFER"),
        (b"\xff", "0xff"),
    ],
)
def test_opcodes_outside_the_allow_list(tmp_path: Path, opcode: bytes, name: str) -> None:
    pkl = b"\x80\x02" + g("collections", "OrderedDict") + b")" + opcode + b"."
    refused(archive(tmp_path, pkl), "data.pkl' byte 28: ", f"opcode {name} is refused")


def test_build(tmp_path: Path) -> None:
    od = g("collections", "OrderedDict") + b")R"
    good = b"\x80\x02" + od + b"(" + u("w") + tensor() + b"u}" + u("_metadata") + od + b"sb."
    assert list(read_torch(archive(tmp_path, good)).tensors) == ["w"]  # what Module.state_dict() pickles
    for target, message in [
        (b"}", "BUILD on a dict is refused"),
        (b"]", "BUILD on a list is refused"),
        (tensor(), "BUILD on a tensor is refused"),
        (g("collections", "OrderedDict"), "BUILD on a global collections.OrderedDict is refused"),
    ]:
        refused(archive(tmp_path, b"\x80\x02" + target + b"}b."), message)
    for build_state, found in [
        (b"}" + u("__class__") + u("x") + b"s", "a dict ['__class__']"),
        (b"}(" + u("_metadata") + b"N" + u("__setstate__") + b"Nu", "a dict ['_metadata', '__setstate__']"),
        (b"NN\x86", "a tuple []"),
        (b"}" + n(1) + b"Ns", "a dict []"),
    ]:
        refused(archive(tmp_path, b"\x80\x02" + od + build_state + b"b."), f"BUILD of an OrderedDict with {found}")


def test_reduce_targets(tmp_path: Path) -> None:
    for func, message in [
        (g("torch", "FloatStorage"), "REDUCE on a global torch.FloatStorage is refused"),
        (g("torch", "float8_e4m3fn"), "REDUCE on a global torch.float8_e4m3fn is refused"),
        (u("os.system"), "REDUCE on a str is refused"),
        (b"}", "REDUCE on a dict is refused"),
        (tensor(), "REDUCE on a tensor is refused"),
    ]:
        refused(archive(tmp_path, state({"w": func + tup(u("x")) + b"R"})), message)
    args = tup(b"]" + tup(u("a"), n(1)) + b"a")
    refused(archive(tmp_path, state({"w": g("collections", "OrderedDict") + args + b"R"})), "with 1 arguments")
    refused(archive(tmp_path, state({"w": V2 + u("args") + b"R"})), "with a str of arguments, expected a tuple")


def rebuild(*args: bytes, func: bytes = V2) -> bytes:
    return state({"w": func + tup(*args) + b"R"})


def test_rebuilder_argument_types(tmp_path: Path) -> None:
    size, stride = tup(n(2), n(3)), tup(n(3), n(1))
    good = [pid(), n(0), size, stride, b"\x89", HOOKS]
    assert read_torch(archive(tmp_path, rebuild(*good))).tensors["w"].shape == (2, 3)
    expected = "expected (storage, int, tuple, tuple, bool, dict)"
    for i, bad in [(0, u("storage")), (1, b"\x88"), (1, b"G" + struct.pack(">d", 0.0)), (2, b"]"), (4, n(0))]:
        args = [*good[:i], bad, *good[i + 1 :]]
        refused(archive(tmp_path, rebuild(*args)), "torch._utils._rebuild_tensor_v2 arguments are (", expected)
    refused(archive(tmp_path, rebuild(*good[:5])), "arguments are (storage, int, tuple, tuple, bool), expected")
    hooks = g("collections", "OrderedDict") + b")R" + u("h") + n(1) + b"s"
    refused(archive(tmp_path, rebuild(*good[:5], hooks)), "backward_hooks holds 1 entries, expected none")
    conj = b"}" + u("conj") + b"\x88s"
    refused(archive(tmp_path, rebuild(*good, conj)), "metadata (a lazy conj/neg view: save x.resolve_conj()")
    assert read_torch(archive(tmp_path, rebuild(*good, b"}"))).tensors["w"].shape == (2, 3)  # empty metadata
    for dims, found in [(tup(n(2), b"\x88"), "bool"), (tup(n(2), b"N"), "None"), (tup(n(2), u("3")), "str")]:
        refused(archive(tmp_path, rebuild(*good[:2], dims, stride, *good[4:])), f"size holds a {found}, expected ints")
        refused(archive(tmp_path, rebuild(*good[:3], dims, *good[4:])), f"stride holds a {found}, expected ints")


def test_rebuild_v3_and_parameter(tmp_path: Path) -> None:
    v3 = g("torch._utils", "_rebuild_tensor_v3")
    good = [pid(cls="UntypedStorage", numel=6), n(0), tup(n(2), n(3)), tup(n(3), n(1)), b"\x89", HOOKS]
    read = read_torch(archive(tmp_path, rebuild(*good, g("torch", "float8_e5m2"), func=v3), {"0": bytes(6)}))
    assert str(read.tensors["w"].dtype) == "float8_e5m2"
    refused(
        archive(tmp_path, rebuild(*good, g("torch", "FloatStorage"), func=v3)),
        "dtype is a global torch.FloatStorage, expected",
    )
    refused(archive(tmp_path, rebuild(*good, func=v3)), "expected (storage, int, tuple, tuple, bool, dict, global)")
    param = g("torch._utils", "_rebuild_parameter")
    read = read_torch(archive(tmp_path, state({"w": param + tup(tensor(), b"\x88", HOOKS) + b"R"})))
    assert read.tensors["w"].shape == (2, 3)
    refused(
        archive(tmp_path, state({"w": param + tup(u("t"), b"\x88", HOOKS) + b"R"})), "expected (tensor, bool, dict)"
    )


def test_persistent_ids(tmp_path: Path) -> None:
    def with_pid(pid_tuple: bytes) -> bytes:
        args = tup(pid_tuple + b"Q", n(0), tup(n(2), n(3)), tup(n(3), n(1)), b"\x89", HOOKS)
        return state({"w": V2 + args + b"R"})

    fs = g("torch", "FloatStorage")
    for pid_tuple, found in [
        (tup(u("storage"), fs, u("0"), u("cpu")), "persistent id is (str, global torch.FloatStorage, str, str)"),
        (tup(u("module"), fs, u("0"), u("cpu"), n(6)), "persistent id is (str, global"),
        (tup(u("storage"), u("FloatStorage"), u("0"), u("cpu"), n(6)), "persistent id is (str, str, str"),
        (tup(u("storage"), fs, u("0"), u("cpu"), u("6")), "(str, global torch.FloatStorage, str, str, str)"),
        (tup(u("storage"), fs, u("0"), u("cpu"), b"\x88"), "str, bool), expected"),
        (tup(u("storage"), fs, n(0), u("cpu"), n(6)), "(str, global torch.FloatStorage, int, str, int)"),
        (tup(u("storage"), g("collections", "OrderedDict"), u("0"), u("cpu"), n(6)), "global collections.Ord"),
        (n(7), "persistent id is an int"),
        (u("storage"), "persistent id is a str"),
    ]:
        refused(archive(tmp_path, with_pid(pid_tuple)), found, "expected (str 'storage', global storage class")
    for key in ["../0", "/etc/passwd", "a\\b", "..", ".", "", "x\0"]:
        refused(archive(tmp_path, with_pid(tup(u("storage"), fs, u(key), u("cpu"), n(6)))), "is not a plain member")


# ----------------------------------------------------------------------------- bounds


def test_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkl = state({"w": tensor()})
    monkeypatch.setattr(torch_zip, "MAX_PICKLE_BYTES", len(pkl) - 1)
    refused(archive(tmp_path, pkl), f"member 'archive/data.pkl' is {len(pkl)} bytes, over the limit of {len(pkl) - 1}")


def test_object_and_memo_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unpickler, "MAX_OBJECTS", 1000)
    many = b"\x80\x02](" + b"N" * 1000 + b"e."
    refused(archive(tmp_path, many), "more than 1000 values")
    memo = b"\x80\x02N" + b"".join(b"r" + struct.pack("<I", i) for i in range(1001)) + b"."
    refused(archive(tmp_path, memo), "more than 1000 memo entries")
    same_slot = b"\x80\x02N" + b"q\x00" * 5000 + b"."  # re-setting one index does not grow the memo
    refused(archive(tmp_path, same_slot), "top-level object is a None")


def test_nesting_limit(tmp_path: Path) -> None:
    refused(archive(tmp_path, b"\x80\x02" + b"(" * (MAX_DEPTH + 1)), f"more than {MAX_DEPTH} nested MARKs")
    deep = b"\x80\x02" + b"(" * MAX_DEPTH + b")" + b"t" * MAX_DEPTH + b"."
    refused(archive(tmp_path, deep), "top-level object is a tuple")


def test_deep_and_cyclic_structures_do_not_recurse(tmp_path: Path) -> None:
    deep = b"\x80\x02N" + b"\x85" * 50_000 + b"."  # 50k nested tuples: nothing recurses
    refused(archive(tmp_path, deep), "top-level object is a tuple")
    refused(archive(tmp_path, state({"t": tensor(), "w": b"N" + b"\x85" * 50_000})), "key 'w' holds a tuple")
    cyclic = state({"t": tensor(), "w": b"]q\x07h\x07a"})  # a list that contains itself
    refused(archive(tmp_path, cyclic), "key 'w' holds a list, expected a tensor")
    cyclic_dict = b"\x80\x02}q\x00" + u("self") + b"h\x00s."
    refused(archive(tmp_path, cyclic_dict), "top-level keys are 'self' (no tensor among them)")
    # each list holds the previous one twice: 301 objects, 2**300 paths for a naive walk
    doubling = b"(]q\x00" + b"(h\x00h\x00lq\x00" * 300 + b"t"
    refused(archive(tmp_path, state({"t": tensor(), "w": doubling})), "key 'w' holds a tuple, expected a tensor")


def test_memo_tricks(tmp_path: Path) -> None:
    refused(archive(tmp_path, b"\x80\x02h\x05."), "byte 2: memo index 5 is read before it is set")
    refused(archive(tmp_path, b"\x80\x02j\xff\xff\xff\xff."), "memo index 4294967295 is read before it is set")
    refused(archive(tmp_path, b"\x80\x02q\x00N."), "BINPUT on an empty stack")
    refused(archive(tmp_path, b"\x80\x02N(q\x00."), "BINPUT on an empty stack")  # MARK hides the stack


def test_lengths_are_never_trusted(tmp_path: Path) -> None:
    for pkl, message in [
        (b"\x80\x02X\xff\xff\xff\xffabc.", "BINUNICODE needs 4294967295 bytes but the pickle ends at byte 11"),
        (b"\x80\x02\x8d" + b"\xff" * 8 + b".", f"BINUNICODE8 needs {2**64 - 1} bytes"),
        (b"\x80\x02\x8e" + (2**62).to_bytes(8, "little") + b".", f"BINBYTES8 needs {2**62} bytes"),
        (b"\x80\x02B\x00\x00\x00\x01.", "BINBYTES needs 16777216 bytes"),
        (b"\x80\x02C\x05ab", "SHORT_BINBYTES needs 5 bytes"),
        (b"\x80\x02\x8a\xffab", "LONG1 needs 255 bytes"),
        (b"\x80\x04\x95" + (10**6).to_bytes(8, "little") + b"N.", "FRAME runs past the end of the pickle"),
        (b"\x80\x02J\x01\x02", "BININT needs 4 bytes but the pickle ends at byte 5"),
        (b"\x80\x02cos\nsystem", "GLOBAL name is not a line of at most 255 bytes"),
        (b"\x80\x02c" + b"a" * 300 + b"\nb\n.", "GLOBAL name is not a line of at most 255 bytes"),
        (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "string is not valid UTF-8 (its byte 0)"),
        (b"\x80", "PROTO needs 1 bytes but the pickle ends at byte 1"),
    ]:
        refused(archive(tmp_path, pkl), message)


def test_stack_discipline(tmp_path: Path) -> None:
    for pkl, message in [
        (b"\x80\x02N\x87.", "TUPLE3 needs 3 values, the stack holds 1"),
        (b"\x80\x02a.", "APPEND on an empty stack"),
        (b"\x80\x02}Na.", "APPEND to a dict; only lists take items"),
        (b"\x80\x02]NNs.", "SETITEM on a list; only dicts take items"),
        (b"\x80\x02}(Nu.", "SETITEMS with an odd number (1) of keys and values"),
        (b"\x80\x02t.", "TUPLE without a MARK"),
        (b"\x80\x02NN.", "STOP with 0 open MARKs, 2 values and 0 bytes after it"),
        (b"\x80\x02(N.", "STOP with 1 open MARKs, 1 values"),
        (b"\x80\x02N.N", "STOP with 0 open MARKs, 1 values and 1 bytes after it"),
        (b"\x80\x02N", "byte 3: the pickle ends without STOP"),
        (b"", "byte 0: the pickle ends without STOP"),
        (b"\x80\x06N.", "PROTO 6 (protocols 2 to 5 are read, at byte 0 only)"),
        (b"\x80\x01N.", "PROTO 1"),
        (b"N\x80\x02.", "byte 1: PROTO 2"),
        (b"\x80\x02R.", "REDUCE on an empty stack"),
        (b"\x80\x02Q.", "BINPERSID on an empty stack"),
        (b"\x80\x02\x93.", "STACK_GLOBAL on an empty stack"),
        (b"\x80\x02NN\x93.", "STACK_GLOBAL of a None and a None, expected two strings"),
    ]:
        refused(archive(tmp_path, pkl), message)


def test_non_string_keys_are_never_hashed(tmp_path: Path) -> None:
    # int keys whose hashes collide (hash(i * (2**61 - 1)) == 0) would make dict insertion quadratic
    colliding = b"".join(n(i * (2**61 - 1)) + b"N" for i in range(1, 20_000))
    refused(archive(tmp_path, b"\x80\x02}(" + colliding + b"u."), "state dict has 19999 keys that are not strings")
    mixed = b"\x80\x02}(" + u("w") + tensor() + n(0) + tensor() + b"u."
    refused(archive(tmp_path, mixed), "state dict has 1 keys that are not strings (first: an int)")
    pairs = b"\x80\x02(" + u("w") + tensor() + b"NNd."  # DICT with a None key
    refused(archive(tmp_path, pairs), "(first: a None)")


# ----------------------------------------------------------------------------- tensors and storages


def test_storage_key_without_member(tmp_path: Path) -> None:
    refused(
        archive(tmp_path, state({"w": tensor(key="7")})), "tensor 'w': storage key '7' has no member 'archive/data/7'"
    )


def test_storage_size_must_match_its_member(tmp_path: Path) -> None:
    refused(
        archive(tmp_path, state({"w": tensor(numel=5)})),
        "tensor 'w': storage '0' is 5 float32 elements (20 bytes) but member 'archive/data/0' holds 24 bytes",
    )
    refused(archive(tmp_path, state({"w": tensor(size=(0,), numel=-1)})), "storage '0' is -1 float32 elements")
    refused(archive(tmp_path, state({"w": tensor(numel=2**70)})), f"storage '0' is {2**70} float32 elements")


def test_view_past_its_storage(tmp_path: Path) -> None:
    for view, need in [
        (tensor(offset=1, numel=6), 28),
        (tensor(size=(2, 3), stride=(4, 1), numel=6), 28),
        (tensor(size=(7,), numel=6), 28),
        (tensor(size=(2, 2), stride=(0, 6), numel=6), 28),
        (tensor(size=(), offset=6, numel=6), 28),
    ]:
        refused(archive(tmp_path, state({"w": view})), "tensor 'w': view (offset", f"needs {need} bytes", "holds 24")
    edge = read_torch(archive(tmp_path, state({"w": tensor(size=(), offset=5, numel=6)}))).tensors["w"]
    assert edge.shape == () and edge.nbytes == 4
    empty = read_torch(archive(tmp_path, state({"w": tensor(size=(0, 9), offset=99, numel=6)}))).tensors["w"]
    assert empty.nbytes == 0  # no element, nothing to check against the storage


@pytest.mark.parametrize(
    "view, found",
    [
        (tensor(size=(-1,), numel=6), "size (-1,)"),
        (tensor(size=(2, 3), stride=(3, -1), numel=6), "stride (3, -1)"),
        (tensor(offset=-1, numel=6), "offset -1"),
        (tensor(size=(2**63,), numel=6), f"size ({2**63},)"),
        (tensor(size=(1, 2), stride=(2**63, 1), numel=6), f"stride ({2**63}, 1)"),
        (tensor(size=(1,) * 65, numel=6), "size (1, 1, 1, 1, 1, 1, 1, 1, ...)"),
        (tensor(size=(2, 3), stride=(3,), numel=6), "stride (3,)"),
    ],
)
def test_absurd_sizes_strides_offsets(tmp_path: Path, view: bytes, found: str) -> None:
    refused(archive(tmp_path, state({"w": view})), "tensor 'w': size ", found, "all integers in [0, 2**62]")


def test_size_one_axes_with_huge_strides_still_map(tmp_path: Path) -> None:
    pkl = state({"w": tensor(size=(3, 1, 2), stride=(1, 2**62, 3), numel=6)})
    t = read_torch(archive(tmp_path, pkl)).tensors["w"]
    assert t.strides == (4, 8, 12)  # the size-1 axis gets its C stride: any stride is the same there
    a = map_arrays(read_torch(archive(tmp_path, pkl)))["w"]
    base = np.frombuffer(bytes(range(24)), "<f4")
    assert np.ascontiguousarray(a).tobytes() == base.reshape(2, 3).T.reshape(3, 1, 2).tobytes()


def test_shared_storage_must_agree(tmp_path: Path) -> None:
    half = tensor(size=(12,), numel=12, cls="HalfStorage")
    refused(
        archive(tmp_path, state({"a": tensor(), "b": half})),
        "storage '0' is a FloatStorage of 6 elements for tensor 'a' but a HalfStorage of 12 elements for tensor 'b'",
    )
    refused(archive(tmp_path, state({"a": tensor(), "b": tensor(size=(5,), numel=5)})), "FloatStorage of 5 elements")


# ----------------------------------------------------------------------------- top level


def test_top_level_shapes(tmp_path: Path) -> None:
    expected = "expected a state dict (name -> tensor) or openai-whisper's {'dims': ..., 'model_state_dict': ...}"
    refused(archive(tmp_path, b"\x80\x02" + tup(tensor()) + b"."), "top-level object is a tuple; " + expected)
    refused(archive(tmp_path, b"\x80\x02" + tensor() + b"."), "top-level object is a tensor")
    training = state({"model": b"}", "optimizer": b"}", "epoch": n(3)})
    refused(archive(tmp_path, training), "top-level keys are 'model', 'optimizer', 'epoch' (no tensor among them)")
    refused(archive(tmp_path, state({"w": tensor(), "step": n(3)})), "key 'step' holds an int, expected a tensor")
    refused(archive(tmp_path, state({"w": tensor(), "b": b"N"})), "key 'b' holds a None, expected a tensor")


def test_openai_whisper_layout_checks(tmp_path: Path) -> None:
    dims = b"}" + u("n_mels") + n(80) + b"s"
    good = state({"dims": dims, "model_state_dict": b"}" + u("w") + tensor() + b"s"})
    assert read_torch(archive(tmp_path, good)).metadata == {"dims": '{"n_mels":80}'}
    bad_dims = b"}" + u("n_mels") + u("80") + b"s"
    refused(
        archive(tmp_path, state({"dims": bad_dims, "model_state_dict": b"}"})), "'dims' is not a dict of str -> int"
    )
    refused(archive(tmp_path, state({"dims": b"]", "model_state_dict": b"}"})), "(found a list)")
    refused(archive(tmp_path, state({"dims": dims, "model_state_dict": b"]"})), "'model_state_dict' is a list")
    value = state({"dims": dims, "model_state_dict": b"}" + u("w") + n(1) + b"s"})
    refused(archive(tmp_path, value), "model_state_dict['w'] holds an int, expected a tensor")


def test_real_training_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    refused(path, "top-level keys are 'model', 'optimizer', 'epoch' (no tensor among them); expected a state dict")
