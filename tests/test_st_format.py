"""Tests of fastfuse.formats.safetensors_file: header validation, mmap views, layout and the atomic writer."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from filetools import BF16, NO_PERMISSIONS, entry, map_tensors, raw_file, same, sample_arrays, write
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fastfuse.errors import (
    DtypeMismatchError,
    FuseError,
    FuseFileNotFoundError,
    FusePermissionError,
    MalformedFileError,
)
from fastfuse.formats.safetensors_dtypes import DTYPES, dtype_code, dtype_of
from fastfuse.formats.safetensors_file import (
    MAX_HEADER_BYTES,
    OutputTensor,
    layout,
    read_header,
    read_index,
    read_safetensors,
)
from fastfuse.formats.stored import map_arrays

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- dtypes


def test_dtypes_table() -> None:
    assert list(DTYPES) == [
        "F64",
        "F32",
        "F16",
        "BF16",
        "I64",
        "I32",
        "I16",
        "I8",
        "U64",
        "U32",
        "U16",
        "U8",
        "BOOL",
        "F8_E4M3",
        "F8_E5M2",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "F8_E8M0",
        "C64",
    ]
    assert DTYPES["BF16"] == BF16 and DTYPES["F32"] == np.float32 and DTYPES["BOOL"] == np.bool_
    assert DTYPES["F8_E4M3"] == ml_dtypes.float8_e4m3fn and DTYPES["F8_E5M2"] == ml_dtypes.float8_e5m2
    assert DTYPES["F8_E8M0"] == ml_dtypes.float8_e8m0fnu and DTYPES["C64"] == np.complex64
    for code, dt in DTYPES.items():
        assert dtype_code(dt) == code and dtype_of(code) == dt
    assert dtype_code(np.float16) == "F16" and dtype_code("int8") == "I8"


@pytest.mark.parametrize("dtype", [np.complex128, np.dtype(">f4"), np.dtype("V2"), np.float128])
def test_dtype_code_unsupported(dtype: Any) -> None:
    with pytest.raises(DtypeMismatchError, match="cannot be stored in safetensors"):
        dtype_code(dtype)


# ----------------------------------------------------------------------------- reading


def test_round_trip_vs_reference(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    arrays = sample_arrays()
    save_file(arrays, str(path), metadata={"format": "pt"})
    header = read_header(path)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert header.path == str(path) and header.data_offset == 8 + n
    assert header.file_size == path.stat().st_size and header.metadata == {"format": "pt"}
    file_order = [k for k in json.loads(path.read_bytes()[8 : 8 + n]) if k != "__metadata__"]
    assert list(header.tensors) == file_order
    views = map_tensors(header)
    assert list(views) == file_order
    with safe_open(str(path), "np") as ref:
        assert sorted(ref.keys()) == sorted(views)
        for name, view in views.items():
            info = header.tensors[name]
            assert info.name == name and info.nbytes == view.nbytes == info.end - info.start
            assert DTYPES[info.dtype] == view.dtype and info.shape == view.shape
            assert same(view, ref.get_tensor(name)) and same(view, arrays[name])
            assert not view.flags.writeable


def test_views_share_one_map_and_outlive_everything(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": np.arange(4, dtype=np.float32), "b": np.ones(3, np.int64)}, str(path))
    views = map_tensors(read_header(path))
    a = views.pop("a")
    del views
    assert a.tolist() == [0, 1, 2, 3] and isinstance(a.base, mmap.mmap)
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 1


def test_f8_round_trip(tmp_path: Path) -> None:
    arrays = {
        "e4": np.arange(-4, 4, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
        "e5": np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e5m2).reshape(2, 3),
    }
    save_file(arrays, str(tmp_path / "ref.safetensors"))
    write(tmp_path / "ours.safetensors", arrays)
    for name in ("ref", "ours"):
        views = map_tensors(read_header(tmp_path / f"{name}.safetensors"))
        assert all(same(views[k], arrays[k]) for k in arrays)


@pytest.mark.parametrize("pad", [b" " * 6, b"\n", b"  \t\r\n"])
def test_whitespace_padding_accepted(tmp_path: Path, pad: bytes) -> None:
    path = tmp_path / "p.safetensors"
    header = json.dumps({"a": entry("F32", [1], 0, 4)}).encode()
    path.write_bytes(raw_file(pad + header + pad, b"\x00\x00\x80\x3f"))
    assert map_tensors(read_header(path))["a"].tolist() == [1.0]
    with safe_open(str(path), "np") as ref:  # the reference reader agrees
        assert ref.keys() == ["a"]


def test_unpadded_header_gives_unaligned_views(tmp_path: Path) -> None:
    path = tmp_path / "u.safetensors"
    values = np.array([1.5, -2.0], "<f4")
    path.write_bytes(raw_file({"a": entry("F32", [2], 0, 8)}, values.tobytes()))  # 8 + 61 bytes
    header = read_header(path)
    assert header.data_offset % 4 != 0
    assert same(map_tensors(header)["a"], values)


def test_empty_and_zero_byte_tensors(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(raw_file(b"{}      "))
    header = read_header(path)
    assert header.tensors == {} and header.metadata is None and header.data_size == 0
    assert map_tensors(header) == {}
    path.write_bytes(
        raw_file({"__metadata__": None, "z": entry("BF16", [0, 3], 0, 0), "s": entry("F32", [2, 0], 0, 0)})
    )
    views = map_tensors(read_header(path))
    assert views["z"].shape == (0, 3) and views["z"].dtype == BF16 and views["s"].shape == (2, 0)


def _hostile() -> Iterator[Any]:
    """(file bytes, message piece, whether the reference reader rejects it too)."""
    f32 = entry("F32", [1], 0, 4)
    yield pytest.param(b"", "file is 0 bytes, too short", True, id="empty")
    yield pytest.param(b"\x01\x02", "file is 2 bytes, too short", True, id="lt8")
    yield pytest.param(
        raw_file(b"{}", length=100),
        r"header length 100 runs past the end of the file "
        r"\(10 bytes, so at most 2\)",
        True,
        id="length-past-end",
    )
    yield pytest.param(
        raw_file(b"{}", length=2**40),
        f"header length 1099511627776 exceeds the limit of {MAX_HEADER_BYTES} bytes",
        True,
        id="huge-length",
    )
    yield pytest.param(raw_file(b"{}", length=2**64 - 1), "exceeds the limit", True, id="u64-max-length")
    yield pytest.param(raw_file(b""), "header is not valid JSON: Expecting value", True, id="empty-header")
    yield pytest.param(raw_file(b"{nope"), "header is not valid JSON: .* line 1 column 2", True, id="not-json")
    yield pytest.param(raw_file(b"{}\x00\x00"), "header is not valid JSON: Extra data", True, id="nul-padding")
    yield pytest.param(
        raw_file(b'{"\xff": 1}'), r"header is not valid UTF-8 \(byte 2 of the header\)", True, id="bad-utf8"
    )
    yield pytest.param(raw_file(b"[]"), "header is a JSON array, expected an object", True, id="array")
    yield pytest.param(raw_file(b"3"), "header is a JSON number, expected an object", True, id="number")
    yield pytest.param(raw_file(b"[" * 100_000 + b"]" * 100_000), "nested too deeply", True, id="deep")
    yield pytest.param(
        raw_file(b'{"a": %s, "a": %s}' % ((json.dumps(f32).encode(),) * 2), bytes(4)),
        "header has duplicated key 'a' \\(the format forbids",
        False,
        id="dup-tensor",
    )
    yield pytest.param(
        raw_file(b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
        "duplicated key 'dtype'",
        False,
        id="dup-field",
    )
    yield pytest.param(
        raw_file({"__metadata__": {"k": 1}}),
        "__metadata__ key 'k' holds a JSON number 1, expected a string",
        True,
        id="meta-value",
    )
    yield pytest.param(
        raw_file({"__metadata__": ["x"]}), "__metadata__ is a JSON array, expected an object", True, id="meta-array"
    )
    yield pytest.param(
        raw_file({"a": [1]}),
        r"tensor 'a' entry has a JSON array, expected exactly the "
        r"keys \['data_offsets', 'dtype', 'shape'\]",
        True,
        id="entry-array",
    )
    yield pytest.param(
        raw_file({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
        r"tensor 'a' entry has \['dtype', 'shape'\], expected exactly",
        True,
        id="missing-field",
    )
    yield pytest.param(
        raw_file({"a": {**f32, "extra": 1}}, bytes(4)),
        r"entry has \['data_offsets', 'dtype', 'extra', 'shape'\]",
        False,
        id="extra-field",
    )
    yield pytest.param(
        raw_file({"a": entry("F99", [1], 0, 4)}, bytes(4)),
        "tensor 'a' has unsupported dtype \"F99\" \\(supported: F64, F32",
        True,
        id="dtype",
    )
    yield pytest.param(
        raw_file({"a": entry("F4", [2], 0, 1)}, bytes(1)), 'unsupported dtype "F4"', False, id="dtype-f4"
    )
    yield pytest.param(raw_file({"a": entry(4, [1], 0, 4)}, bytes(4)), "unsupported dtype 4", True, id="dtype-int")
    for shape, shown, name in [
        ([-1], r"\[-1\]", "neg"),
        ([1.0], r"\[1.0\]", "float"),
        ([True], r"\[true\]", "bool"),
        ("4", '"4"', "string"),
        (None, "null", "null"),
        ({"n": 1}, r'\{"n": 1\}', "object"),
    ]:
        yield pytest.param(
            raw_file({"a": entry("F32", shape, 0, 4)}, bytes(4)),
            f"tensor 'a' shape {shown} is not a list of non-negative integers",
            True,
            id=f"shape-{name}",
        )
    yield pytest.param(
        raw_file({"a": entry("F32", [2**62, 2**62], 0, 4)}, bytes(4)),
        r"tensor 'a' data_offsets \[0, 4\] hold 4 bytes but shape \[4611686018427387904, "
        r"4611686018427387904\] of F32 needs more than 2\*\*64 \(it overflows\)",
        True,
        id="shape-overflow",
    )
    yield pytest.param(
        raw_file(b'{"a": {"dtype": "F32", "shape": [1%s], "data_offsets": [0, 4]}}' % (b"0" * 5000), bytes(4)),
        "header is not valid JSON: Exceeds the limit",
        True,
        id="long-int",
    )
    yield pytest.param(
        raw_file({"a.weight": entry("F32", [5, 5], 0, 99)}, bytes(99)),
        r"model.safetensors: tensor 'a.weight' data_offsets \[0, 99\] hold 99 bytes but "
        r"shape \[5, 5\] of F32 needs 100$",
        True,
        id="size-mismatch",
    )
    for offsets, shown, name in [
        ([8, 4], r"\[8, 4\]", "start-gt-end"),
        ([-4, 0], r"\[-4, 0\]", "negative"),
        ([0], r"\[0\]", "one"),
        ([0, 4, 4], r"\[0, 4, 4\]", "three"),
        ([0.0, 4], r"\[0.0, 4\]", "float"),
        ([False, True], r"\[false, true\]", "bool"),
        ("0,4", '"0,4"', "string"),
    ]:
        yield pytest.param(
            raw_file({"a": entry("F32", [1], offsets)}, bytes(8)),
            f"tensor 'a' data_offsets {shown} are not \\[start, end\\] integers with 0 <= start <= end",
            True,
            id=f"offsets-{name}",
        )
    yield pytest.param(
        raw_file({"a": entry("F32", [2], 0, 8)}, bytes(4)),
        r"tensor 'a' data_offsets \[0, 8\] run past the end of the data section "
        r"\(4 bytes; is the file truncated\?\)",
        True,
        id="truncated-data",
    )
    yield pytest.param(
        raw_file({"a": entry("F32", [1], 2**64, 2**64 + 4)}, bytes(4)),
        r"data_offsets \[18446744073709551616, 18446744073709551620\] run past",
        True,
        id="offsets-out-of-range",
    )
    yield pytest.param(
        raw_file({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
        r"tensor 'b' data_offsets \[4, 12\] overlap tensor 'a' \[0, 8\]",
        True,
        id="overlap",
    )
    yield pytest.param(
        raw_file({"b": entry("F32", [1], 0, 4), "a": entry("F32", [1], 0, 4)}, bytes(4)),
        r"tensor 'a' data_offsets \[0, 4\] overlap tensor 'b' \[0, 4\]",
        True,
        id="same-range",
    )
    yield pytest.param(
        raw_file({"a": entry("F32", [2], 0, 8), "z": entry("F32", [0], 4, 4)}, bytes(8)),
        r"tensor 'z' data_offsets \[4, 4\] overlap tensor 'a'",
        True,
        id="empty-inside",
    )
    yield pytest.param(
        raw_file({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
        r"gap of 4 bytes between tensor 'a' \[0, 4\] and tensor 'b' \[8, 12\] "
        r"\(the format forbids gaps\)",
        True,
        id="gap",
    )
    yield pytest.param(
        raw_file({"a": entry("F32", [1], 4, 8)}, bytes(8)),
        r"gap of 4 bytes between the data section start and tensor 'a' \[4, 8\]",
        True,
        id="gap-at-start",
    )
    yield pytest.param(
        raw_file({"a": f32}, bytes(6)),
        r"2 trailing bytes after the last tensor "
        r"\(tensors end at 4, the data section is 6 bytes\)",
        True,
        id="trailing",
    )
    yield pytest.param(raw_file(b"{}", bytes(3)), "3 trailing bytes", True, id="trailing-no-tensors")


@pytest.mark.parametrize(("data", "match", "reference_rejects"), list(_hostile()))
def test_hostile_headers(tmp_path: Path, data: bytes, match: str, reference_rejects: bool) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(MalformedFileError, match=match) as info:
        read_header(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400
    if reference_rejects:  # we are at least as strict as safetensors' own reader
        with pytest.raises(SafetensorError), safe_open(str(path), "np"):
            pass


def test_missing_path_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FuseFileNotFoundError, match=r"nope.safetensors: no such file$") as caught:
        read_header(tmp_path / "nope.safetensors")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, FuseError)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_index(tmp_path / "nope.json")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(MalformedFileError, match="is a directory; expected a safetensors file"):
        read_header(tmp_path)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging forever if a FIFO blocks."""

    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifo_does_not_hang(tmp_path: Path, alarm: None) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(MalformedFileError, match=r"is not a regular file \(FIFO, socket or device\)"):
        read_header(fifo)
    with pytest.raises(MalformedFileError, match="not a regular file"):
        read_index(fifo)


