"""The GPU load's planning, staging and carving, run on the CPU with a host destination: the
same transfer plan and pipeline as ``load(device="cuda")``, with host buffers instead of the
device (CI has no GPU). Reference: the CPU ``fastfuse.load`` with the same options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from device_cases import DTYPES, INPUTS, OPTIONS
from naive import same_bits

import fastfuse
from fastfuse import FuseError
from fastfuse.formats.checkpoint import open_checkpoint
from fastfuse.kernels.regions import Move, Region, run_moves_numpy
from fastfuse.loading import _fusion_plan
from fastfuse.staging.pipeline import HostDestination, StagingConfig, chunks, run_transfer
from fastfuse.staging.transfer_plan import Piece, plan_transfer

SMALL = StagingConfig(lanes=3, slots=2, chunk_bytes=4096)  # many chunks, pieces cut across them


def staged(path: Path, config: StagingConfig = SMALL, **options: Any) -> tuple[dict[str, Any], Any]:
    checkpoint = open_checkpoint(path)
    transfer = plan_transfer(checkpoint, _fusion_plan(checkpoint, options), scratch_bytes=8192, block_bytes=2048)
    return run_transfer(checkpoint, transfer, HostDestination(), config), transfer


def assert_same(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert same_bits(np.asarray(value), got[key]), key


@pytest.mark.parametrize("source", list(INPUTS))
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_staged_load_is_the_cpu_load(tmp_path: Path, source: str, options: dict[str, Any]) -> None:
    if source == "torch":
        pytest.importorskip("torch")
    path = INPUTS[source](tmp_path, DTYPES["float16"])
    got, transfer = staged(path, **options)
    assert_same(fastfuse.load(path, **options), got)
    assert transfer.scratch_bytes <= 8192 + 2048  # bounded: the limit, plus one block past it


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_staged_load_other_dtypes(tmp_path: Path, dtype: str) -> None:
    path = INPUTS["safetensors"](tmp_path, DTYPES[dtype])
    for options in ({"keep_originals": False, "dtype": "float32"}, {"target": "vllm"}):
        assert_same(fastfuse.load(path, **options), staged(path, **options)[0])


def test_dropped_sources_are_not_read_and_tp_reads_its_rows(tmp_path: Path) -> None:
    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    whole = staged(path, target="vllm")[1].bytes_read
    assert whole == sum(t.nbytes for t in open_checkpoint(path).metas().values())
    rank = staged(path, target="vllm", tp=2, rank=1, heads=4)[1].bytes_read
    fused_sources = sum(
        t.nbytes for key, t in open_checkpoint(path).metas().items() if "self_attn" in key and "out_proj" not in key
    )
    assert rank == whole - fused_sources // 2


def test_one_upload_per_chunk_for_neighbours_kept_whole(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"t{n}": rng.standard_normal((64, 4 * (n + 1))).astype(np.float16) for n in range(6)}  # 512 B each step
    save_file(tensors, str(tmp_path / "a.safetensors"))
    destination = HostDestination()
    checkpoint = open_checkpoint(tmp_path / "a.safetensors")
    transfer = plan_transfer(checkpoint, None)
    got = run_transfer(checkpoint, transfer, destination, StagingConfig(2, 2, 4096))
    assert destination.uploads == -(-transfer.bytes_read // 4096)
    assert_same(tensors, {key: got[key] for key in tensors})


def test_torch_zip_members_kept_whole_are_one_read_across_their_headers(tmp_path: Path) -> None:
    """A ``torch.save`` file holds each storage as a zip member after its own header: the kept
    originals keep those gaps in the arena, so the whole data is one run (one upload per chunk),
    each tensor still at least 64-byte aligned and equal to ``torch.load``'s."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    tensors = {f"t{n}": torch.from_numpy(rng.standard_normal((16, 8 * n + 3)).astype(np.float16)) for n in range(6)}
    torch.save(tensors, tmp_path / "a.bin")
    destination = HostDestination()
    checkpoint = open_checkpoint(tmp_path / "a.bin")
    transfer = plan_transfer(checkpoint, None)
    assert len(transfer.stages[0].pieces) == 1  # one run, headers included
    got = run_transfer(checkpoint, transfer, destination, StagingConfig(2, 2, 1 << 20))
    assert destination.uploads == 1
    assert all(p.offset % 64 == 0 for p in transfer.placements)
    expected = torch.load(tmp_path / "a.bin", weights_only=True)
    assert_same({k: v.numpy() for k, v in expected.items()}, {key: got[key] for key in tensors})


