"""The zip level of torch.save archives: directory, local headers, names, CRCs, ZIP64, truncation.

Each test edits one field of an archive (assembled with ``test_torch_hostile``'s helpers, or
written by torch) and expects a one-line MalformedFileError naming the member and the byte
range. The properties at the end mutate and truncate a real archive: every result either
reads exactly as torch.load reads the same bytes, or is a MalformedFileError.
"""

from __future__ import annotations

import os
import pickle
import random
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_torch_hostile import members, refused, state, tensor, watched, write, zip_bytes

from fastfuse.errors import MalformedFileError
from fastfuse.formats.stored import map_arrays
from fastfuse.formats.torch_zip import LEGACY_MAGIC, read_torch, verify_crcs

GOOD = state({"w": tensor()})


def entries(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset of its central directory entry, offset of its local header)."""
    end = data.rfind(b"PK\x05\x06")
    position = struct.unpack_from("<L", data, end + 16)[0]
    if position == 0xFFFFFFFF:
        position = struct.unpack_from("<Q", data, data.rfind(b"PK\x06\x06") + 48)[0]
    found = {}
    while data[position : position + 4] == b"PK\x01\x02":
        length, extra, comment = struct.unpack_from("<3H", data, position + 28)
        name = data[position + 46 : position + 46 + length].decode()
        found[name] = (position, struct.unpack_from("<L", data, position + 42)[0])
        position += 46 + length + extra + comment
    return found


def patch(data: bytes, offset: int, fmt: str, *values: Any) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def assembled() -> bytes:
    return zip_bytes(members(GOOD))


# ----------------------------------------------------------------------------- not a torch zip


def test_not_a_zip(tmp_path: Path) -> None:
    refused(write(tmp_path, b""), "is not a zip archive (starts with b''); expected a torch.save file (torch >= 1.6)")
    refused(write(tmp_path, os.urandom(5000)), "is not a zip archive (starts with b")
    refused(write(tmp_path, b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":1}'), "is not a zip archive")
    refused(write(tmp_path, b"PK\x03\x04"), "no zip end-of-central-directory record in its last 4 bytes (truncated")
    refused(write(tmp_path, b"PK\x03\x04" + os.urandom(3000)), "no zip end-of-central-directory record")
    refused(write(tmp_path, b"garbage" + assembled()), "is not a zip archive (starts with b'garbage")
    refused(write(tmp_path, assembled() + b"garbage"), "no zip end-of-central-directory record")


def test_legacy_format(tmp_path: Path) -> None:
    message = (
        "is a legacy (pre-1.6) torch.save file; re-save it with torch >= 1.6 "
        "(torch.save(torch.load(path), new_path)) or convert it to safetensors"
    )
    assert refused(write(tmp_path, LEGACY_MAGIC + b".\x80\x02M\xe9\x03."), message).endswith(message)
    torch = pytest.importorskip("torch")
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    refused(path, message)
    with pytest.raises(MalformedFileError, match="is a legacy"):
        verify_crcs(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_torchscript(tmp_path: Path) -> None:
    message = "is a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with torch.save"
    fake = members(GOOD) + [("archive/constants.pkl", b"\x80\x02)."), ("archive/code/__torch__/m.py", b"")]
    refused(write(tmp_path, zip_bytes(fake)), message)
    torch = pytest.importorskip("torch")
    path = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert refused(path, message) == f"{path}: {message}"


# ----------------------------------------------------------------------------- names and members


def test_compressed_member(tmp_path: Path) -> None:
    path = write(tmp_path, zip_bytes(members(GOOD), deflate=("archive/data/0",)))
    assert refused(path) == (
        f"{path}: member 'archive/data/0' is compressed (deflate); torch.save stores members uncompressed"
        " - was the archive re-zipped?"
    )


def test_rezipped_torch_archive(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(3)}, tmp_path / "original.pt")
    with zipfile.ZipFile(tmp_path / "original.pt") as z:
        inside = [(name, z.read(name)) for name in z.namelist()]
    rezipped = write(tmp_path, zip_bytes(inside, deflate=tuple(n for n, _ in inside)))
    refused(rezipped, "member 'original/data.pkl' is compressed (deflate)", "was the archive re-zipped?")
    stored = write(tmp_path, zip_bytes(inside), "stored.pt")  # re-zipped without compression: fine
    assert map_arrays(read_torch(stored))["w"].tobytes() == np.ones(3, "<f4").tobytes()


@pytest.mark.parametrize(
    "name",
    ["archive/../evil", "/archive/evil", "archive\\evil", "archive/./evil", "archive//evil", "archive/data/", ".."],
)
def test_member_names_must_be_plain(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, zip_bytes(members(GOOD) + [(name, b"x")]))
    refused(path, f"member name {name!r} is not a plain relative path (absolute, .., \\)")


def test_duplicate_members(tmp_path: Path) -> None:
    path = write(tmp_path, zip_bytes(members(GOOD) + [("archive/data/0", bytes(24))]))
    refused(path, "member 'archive/data/0' appears twice in the central directory")


def test_one_common_prefix(tmp_path: Path) -> None:
    refused(write(tmp_path, zip_bytes(members(GOOD) + [("other/x", b"")])), "(found ['archive', 'other'])")
    refused(write(tmp_path, zip_bytes(members(GOOD) + [("x", b"")])), "not all under one folder <prefix>/ (found ['',")
    renamed = zip_bytes(members(GOOD, prefix="my-model"))
    assert list(read_torch(write(tmp_path, renamed)).tensors) == ["w"]  # the prefix is any name


def test_missing_pickle(tmp_path: Path) -> None:
    inside = [m for m in members(GOOD) if not m[0].endswith("data.pkl")]
    refused(write(tmp_path, zip_bytes(inside)), "has no member 'archive/data.pkl' (the pickle of a torch.save archive)")


def test_byteorder(tmp_path: Path) -> None:
    def with_order(order: bytes | None) -> Path:
        inside = [(k, v) for k, v in members(GOOD) if not k.endswith("byteorder")]
        return write(tmp_path, zip_bytes(inside + ([("archive/byteorder", order)] if order is not None else [])))

    assert list(read_torch(with_order(None)).tensors) == ["w"]  # torch < 1.9 wrote none: little-endian
    refused(with_order(b"big"), "member 'archive/byteorder' is b'big'; only little-endian archives are read")
    refused(with_order(b"little\n"), "is b'little\\n'")
    refused(with_order(b"l" * 100), "member 'archive/byteorder' is 100 bytes; only little-endian")


# ----------------------------------------------------------------------------- headers and the directory


def test_local_header_must_match_the_directory(tmp_path: Path) -> None:
    data = assembled()
    _, local = entries(data)["archive/data/0"]
    # name, CRC, compressed size, size, method (deflate in the local header only), flags
    for offset, fmt, value in [
        (30, "<B", 98),
        (14, "<L", 1234),
        (18, "<L", 25),
        (22, "<L", 23),
        (8, "<H", 8),
        (6, "<H", 1),
    ]:
        mutated = patch(data, local + offset, fmt, value)
        refused(write(tmp_path, mutated), f"local header of member 'archive/data/0' at byte {local} disagrees")
    refused(write(tmp_path, patch(data, local, "<4s", b"PK\x01\x02")), "disagrees with the central directory")


def test_member_offsets(tmp_path: Path) -> None:
    data = assembled()
    found = entries(data)
    central, _ = found["archive/data/0"]
    cd_offset = min(c for c, _ in found.values())
    refused(
        write(tmp_path, patch(data, central + 42, "<L", len(data))), f"past the central directory at byte {cd_offset}"
    )
    # member data that runs into the next member: sizes grown in both headers
    _, local = found["archive/byteorder"]
    grown = patch(patch(data, local + 18, "<2L", 100, 100), found["archive/byteorder"][0] + 20, "<2L", 100, 100)
    refused(write(tmp_path, grown), "local header at byte", "overlaps the previous member (which ends at byte")
    # two directory entries sharing one local header
    shared = patch(data, found["archive/version"][0] + 42, "<L", found["archive/data/0"][1])
    refused(write(tmp_path, shared), "overlaps the previous member")
    # the last member's data runs into the central directory
    _, last = found["archive/version"]
    long = patch(patch(data, last + 18, "<2L", 99, 99), found["archive/version"][0] + 20, "<2L", 99, 99)
    refused(
        write(tmp_path, long),
        "data of member 'archive/version' [",
        f"runs past the central directory at byte {cd_offset}",
    )


def test_directory_fields(tmp_path: Path) -> None:
    data = assembled()
    found = entries(data)
    central, _ = found["archive/data/0"]
    end = data.rfind(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<H2L", data, end + 10)
    for mutated, message in [
        (patch(data, central, "<4s", b"PK\x09\x09"), f"central directory entry at byte {central} is not a file header"),
        (patch(data, central + 8, "<H", 1), "member 'archive/data/0' is encrypted or patch data (flags 0x0001)"),
        (patch(data, central + 8, "<H", 0x40), "(flags 0x0040)"),
        (
            patch(data, central + 38, "<L", 0x10),
            "member 'archive/data/0' is marked as a directory (attributes 0x00000010)",
        ),
        (patch(data, central + 34, "<H", 1), "member 'archive/data/0' starts on disk 1 of a multi-disk (split) zip"),
        (patch(data, end + 4, "<H", 1), "is a multi-disk (split) zip archive; torch.save writes one file"),
        (patch(data, end + 6, "<H", 1), "is a multi-disk (split) zip archive"),
        (patch(data, end + 8, "<H", count - 1), "is a multi-disk (split) zip archive"),
        (patch(data, central + 20, "<L", 23), "stored member 'archive/data/0' has size 24 but occupies 23 bytes"),
        (patch(data, central + 46, "<B", 0xFF), "member name b'\\xffrchive/data/0' is not valid UTF-8"),
        (patch(data, central + 28, "<H", 2000), "central directory entry runs past the directory's end"),
        (patch(data, end + 8, "<2H", count + 1, count + 1), "is not a file header"),
        (patch(data, end + 12, "<L", cd_size + 1), "does not fit before its end records"),
        (patch(data, end + 16, "<L", cd_offset + 1), "does not fit before its end records"),
        (patch(data, end + 16, "<L", 0xFFFFFFFF), "ZIP64 sizes in the end record but no ZIP64 locator"),
        (patch(data, end + 12, "<L", 200_000_000), "does not fit before its end records at byte"),
    ]:
        refused(write(tmp_path, mutated), message)
    refused(write(tmp_path, patch(data, end + 8, "<2H", count - 1, count - 1)), "bytes after its 3 entries")


def test_comment_and_zip64_written_by_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(read_torch(write(tmp_path, zip_bytes(members(GOOD), comment=b"PK\x05\x06 hi"))).tensors) == ["w"]
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", -1)  # every size and offset in ZIP64 fields
    data = assembled()
    monkeypatch.undo()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data
    central, _ = entries(data)["archive/data/0"]
    assert struct.unpack_from("<2L", data, central + 20) == (0xFFFFFFFF, 0xFFFFFFFF)
    path = write(tmp_path, data)
    assert map_arrays(read_torch(path))["w"].tobytes() == bytes(range(24))
    verify_crcs(path)
    extra_tag = central + 46 + len("archive/data/0")
    refused(write(tmp_path, patch(data, extra_tag, "<H", 7)), "'archive/data/0' has ZIP64 sizes but no valid ZIP64")
    refused(write(tmp_path, patch(data, extra_tag + 2, "<H", 4)), "ZIP64 sizes but no valid ZIP64 extra field")
    locator = data.rfind(b"PK\x06\x07")
    record = data.rfind(b"PK\x06\x06")
    refused(
        write(tmp_path, patch(data, locator + 8, "<Q", record - 1)), f"no valid ZIP64 end record at byte {record - 1}"
    )
    refused(write(tmp_path, patch(data, record + 4, "<Q", 43)), f"no valid ZIP64 end record at byte {record}")
    refused(write(tmp_path, patch(data, record + 4, "<Q", 45)), f"no valid ZIP64 end record at byte {record}")
    refused(
        write(tmp_path, patch(data, locator + 8, "<Q", locator)), "ZIP64 end record at byte", "runs past its locator"
    )
    refused(write(tmp_path, patch(data, record + 48, "<Q", 3)), "is not a file header")


def test_torch_writes_zip64_end_records(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(2)}, path)
    data = path.read_bytes()
    record = data.rfind(b"PK\x06\x06")
    assert record > 0 and data.rfind(b"PK\x06\x07") > record  # always, even for a small file
    cd_size, cd_offset = struct.unpack_from("<2Q", data, record + 40)
    refused(write(tmp_path, patch(data, record + 48, "<Q", cd_offset + 10**6)), "does not fit before its end records")
    refused(write(tmp_path, patch(data, record + 40, "<Q", cd_size - 1)), "central directory entry runs past")


# ----------------------------------------------------------------------------- CRCs


def test_crc_of_members_read_into_memory(tmp_path: Path) -> None:
    data = assembled()
    pickle_at = data.index(GOOD)
    key = pickle_at + GOOD.index(b"\x01\x00\x00\x00w") + 4
    path = write(tmp_path, data[:key] + b"v" + data[key + 1 :])
    pattern = rf"member 'archive/data.pkl' \[{pickle_at}, {pickle_at + len(GOOD)}\) has CRC-32 [0-9a-f]{{8}}, the "
    assert refused(path, "(corrupted file)")
    with pytest.raises(MalformedFileError, match=pattern):
        read_torch(path)
    order = data.index(b"little")
    refused(write(tmp_path, data[:order] + b"L" + data[order + 1 :]), "member 'archive/byteorder' [", "has CRC-32")


def test_crc_of_storage_only_when_asked(tmp_path: Path) -> None:
    data = assembled()
    at = data.index(bytes(range(24)))
    path = write(tmp_path, data[:at] + b"\xff" + data[at + 1 :])
    assert map_arrays(read_torch(path))["w"].tobytes()[:1] == b"\xff"
    found, expected = zipfile.crc32(b"\xff" + bytes(range(1, 24))), zipfile.crc32(bytes(range(24)))
    with watched() as events, pytest.raises(MalformedFileError) as info:
        verify_crcs(path)
    assert events == [] and str(info.value) == (
        f"{path}: member 'archive/data/0' [{at}, {at + 24}) has CRC-32 {found:08x}, "
        f"the directory says {expected:08x} (corrupted file)"
    )


# ----------------------------------------------------------------------------- mutations of a real archive


@pytest.fixture(scope="module")
def real() -> Iterator[tuple[bytes, Path]]:
    """A small archive written by torch (views, a shared storage, three dtypes) and a scratch file."""
    torch = pytest.importorskip("torch")
    with tempfile.TemporaryDirectory() as folder:
        base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        objects = {
            "w": base,
            "w.T": base.t(),
            "b": torch.tensor([1.5, -0.0], dtype=torch.bfloat16),
            "i": torch.tensor(7, dtype=torch.int64),
            "row": base[1],
        }
        torch.save(objects, Path(folder) / "real.pt")
        yield (Path(folder) / "real.pt").read_bytes(), Path(folder) / "mutant.pt"


def same_as_torch_or_refused(data: bytes, path: Path) -> str:
    """Write ``data``; read_torch either refuses it or reads what torch.load reads."""
    torch = pytest.importorskip("torch")
    path.write_bytes(data)
    try:
        stored = read_torch(path)
        arrays = map_arrays(stored)
    except MalformedFileError as e:
        assert "\n" not in str(e)
        return "refused"
    try:
        loaded = torch.load(path, weights_only=True)
    except (RuntimeError, ValueError, pickle.UnpicklingError):  # torch refuses what we read: only a CRC we skip
        with pytest.raises(MalformedFileError, match="has CRC-32"):
            verify_crcs(path)
        return "torch refused"
    loaded = loaded["model_state_dict"] if "dims" in stored.metadata else loaded
    assert list(arrays) == list(loaded)
    for name, a in arrays.items():
        t = loaded[name].contiguous().reshape(-1)
        assert a.shape == tuple(loaded[name].shape)
        assert np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes() == bytes(t.view(torch.uint8).numpy())
    return "read"


def test_every_truncation_is_refused(real: tuple[bytes, Path]) -> None:
    data, path = real
    for length in range(len(data)):
        assert same_as_torch_or_refused(data[:length], path) == "refused"
    assert same_as_torch_or_refused(data, path) == "read"


@pytest.mark.slow
def test_every_single_byte_flip(real: tuple[bytes, Path]) -> None:
    data, path = real
    outcomes = {"read": 0, "refused": 0, "torch refused": 0}
    for at in range(len(data)):
        outcomes[same_as_torch_or_refused(data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :], path)] += 1
    assert outcomes["refused"] > len(data) // 3 and outcomes["read"] > 100, outcomes


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_mutations_read_as_torch_or_are_refused(real: tuple[bytes, Path], data: st.DataObject) -> None:
    original, path = real
    mutant = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, len(mutant) - 1), label="at")
        mutant[at] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        mutant = mutant[: data.draw(st.integers(0, len(mutant)), label="length")]
    same_as_torch_or_refused(bytes(mutant), path)


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_pickle_mutations_read_as_torch_or_are_refused(real: tuple[bytes, Path], data: st.DataObject) -> None:
    """Mutate data.pkl and rebuild the zip with correct CRCs: the unpickler, not the CRC, decides."""
    torch = pytest.importorskip("torch")
    _, path = real
    with zipfile.ZipFile(path.with_name("real.pt")) as z:
        inside = [(name, z.read(name)) for name in z.namelist()]
    pkl = bytearray(inside[0][1])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        at = data.draw(st.integers(0, len(pkl) - 1), label="at")
        action = data.draw(st.sampled_from(["set", "delete", "insert"]), label="action")
        byte = data.draw(st.integers(0, 255), label="byte")
        pkl[at : at + (action != "insert")] = b"" if action == "delete" else bytes([byte])
    path.write_bytes(zip_bytes([(inside[0][0], bytes(pkl)), *inside[1:]]))
    try:
        stored = read_torch(path)
    except MalformedFileError as e:
        assert "\n" not in str(e)
        return
    arrays = map_arrays(stored)
    try:  # map_location: we read any location tag (a CUDA-saved file reads on a CPU machine)
        with warnings.catch_warnings():  # a mutated PROTO byte makes torch warn about the protocol
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # protocol-4 opcodes (MEMOIZE...) torch's weights_only loader lacks
        assert "Unsupported operand" in str(e)
        return
    assert list(arrays) == list(loaded)
    for name, a in arrays.items():
        t = loaded[name].contiguous().reshape(-1)
        assert np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes() == bytes(t.view(torch.uint8).numpy())


def test_random_archives_of_random_members(tmp_path: Path) -> None:
    rng = random.Random(5)
    for _ in range(200):
        inside = [
            (
                rng.choice(["archive/", "a/", ""]) + rng.choice(["data.pkl", "data/0", "x", "byteorder"]),
                rng.randbytes(rng.randrange(40)),
            )
            for _ in range(rng.randrange(5))
        ]
        path = write(tmp_path, zip_bytes(inside))
        with watched() as events, pytest.raises(MalformedFileError):
            read_torch(path)
        assert events == []
