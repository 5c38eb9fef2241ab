"""Where fastfuse reads and writes: destination names, folders of checkpoints, replaced folder
outputs, temporaries left by killed runs, disk space, tensor-parallel indexes, missing paths."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_whisper_shapes, random_tensors
from naive import same_bits, whisper_reference
from safetensors import safe_open
from safetensors.numpy import save_file

import fastfuse
from fastfuse import FuseError, FuseFileNotFoundError, FusePermissionError, MalformedFileError
from fastfuse.sinks import atomic
from fastfuse.sinks.atomic import AtomicWriter


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "whisper.safetensors"
    path.parent.mkdir()
    save_file(random_tensors(hf_whisper_shapes(8, 2, 2, 10), np.float16), str(path), metadata={"format": "pt"})
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["x.bin", "x.pt", "x.pth", "x", "x.safetensors.tmp"])
def test_a_single_file_destination_must_be_named_safetensors(tmp_path: Path, source: Path, name: str) -> None:
    before = listing(tmp_path)
    torch_hint = " (fastfuse writes safetensors, never torch files)" if name.endswith((".bin", ".pt", ".pth")) else ""
    message = f"{tmp_path / name}: a fused checkpoint file must be named *.safetensors{torch_hint}"
    with pytest.raises(FuseError, match=f"^{re.escape(message)}$"):
        fastfuse.fuse_file(source, tmp_path / name)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("options", [{"tp": 2, "heads": 2}, {"max_shard_size": "1MB"}])
def test_a_folder_destination_must_not_be_named_safetensors(tmp_path: Path, source: Path, options: dict) -> None:
    before = listing(tmp_path)
    with pytest.raises(FuseError, match="q.safetensors: this output is a folder of files .*without .safetensors"):
        fastfuse.fuse_file(source, tmp_path / "q.safetensors", **options)
    assert listing(tmp_path) == before


def test_an_output_beside_its_source_keeps_both_usable(source: Path) -> None:
    """Writing one file next to its source is fine; the folder then holds two checkpoints, and
    says so; either file works as an input."""
    folder = source.parent
    fused = folder / "whisper.fused.safetensors"
    fastfuse.fuse_file(folder, fused)
    with pytest.raises(
        FuseError,
        match=rf"^{folder}: holds 2 checkpoint files \(whisper.fused.safetensors, whisper.safetensors\); "
        "pass the one to read$",
    ):
        fastfuse.plan(folder)
    assert fastfuse.plan(source).fused and fastfuse.verify(fused) == []
    assert fastfuse.load(fused).keys() == fastfuse.load(source).keys()


def test_replacing_a_sharded_output_removes_its_extra_shards(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    fastfuse.fuse_file(source, out, max_shard_size="1KB")
    many = listing(out)
    assert len(many) > 3
    (out / "notes.txt").write_text("mine")  # not fastfuse's: never touched
    fastfuse.fuse_file(source, out, max_shard_size="1GB", overwrite_destination=True)
    assert listing(out) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json", "notes.txt"]
    tensors = fastfuse.load(out)
    original = fastfuse.load(source)
    expected = dict(original) | whisper_reference(dict(original))
    assert tensors.keys() == expected.keys() and all(same_bits(tensors[k], expected[k]) for k in expected)


def test_replacing_a_tensor_parallel_output_removes_its_ranks(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    fastfuse.fuse_file(source, out, tp=4, heads=4)
    assert len(listing(out)) == 5
    fastfuse.fuse_file(source, out, tp=2, heads=4, overwrite_destination=True)
    assert listing(out) == ["rank-0-of-2.safetensors", "rank-1-of-2.safetensors", "tensor_parallel.json"]
    assert fastfuse.verify(out) == []


def test_a_stale_named_temporary_is_removed_by_the_next_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without O_TMPFILE a SIGKILL leaves the named temporary; the next write of the same
    destination removes it, unless a live writer holds it locked."""
    monkeypatch.setattr(atomic, "_O_TMPFILE", 0)
    stale = tmp_path / ".out.safetensors.fastfuse-0badc0de.tmp"
    stale.write_bytes(b"left by a killed run")
    busy = tmp_path / ".out.safetensors.fastfuse-00c0ffee.tmp"
    busy.write_bytes(b"being written")
    other = tmp_path / ".other.safetensors.fastfuse-0badc0de.tmp"  # another destination's: not ours to judge
    other.write_bytes(b"")
    holder = os.open(busy, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with AtomicWriter(tmp_path / "out.safetensors", b"x" * 8, 0):
            pass
    finally:
        os.close(holder)
    assert not stale.exists() and busy.exists() and other.exists()
    assert (tmp_path / "out.safetensors").read_bytes() == b"x" * 8


def test_no_space_is_a_clean_error_where_space_cannot_be_reserved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without fallocate: the free space is checked before anything is mapped."""

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    class Tiny:
        f_bavail, f_frsize = 10, 4096  # 40 KB free

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: Tiny())
    with (
        pytest.raises(FuseError, match=r"not enough space for .*out.safetensors: it needs 1048584 bytes"),
        AtomicWriter(tmp_path / "out.safetensors", b"x" * 8, 1 << 20),
    ):
        raise AssertionError("never entered")
    assert os.listdir(tmp_path) == []
    with AtomicWriter(tmp_path / "small.safetensors", b"x" * 8, 1000):  # fits: written without reserving
        pass
    assert (tmp_path / "small.safetensors").stat().st_size == 1008


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"tensor_parallel.json: not a tensor-parallel index with a list of ranks"),
        (b'{"tp": 2}', r"tensor_parallel.json: not a tensor-parallel index with a list of ranks \('ranks'\)"),
        (b'{"ranks": "rank-0-of-1.safetensors"}', r"'ranks' is 'rank-0-of-1.safetensors', expected a list"),
        (b'{"ranks": ["../escape.safetensors"]}', r"rank '../escape.safetensors' is not a plain file name"),
        (b'{"ranks": ["/etc/passwd"]}', r"rank '/etc/passwd' is not a plain file name"),
    ],
)
def test_a_broken_tensor_parallel_index_is_named(tmp_path: Path, source: Path, content: bytes, message: str) -> None:
    out = tmp_path / "out"
    fastfuse.fuse_file(source, out, tp=2, heads=4)
    (out / "tensor_parallel.json").write_bytes(content)
    with pytest.raises(MalformedFileError, match=message):
        fastfuse.verify(out)


def test_missing_and_unreadable_paths_are_what_loaders_catch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file") as missing:
        fastfuse.load(tmp_path / "nope.safetensors")
    assert isinstance(missing.value, FuseFileNotFoundError) and isinstance(missing.value, FuseError)
    with pytest.raises(FileNotFoundError, match="destination folder .*missing does not exist"):
        AtomicWriter(tmp_path / "missing" / "x.safetensors", b"", 0)
    (tmp_path / "m.safetensors").write_bytes(b"")

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match="m.safetensors: permission denied") as denied:
        fastfuse.load(tmp_path / "m.safetensors")
    assert isinstance(denied.value, FusePermissionError)


def test_the_key_conflict_names_the_option_that_allows_it(tmp_path: Path, source: Path) -> None:
    fused = tmp_path / "fused.safetensors"
    fastfuse.fuse_file(source, fused)
    with pytest.raises(FuseError, match=r"pass overwrite=True \(--overwrite\) to replace it"):
        fastfuse.fuse_file(fused, tmp_path / "again.safetensors")
    fastfuse.fuse_file(fused, tmp_path / "again.safetensors", overwrite=True)
    with safe_open(str(tmp_path / "again.safetensors"), framework="numpy") as f:
        again = f.get_tensor("fused.enc.1.self_attn.qkv.weight")
    assert same_bits(again, whisper_reference(fastfuse.load(source))["fused.enc.1.self_attn.qkv.weight"])


def test_logits_in_the_out_in_layout_would_copy_the_embedding(source: Path) -> None:
    with pytest.raises(FuseError, match=r"logits=True with layout='out_in': the token embedding \[vocab, d\]"):
        fastfuse.plan(source, logits=True, layout="out_in")


def test_an_index_and_its_shards_list_the_same_files(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    fastfuse.fuse_file(source, out, max_shard_size="1KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) | {"model.safetensors.index.json"} == set(listing(out))