def test_chunks_merge_neighbours_and_cut_at_the_chunk_size() -> None:
    pieces = [Piece(0, 10, 5, 0, 0), Piece(0, 0, 10, 0, 256), Piece(0, 15, 5, 0, 5), Piece(1, 0, 3, 0, 10)]
    got = chunks(pieces, 8)
    assert [[(p.file, p.file_offset, p.nbytes, p.offset) for p in c] for c in got] == [
        [(0, 0, 8, 256)],
        [(0, 8, 2, 264), (0, 10, 6, 0)],
        [(0, 16, 4, 6), (1, 0, 3, 10)],
    ]


def test_moves_widen_exactly_and_zero_fill() -> None:
    from fastfuse.kernels.numpy_engine import widen_bits

    bits = np.array([[0x7C01, 0xFE37, 0x8000, 0x0001], [0x3C00, 0x03FF, 0xFBFF, 0x7BFF]], np.uint16)
    out = np.full(2 * 4 * 4 + 8, 0xA5, np.uint8)
    moves = [
        Move(Region(0, 0, 2, 4, 8, 2), Region(1, 0, 4, 2, 8, 4), transpose=True, widen="float16"),
        Move(None, Region(1, 32, 1, 2, 8, 4)),
    ]
    run_moves_numpy([bits.view(np.uint8).reshape(-1), out], moves)
    assert same_bits(out[:32].view(np.uint32).reshape(4, 2), widen_bits(bits, "float16").T)
    assert not out[32:].any()


def test_load_device_errors_name_the_fix(tmp_path: Path) -> None:
    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    with pytest.raises(FuseError, match="framework='np' with device 'cuda:0'.*pass framework='pt'"):
        fastfuse.load(path, framework="np", device="cuda:0")
    with pytest.raises(FuseError, match="device 'mps': fastfuse loads onto 'cpu' or CUDA"):
        fastfuse.load(path, device="mps")
    with pytest.raises(FuseError, match="expected 'cpu', 'cuda'"):
        fastfuse.load(path, device=1.5)
    assert_same(fastfuse.load(path), fastfuse.load(path, device="cpu"))