@NO_PERMISSIONS
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones(1, np.float32)}, str(path))
    path.chmod(0)
    with pytest.raises(FusePermissionError, match="m.safetensors: permission denied"):
        read_header(path)


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones(1, np.float32)}, str(path))

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(FusePermissionError, match=r"m.safetensors: permission denied \(cannot read") as caught:
        read_header(path)
    assert isinstance(caught.value, PermissionError) and isinstance(caught.value, FuseError)


def test_mapping_detects_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones(2, np.float32)}, str(path))
    stored = read_safetensors(path)
    with open(path, "ab") as f:
        f.write(b"xx")
    size = stored.file_size
    with pytest.raises(MalformedFileError, match=f"is now {size + 2} bytes but was {size} when it was read"):
        map_arrays(stored)


# ----------------------------------------------------------------------------- index


def test_read_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": {"total_size": 8},
                "weight_map": {"b": "model-00002.safetensors", "a": "model-00001.safetensors"},
            }
        )
    )
    assert read_index(index) == {
        "b": str(tmp_path / "model-00002.safetensors"),
        "a": str(tmp_path / "model-00001.safetensors"),
    }
    assert list(read_index(index)) == ["b", "a"]
    monkeypatch.chdir(tmp_path)  # a relative index path still resolves to absolute shard paths
    assert read_index("model.safetensors.index.json")["a"] == str(tmp_path / "model-00001.safetensors")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{", "index is not valid JSON"),
        (b"\xff", "index is not valid UTF-8"),
        (b"[]", r'index has no "weight_map" object .*\(found null\)'),
        (b'{"metadata": {}}', 'index has no "weight_map" object'),
        (b'{"weight_map": []}', r'no "weight_map" object .*\(found \[\]\)'),
        (b'{"weight_map": {"a": "x", "a": "y"}}', "index has duplicated key 'a'"),
        (b'{"weight_map": {"a": 3}}', r"weight_map\['a'\] = 3 is not a plain file name"),
        (b'{"weight_map": {"a": null}}', r"weight_map\['a'\] = null is not"),
        (b'{"weight_map": {"a": "/etc/passwd"}}', r"weight_map\['a'\] = \"/etc/passwd\" is not a plain"),
        (b'{"weight_map": {"a": "../x.safetensors"}}', r"weight_map\['a'\] = \"../x.safetensors\""),
        (b'{"weight_map": {"a": ".."}}', r"weight_map\['a'\] = \"..\""),
        (b'{"weight_map": {"a": ""}}', r"weight_map\['a'\] = \"\""),
        (b'{"weight_map": {"a": "sub/x.safetensors"}}', "sub/x.safetensors"),
        (b'{"weight_map": {"a": "sub\\\\x"}}', r"weight_map\['a'\]"),
        (b'{"weight_map": {"a": "x\\u0000"}}', r"weight_map\['a'\]"),
    ],
)
def test_read_index_bad(tmp_path: Path, content: bytes, match: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(MalformedFileError, match=match) as info:
        read_index(index)
    assert str(info.value).startswith(f"{index}: ")


# ----------------------------------------------------------------------------- layout


def test_layout_order_alignment_and_json() -> None:
    tensors = [
        OutputTensor("z.u8", np.dtype("u1"), (3,)),
        OutputTensor("b.f16", np.dtype("f2"), (3,)),
        OutputTensor("a.f16", np.dtype("f2"), (1,)),
        OutputTensor("y.f64", np.dtype("f8"), (2, 1)),
        OutputTensor("bf", BF16, (0,)),
        OutputTensor("c.f32", np.dtype("f4"), ()),
    ]
    prefix, offsets = layout(tensors, {"format": "pt", "fastfuse": "1"})
    assert list(offsets) == ["y.f64", "c.f32", "a.f16", "b.f16", "bf", "z.u8"]
    assert list(offsets.values()) == [(0, 16), (16, 20), (20, 22), (22, 28), (28, 28), (28, 31)]
    assert len(prefix) % 8 == 0 and int.from_bytes(prefix[:8], "little") == len(prefix) - 8
    text = prefix[8:].decode()
    assert text.startswith('{"__metadata__":{"format":"pt","fastfuse":"1"},"y.f64":{')
    assert ", " not in text and ": " not in text and text.rstrip(" ").endswith("}")
    header = json.loads(text)
    assert {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"} == offsets
    assert header["bf"]["dtype"] == "BF16" and header["c.f32"]["shape"] == []
    assert layout(tensors[::-1], {"format": "pt", "fastfuse": "1"})[0] == prefix  # deterministic


def test_layout_without_metadata_and_empty() -> None:
    prefix, offsets = layout([], None)
    assert offsets == {} and prefix == (8).to_bytes(8, "little") + b"{}" + b" " * 6
    assert b"__metadata__" not in layout([OutputTensor("a", np.dtype("f4"), (1,))], None)[0]


@pytest.mark.parametrize(
    ("tensors", "metadata", "error", "match"),
    [
        (
            [OutputTensor("a", np.dtype("f4"), (1,)), OutputTensor("a", np.dtype("u1"), (1,))],
            None,
            FuseError,
            "output tensor 'a' shape \\[1\\]: the name is duplicated",
        ),
        ([OutputTensor("__metadata__", np.dtype("f4"), (1,))], None, FuseError, "reserved"),
        ([OutputTensor("a", np.dtype("f4"), (-1,))], None, FuseError, "the shape is negative"),
        ([OutputTensor("a", np.dtype("c16"), (1,))], None, DtypeMismatchError, "complex128"),
        ([], {"k": 1}, FuseError, "metadata must map str to str"),
    ],
)
def test_layout_errors(tensors: list[OutputTensor], metadata: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        layout(tensors, metadata)


# ----------------------------------------------------------------------------- round trip

CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(
        st.lists(st.text(min_size=1, max_size=6).filter(lambda s: s != "__metadata__"), max_size=6, unique=True)
    )
    arrays = {}
    for name in names:
        dtype = DTYPES[draw(st.sampled_from(CODES))]
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        n = int(np.prod(shape)) * dtype.itemsize
        data = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), np.uint8)
        if dtype == np.bool_:
            data = np.bitwise_and(data, np.uint8(1))
        arrays[name] = data.view(dtype).reshape(shape)
    return arrays


@settings(max_examples=60, deadline=None)
@given(arrays=tensor_sets(), metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
def test_property_write_read_back(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        write(path, arrays, metadata)
        loaded = load_file(str(path))
        assert loaded.keys() == arrays.keys() and all(same(loaded[k], arrays[k]) for k in arrays)
        with safe_open(str(path), "np") as ref:
            assert ref.metadata() == metadata
        ours = map_tensors(read_header(path))
        assert all(same(ours[k], arrays[k]) for k in arrays)
        del ours
