"""Hostile inputs found by fuzzing: each class escapes as one MalformedFileError, quickly and in
little memory (the limits in the README's "Limits on untrusted input")."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from filetools import raw_file

import fastfuse
from fastfuse.errors import MalformedFileError
from fastfuse.formats import safetensors_file, stored, unpickler
from fastfuse.formats.torch_zip import read_torch


def test_zip_end_record_at_the_start_of_the_searched_tail(tmp_path: Path) -> None:
    """The end record 5 bytes into the searched tail, with what looks like a ZIP64 locator just
    before the tail (read from the file, not from a negative index of the tail)."""
    tail_size = 22 + 0xFFFF
    at = 5
    comment = bytearray(tail_size - at - 22)
    comment[-15:-11] = b"PK\x06\x07"  # where tail[at - 20] wraps around to
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, len(comment))
    body = b"PK\x03\x04" + bytes(1000)
    path = tmp_path / "x.pt"
    path.write_bytes(body + bytes(at) + eocd + bytes(comment))
    assert path.stat().st_size - tail_size == len(body)  # the tail starts right after the body
    with pytest.raises(MalformedFileError, match=r"^" + str(path)):
        read_torch(path)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1] * 65, "shape has 65 dimensions, more than numpy's 64"),
        ([0, 2**64], "shape [0, 18446744073709551616] has more than 2**62 elements"),
        ([0, 2**40, 2**40], "shape [0, 1099511627776, 1099511627776] has more than 2**62 elements"),
    ],
)
def test_safetensors_shapes_numpy_cannot_hold(tmp_path: Path, shape: list[int], message: str) -> None:
    data = b"" if 0 in shape else b"\x01"
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_file({"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, len(data)]}}, data))
    with pytest.raises(MalformedFileError) as caught:
        fastfuse.load(path)
    assert str(caught.value).startswith(f"{path}: tensor 'w': {message}")


def test_a_stride_0_view_is_a_bomb(tmp_path: Path) -> None:
    """One element expanded (stride 0) to 2**34 elements: 1.3 KB of file asking for 32 GiB."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "expand.pt"
    torch.save({"model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1).expand(2**17, 2**17)}, path)
    with pytest.raises(MalformedFileError) as caught:
        fastfuse.load(path)
    assert f"its tensors hold {2**36} bytes, more than 4x the file's" in str(caught.value)


def test_many_keys_of_one_storage_are_a_bomb(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    shared = torch.zeros(512, 512)  # 1 MB
    path = tmp_path / "bomb.pt"
    torch.save({f"t.{i}": shared for i in range(8)}, path)
    with pytest.raises(MalformedFileError) as caught:
        read_torch(path)
    assert str(caught.value) == (
        f"{path}: its tensors hold {8 << 20} bytes, more than 4x the file's {path.stat().st_size} bytes "
        "(keys sharing storage many times over); re-save each tensor with its own storage"
    )
    assert stored.MAX_EXPANSION == 4
    torch.save({"a": shared, "b": shared}, tmp_path / "tied.pt")  # tied weights stay fine
    assert set(read_torch(tmp_path / "tied.pt").tensors) == {"a", "b"}


def test_a_pickle_of_ten_million_dicts_is_refused() -> None:
    data = b"\x80\x02]\x28" + b"}" * 10_000_000 + b"e."  # PROTO, EMPTY_LIST, MARK, EMPTY_DICT..., APPENDS
    with pytest.raises(MalformedFileError) as caught:
        unpickler.unpickle(data, "x")
    assert str(caught.value).endswith(f"more than {unpickler.MAX_OPCODES} opcodes; a state dict needs far fewer")


def test_a_pickle_of_memo_puts_is_refused_early() -> None:
    data = b"\x80\x02N" + b"q\x00" * 49_999_990 + b"."  # 100 MB: NONE, then BINPUT 0 over and over
    with pytest.raises(MalformedFileError) as caught:
        unpickler.unpickle(data, "x")
    assert str(caught.value).endswith(f"more than {unpickler.MAX_OPCODES} opcodes; a state dict needs far fewer")


def test_a_header_of_too_many_entries_is_refused_before_parsing(tmp_path: Path) -> None:
    n = 1_400_000
    entries = b",".join(b'"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i for i in range(n))
    path = tmp_path / "many.safetensors"
    path.write_bytes((len(entries) + 2).to_bytes(8, "little") + b"{" + entries + b"}")
    with pytest.raises(MalformedFileError) as caught:
        safetensors_file.read_header(path)
    assert str(caught.value) == f"{path}: header has more than 200000 tensor entries, over the limit"


def test_limits_are_what_the_readme_says() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, value in {
        "MAX_DIMS": stored.MAX_DIMS,
        "MAX_EXPANSION": stored.MAX_EXPANSION,
        "MAX_TENSORS": safetensors_file.MAX_TENSORS,
        "MAX_OPCODES": unpickler.MAX_OPCODES,
        "MAX_OBJECTS": unpickler.MAX_OBJECTS,
        "MAX_PICKLE_BYTES": unpickler.MAX_PICKLE_BYTES,
    }.items():
        assert f"`{name}` = {value:_}" in readme, name
    assert np.dtype("u1").itemsize == 1
