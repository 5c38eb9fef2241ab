"""AtomicWriter: all-or-nothing files (O_TMPFILE or a named temporary), views, copies, failures."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filetools import NO_PERMISSIONS, same, sample_arrays, write
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fastfuse.errors import FuseError, MalformedFileError
from fastfuse.formats.safetensors_file import OutputTensor, layout, read_header
from fastfuse.sinks import atomic
from fastfuse.sinks.atomic import AtomicWriter, write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def tmpfile_supported(folder: Path) -> bool:
    try:
        os.close(os.open(folder, getattr(os, "O_TMPFILE", 0) | os.O_RDWR, 0o600))
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(params=["tmpfile", "named"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Run a writer test with O_TMPFILE and with the named-temporary fallback."""
    if request.param == "named":
        monkeypatch.setattr(atomic, "_O_TMPFILE", 0)
    elif not tmpfile_supported(tmp_path):
        pytest.skip("O_TMPFILE unsupported here")
    return str(request.param)


def test_write_read_back_with_reference(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "out.safetensors"
    arrays = sample_arrays()
    offsets = write(path, arrays, {"format": "pt"})
    assert listing(tmp_path) == ["out.safetensors"]
    loaded = load_file(str(path))
    assert loaded.keys() == arrays.keys() and all(same(loaded[k], arrays[k]) for k in arrays)
    with safe_open(str(path), "np") as ref:
        assert ref.metadata() == {"format": "pt"}
        assert all(same(ref.get_tensor(k), arrays[k]) for k in arrays)
    header = read_header(path)
    assert header.data_offset % 8 == 0
    assert {k: (t.start, t.end) for k, t in header.tensors.items()} == offsets


def test_permissions_follow_umask(tmp_path: Path, mode: str) -> None:
    old = os.umask(0o027)
    try:
        write(tmp_path / "out.safetensors", {"a": np.ones(2, np.float32)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.safetensors").stat().st_mode) == 0o640


def test_write_empty_data_section(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "out.safetensors"
    write(path, {"z": np.zeros((0, 2), np.float16)})
    assert load_file(str(path))["z"].shape == (0, 2)
    write(path, {}, overwrite=True)
    assert read_header(path).tensors == {}


def test_no_temporary_visible_while_writing(tmp_path: Path) -> None:
    if not tmpfile_supported(tmp_path):
        pytest.skip("O_TMPFILE unsupported here")
    prefix, _ = layout([OutputTensor("a", np.dtype("u1"), (8,))], None)
    with AtomicWriter(tmp_path / "out.safetensors", prefix, 8):
        assert listing(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True])
def test_exception_leaves_nothing(tmp_path: Path, mode: str, error: type[BaseException], existing: bool) -> None:
    (tmp_path / "other.txt").write_text("unrelated")
    dst = tmp_path / "out.safetensors"
    if existing:
        dst.write_bytes(b"old bytes")
    before = listing(tmp_path)
    prefix, _ = layout([OutputTensor("a", np.dtype("f4"), (4,))], None)
    with pytest.raises(error), AtomicWriter(dst, prefix, 16, overwrite=True) as w:
        w.view(0, 16, np.float32, (4,))[:] = 1
        raise error("boom")
    assert listing(tmp_path) == before
    if existing:
        assert dst.read_bytes() == b"old bytes"


def test_overwrite(tmp_path: Path, mode: str) -> None:
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(FuseError, match=r"out.safetensors: exists; pass --force \(overwrite_destination=True\)"):
        write(dst, {"a": np.ones(1, np.float32)})
    assert dst.read_bytes() == b"old"
    write(dst, {"a": np.ones(1, np.float32)}, overwrite=True)
    assert load_file(str(dst))["a"].tolist() == [1.0] and listing(tmp_path) == ["out.safetensors"]


def test_destination_created_meanwhile_is_kept(tmp_path: Path, mode: str) -> None:
    dst = tmp_path / "out.safetensors"
    prefix, _ = layout([OutputTensor("a", np.dtype("u1"), (4,))], None)
    with pytest.raises(FuseError, match="exists; pass --force"), AtomicWriter(dst, prefix, 4) as w:
        w.view(0, 4, np.uint8, (4,))[:] = 7
        dst.write_bytes(b"someone else's")
    assert dst.read_bytes() == b"someone else's" and listing(tmp_path) == ["out.safetensors"]


def test_bad_destinations(tmp_path: Path) -> None:
    prefix, _ = layout([], None)
    with pytest.raises(FuseError, match=r"x.safetensors: destination folder .*missing does not exist$"):
        AtomicWriter(tmp_path / "missing" / "x.safetensors", prefix, 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(FuseError, match=r"destination folder .*file is not a folder"):
        AtomicWriter(tmp_path / "file" / "x.safetensors", prefix, 0)
    (tmp_path / "dir").mkdir()
    with pytest.raises(FuseError, match="dir: is a directory; expected a file name"):
        AtomicWriter(tmp_path / "dir", prefix, 0, overwrite=True)
    with pytest.raises(ValueError, match="data_size must be >= 0, got -1"):
        AtomicWriter(tmp_path / "x", prefix, -1)
    assert listing(tmp_path) == ["dir", "file"]


def test_write_bytes_atomic(tmp_path: Path, mode: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    write_bytes_atomic(index, b'{"weight_map": {}}\n')
    assert index.read_bytes() == b'{"weight_map": {}}\n' and listing(tmp_path) == [index.name]
    with pytest.raises(FuseError, match="exists; pass --force"):
        write_bytes_atomic(index, b"other")
    write_bytes_atomic(index, b"", overwrite=True)
    assert index.read_bytes() == b"" and listing(tmp_path) == [index.name]


@NO_PERMISSIONS
def test_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(FuseError, match=r"destination folder .*ro is not writable"):
            AtomicWriter(folder / "x.safetensors", layout([], None)[0], 0)
    finally:
        folder.chmod(0o755)


def test_disk_full_is_a_clean_error(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    prefix, _ = layout([OutputTensor("a", np.dtype("u1"), (1000,))], None)
    message = f"{tmp_path}: not enough space for .*out.safetensors: it needs {len(prefix) + 1000} bytes"
    with pytest.raises(FuseError, match=message), AtomicWriter(tmp_path / "out.safetensors", prefix, 1000):
        pass
    assert listing(tmp_path) == []


def test_views_held_after_exit(tmp_path: Path, mode: str) -> None:
    prefix, _ = layout([OutputTensor("a", np.dtype("<i4"), (3,))], None)
    with AtomicWriter(tmp_path / "out.safetensors", prefix, 12) as w:
        kept = w.view(0, 12, np.int32, (3,))
        kept[:] = [1, 2, 3]
    assert load_file(str(tmp_path / "out.safetensors"))["a"].tolist() == [1, 2, 3]
    del kept


def test_view_bounds(tmp_path: Path) -> None:
    prefix, _ = layout([OutputTensor("a", np.dtype("u1"), (8,))], None)
    w = AtomicWriter(tmp_path / "out.safetensors", prefix, 8)
    with pytest.raises(ValueError, match="does not fit"):
        w.view(0, 8, np.uint8, (8,))  # not entered yet
    with w:
        w.view(0, 8, np.uint8, (8,))[:] = 1
        for args in [(0, 9, np.uint8, (9,)), (0, 8, np.float32, (3,)), (4, 2, np.uint8, (0,))]:
            with pytest.raises(ValueError, match="does not fit"):
                w.view(*args)
        with pytest.raises(ValueError, match="does not fit"):
            w.copy_from(0, 0, 4, 8)
        assert w.view(8, 8, np.float64, (0, 3)).shape == (0, 3)


@pytest.mark.parametrize("how", ["copy_file_range", "preadv", "path"])
def test_copy_from(tmp_path: Path, mode: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.safetensors"
    arrays = {"big": np.arange(300_000, dtype=np.float32).reshape(600, 500), **sample_arrays()}
    save_file(arrays, str(src))
    header = read_header(src)
    if how == "preadv":
        monkeypatch.setattr(atomic, "_CHUNK", 4096)  # several chunks per tensor

        def unsupported(*args: Any) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    prefix, offsets = layout([OutputTensor(k, a.dtype, a.shape) for k, a in arrays.items()], None)
    dst = tmp_path / "dst.safetensors"
    fd = os.open(src, os.O_RDONLY)
    try:
        with AtomicWriter(dst, prefix, max(e for _, e in offsets.values())) as w:
            for name, (start, end) in offsets.items():
                t = header.tensors[name]
                w.copy_from(str(src) if how == "path" else fd, header.data_offset + t.start, start, end - start)
    finally:
        os.close(fd)
    loaded = load_file(str(dst))
    assert all(same(loaded[k], arrays[k]) for k in arrays)


def test_copy_from_io_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(16))

    def broken(*args: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    prefix, _ = layout([OutputTensor("a", np.dtype("u1"), (16,))], None)
    message = "out.safetensors: copying 16 bytes from byte 0 of the source failed: Input/output error"
    with pytest.raises(FuseError, match=message), AtomicWriter(tmp_path / "out.safetensors", prefix, 16) as w:
        w.copy_from(src, 0, 0, 16)
    assert listing(tmp_path) == ["src.bin"]


def test_copy_from_short_source(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(10))
    prefix, _ = layout([OutputTensor("a", np.dtype("u1"), (16,))], None)
    message = "source ended at byte 10 while copying 16 bytes from byte 0 into .*out.safetensors$"
    with pytest.raises(MalformedFileError, match=message), AtomicWriter(tmp_path / "out.safetensors", prefix, 16) as w:
        w.copy_from(src, 0, 0, 16)
    assert listing(tmp_path) == ["src.bin"]


CHILD = """
import sys, time
import numpy as np
from fastfuse.sinks import atomic
from fastfuse.formats import safetensors_file
if sys.argv[2] == "named":
    atomic._O_TMPFILE = 0
prefix, _ = safetensors_file.layout([safetensors_file.OutputTensor("a", np.dtype("<f4"), (1 << 20,))], None)
with atomic.AtomicWriter(sys.argv[1], prefix, 4 << 20, overwrite=True) as w:
    w.view(0, 4 << 20, np.float32, (1 << 20,))[:] = 1
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_leaves_destination_alone(tmp_path: Path, mode: str, existing: bool) -> None:
    dst = tmp_path / "out.safetensors"
    if existing:
        dst.write_bytes(b"old bytes")
    before = listing(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(dst), mode], stdout=subprocess.PIPE, env=env, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.kill()
        assert child.wait(timeout=30) == -signal.SIGKILL
    assert (dst.read_bytes() == b"old bytes") if existing else not dst.exists()
    left = [name for name in listing(tmp_path) if name not in before]
    if mode == "tmpfile":
        assert left == []
    else:  # a named temporary cannot be cleaned up after SIGKILL; it is hidden and recognisable
        assert len(left) == 1 and left[0].startswith(".out.safetensors.fastfuse-") and left[0].endswith(".tmp")