def test_load_on_cuda_without_cuda_says_so(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    with pytest.raises(FuseError, match="sees no CUDA device here; pass device='cpu'"):
        fastfuse.load(path, device="cuda")


def test_carve_views_each_placement_as_slicing_would() -> None:
    """``cuda_engine.carve`` (run on a CPU tensor: it only makes views) against slicing the
    arena and viewing each slice, for every itemsize, scalars and empty tensors."""
    torch = pytest.importorskip("torch")
    from fastfuse import torch_bridge
    from fastfuse.kernels.cuda_engine import carve
    from fastfuse.kernels.regions import Placement

    dtypes = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.uint8)]
    shapes = [(3, 5), (), (0, 4), (2, 0, 3), (7,), (1, 1, 9)]
    placements, end = [], 0
    for i, shape in enumerate(shapes * 2):
        dtype = dtypes[i % len(dtypes)]
        placements.append(Placement(f"t{i}", end, shape, dtype))
        end = -(-(end + int(np.prod(shape)) * dtype.itemsize) // 256) * 256
    arena = torch.arange(end, dtype=torch.int64).to(torch.uint8)
    carved = carve(arena, placements, torch_bridge.torch_dtype)
    assert list(carved) == [p.key for p in placements]
    for p in placements:
        expected = arena[p.offset : p.offset + p.nbytes].view(torch_bridge.torch_dtype(p.dtype)).view(p.shape)
        got = carved[p.key]
        assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
        assert got.numel() == 0 or got.data_ptr() == expected.data_ptr()
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


def test_readahead_hints_change_no_byte(tmp_path: Path) -> None:
    """The cold-load read-ahead (a hint a chunk ahead per lane) gives the same tensors."""
    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    checkpoint = open_checkpoint(path)
    transfer = plan_transfer(checkpoint, _fusion_plan(checkpoint, {}))
    plain = run_transfer(checkpoint, transfer, HostDestination(), StagingConfig(2, 2, 4096, readahead=False))
    hinted = run_transfer(checkpoint, transfer, HostDestination(), StagingConfig(2, 2, 4096, readahead=True))
    assert sorted(plain) == sorted(hinted) and all(same_bits(plain[k], hinted[k]) for k in plain)


@pytest.mark.parametrize("rounds", [1, 3, 100])
def test_readahead_hints_every_chunk_beyond_the_first_lanes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int
) -> None:
    """Each chunk the lanes do not start with is hinted exactly once, before it is read."""
    from fastfuse.staging import pipeline

    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    checkpoint = open_checkpoint(path)
    transfer = plan_transfer(checkpoint, _fusion_plan(checkpoint, {}))
    config = StagingConfig(2, 2, 4096, readahead=True, readahead_rounds=rounds)
    work = [pipeline.chunks(stage.pieces, config.chunk_bytes) for stage in transfer.stages]
    events: list[tuple[str, int, int]] = []
    real_read = pipeline._read_into
    monkeypatch.setattr(pipeline.os, "posix_fadvise", lambda fd, offset, n, advice: events.append(("hint", offset, n)))

    def reading(fd: int, view: Any, offset: int, where: str) -> None:
        events.append(("read", offset, len(view)))
        real_read(fd, view, offset, where)

    monkeypatch.setattr(pipeline, "_read_into", reading)
    got = run_transfer(checkpoint, transfer, HostDestination(), config)
    hinted = [(offset, n) for kind, offset, n in events if kind == "hint"]
    expected = [(p.file_offset, p.nbytes) for stage in work for chunk in stage[config.lanes :] for p in chunk]
    assert expected and sorted(hinted) == sorted(expected) and len(set(hinted)) == len(hinted)
    assert all(events.index(("hint", *h)) < events.index(("read", *h)) for h in hinted)
    plain = run_transfer(checkpoint, transfer, HostDestination(), StagingConfig(2, 2, 4096, readahead=False))
    assert all(same_bits(plain[k], got[k]) for k in plain)


def test_staging_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTFUSE_STAGING", "4,3,2")
    assert StagingConfig.from_environment() == StagingConfig(4, 3, 2 << 20)
    monkeypatch.setenv("FASTFUSE_STAGING", "4,3,2,5")
    assert StagingConfig.from_environment() == StagingConfig(4, 3, 2 << 20, readahead_rounds=5)
    monkeypatch.delenv("FASTFUSE_STAGING")
    assert StagingConfig.from_environment() == StagingConfig()


def test_a_file_just_read_is_not_called_uncached(tmp_path: Path) -> None:
    import os

    from fastfuse.staging.pipeline import mostly_uncached

    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 4 << 20)
        assert not mostly_uncached(fd)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # honoured on disk file systems, not tmpfs
        dropped = mostly_uncached(fd)
        os.pread(fd, 4 << 20, 0)
        assert not mostly_uncached(fd)
    finally:
        os.close(fd)
    if not dropped:
        pytest.skip("this file system keeps the pages (tmpfs): the uncached answer is not seen here")
