"""Run a :class:`~fastfuse.staging.transfer_plan.TransferPlan`: parallel reads into reused
staging buffers, uploads overlapped with the reads, then each stage's moves.

``lanes`` threads each own ``slots`` staging buffers of ``chunk_bytes`` (host memory: pinned,
for a CUDA destination), so staging takes ``lanes * slots * chunk_bytes`` whatever the model's
size (default 8 x 2 x 8 MiB = 128 MiB). A lane reads a chunk of file bytes with ``os.preadv``
straight into a free buffer (the GIL is released while the kernel copies), hands it to the
destination's upload queue for that lane and reads the next chunk into its other buffer; a
buffer is refilled only once its upload is done. Host memory beyond the staging: none (a
tensor stored strided is made contiguous on the host, one at a time).

The :class:`Destination` is the only part that knows the memory on the other side:
``cuda_engine.CudaDestination`` (CUDA streams and events), or :class:`HostDestination` here
(host buffers, copies done at once: how CI runs the same planning, staging and carving).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fastfuse.formats.checkpoint import Checkpoint
from fastfuse.formats.stored import open_regular
from fastfuse.kernels.regions import Move, run_moves_numpy
from fastfuse.staging.transfer_plan import Gather, Piece, Placement, TransferPlan

__all__ = ["Destination", "HostDestination", "StagingConfig", "chunks", "run_transfer"]


@dataclass(frozen=True)
class StagingConfig:
    """How much host staging a load uses: ``lanes * slots * chunk_bytes`` bytes."""

    lanes: int = 8
    slots: int = 2
    chunk_bytes: int = 8 << 20
    readahead: bool | None = None  # hint the kernel ahead of the reads; None: where files are not cached
    readahead_rounds: int = 1  # how far ahead: this many chunks per lane beyond those being read

    @property
    def total_bytes(self) -> int:
        """The staging's size: ``lanes * slots * chunk_bytes``."""
        return self.lanes * self.slots * self.chunk_bytes

    @classmethod
    def from_environment(cls) -> StagingConfig:
        """Defaults, or ``FASTFUSE_STAGING=lanes,slots,chunk_mib[,readahead_rounds]`` (for measuring)."""
        text = os.environ.get("FASTFUSE_STAGING")
        if not text:
            return cls()
        lanes, slots, mib, *rounds = (int(x) for x in text.split(","))
        return cls(lanes, slots, mib << 20, readahead_rounds=rounds[0] if rounds else cls.readahead_rounds)


class Destination(Protocol):
    """The other side of a transfer: memory, uploads per lane, and an engine for moves."""

    def allocate(self, arena_bytes: int, scratch_bytes: int) -> None:
        """Make buffer 0 (the results) and buffer 1 (scratch, may be 0 bytes)."""

    def staging(self, nbytes: int) -> np.ndarray:
        """A host buffer of ``nbytes`` (uint8) to read into; released by :meth:`close`."""

    def upload(self, lane: int, slot: int, host: np.ndarray, buffer: int, offset: int) -> None:
        """Copy ``host`` (a slice of the staging buffer) to ``buffer`` at ``offset``, in order on ``lane``."""

    def slot_reusable(self, lane: int, slot: int) -> None:
        """Mark the end of slot ``slot``'s uploads on ``lane``; :meth:`wait_slot` waits for it."""

    def wait_slot(self, lane: int, slot: int) -> None:
        """Block until the uploads marked for ``slot`` of ``lane`` have read their host bytes."""

    def run_moves(self, moves: Sequence[Move], lanes: int) -> None:
        """After every upload so far on ``lanes`` lanes, run ``moves``; later uploads wait for them."""

    def results(self, placements: Sequence[Placement]) -> dict[str, Any]:
        """Wait for everything; key -> result tensor carved from buffer 0. Frees the scratch."""

    def close(self) -> None:
        """Release the staging memory (also after a failure)."""


def chunks(pieces: Sequence[Piece], chunk_bytes: int) -> list[list[Piece]]:
    """``pieces`` merged where both sides are adjacent, in file order, then cut and packed
    into chunks of at most ``chunk_bytes`` (each a list of pieces read into one buffer).

    >>> chunks([Piece(0, 0, 6, 0, 0), Piece(0, 6, 6, 0, 6)], 4)
    [[Piece(file=0, file_offset=0, nbytes=4, buffer=0, offset=0)], [Piece(file=0, file_offset=4, nbytes=4, buffer=0, offset=4)], [Piece(file=0, file_offset=8, nbytes=4, buffer=0, offset=8)]]
    """
    merged: list[Piece] = []
    for piece in sorted(pieces, key=lambda p: (p.file, p.file_offset)):
        last = merged[-1] if merged else None
        if (
            last is not None
            and (last.file, last.buffer) == (piece.file, piece.buffer)
            and last.file_offset + last.nbytes == piece.file_offset
            and last.offset + last.nbytes == piece.offset
        ):
            merged[-1] = Piece(last.file, last.file_offset, last.nbytes + piece.nbytes, last.buffer, last.offset)
        else:
            merged.append(piece)
    result: list[list[Piece]] = []
    current: list[Piece] = []
    room = chunk_bytes
    for piece in merged:
        done = 0
        while done < piece.nbytes:
            if room == 0:
                result.append(current)
                current, room = [], chunk_bytes
            n = min(room, piece.nbytes - done)
            current.append(Piece(piece.file, piece.file_offset + done, n, piece.buffer, piece.offset + done))
            done += n
            room -= n
    if current:
        result.append(current)
    return result


_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)
_SAMPLES, _SAMPLE_BYTES = 8, 256 << 10


def mostly_uncached(fd: int) -> bool:
    """Are most of ``_SAMPLES`` windows spread over the file out of the page cache (``mincore``
    on a map of each)? False where that cannot be asked (not Linux, no libc, a map refused).

    Costs well under a millisecond; it picks the read-ahead of a cold load (a cold whisper
    large-v3 onto an H200: 1.75 s without, 1.58 s with the hint; warm loads skip the hint).
    """
    try:
        import ctypes
        import mmap

        size = os.fstat(fd).st_size
        mincore = ctypes.CDLL(None, use_errno=True).mincore
        page = mmap.PAGESIZE
        pages = _SAMPLE_BYTES // page
        vector = (ctypes.c_ubyte * pages)()
        resident = total = 0
        for n in range(_SAMPLES):
            start = (size * n // _SAMPLES) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            length = min(_SAMPLE_BYTES, size - start)
            if length <= 0:
                continue
            with mmap.mmap(fd, length, offset=start, access=mmap.ACCESS_READ) as window:
                address = np.frombuffer(window, np.uint8).ctypes.data
                if mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vector) != 0:
                    return False
            count = -(-length // page)
            resident += sum(vector[i] & 1 for i in range(count))
            total += count
        return total > 0 and resident * 2 < total
    except (OSError, AttributeError, ValueError, BufferError):
        return False


def _read_into(fd: int, view: np.ndarray, offset: int, path: str) -> None:
    """Fill ``view`` with the file's bytes at ``offset`` (``preadv`` straight into it)."""
    from fastfuse.errors import MalformedFileError

    memory = memoryview(view)  # type: ignore[arg-type]
    done = 0
    while done < len(memory):
        got = os.preadv(fd, [memory[done:]], offset + done)
        if got <= 0:
            raise MalformedFileError(f"{path}: file ended at byte {offset + done} while loading (was it truncated?)")
        done += got


class _Lanes:
    """The reader threads of one transfer: chunks handed out in file order, one at a time."""

    def __init__(self, destination: Destination, host: np.ndarray, config: StagingConfig, files: list[tuple[int, str]]):
        self.destination, self.host, self.config, self.files = destination, host, config, files

    def run(self, work: list[list[Piece]], *, readahead: bool = False) -> int:
        """Read and upload every chunk of ``work``; the number of lanes used. ``readahead``: a lane
        taking chunk ``i`` first asks the kernel to start reading every chunk up to
        ``i + lanes * readahead_rounds`` not asked for yet (for files not in the page cache: the
        disk then has ``1 + readahead_rounds`` times the requests in flight)."""
        lanes = max(1, min(self.config.lanes, len(work)))
        if not work:
            return 0
        taken = 0
        hinted = lanes if readahead else len(work)  # chunks below this were read or hinted
        window = lanes * self.config.readahead_rounds
        lock = threading.Lock()

        def lane(number: int) -> None:
            nonlocal taken, hinted
            slot = 0
            base = number * self.config.slots * self.config.chunk_bytes
            used = [False] * self.config.slots
            while True:
                with lock:
                    index, taken = taken, taken + 1
                    hint = range(hinted, min(len(work), index + 1 + window))
                    hinted = max(hinted, hint.stop)
                if index >= len(work):
                    return
                chunk = work[index]
                for ahead in hint:
                    for piece in work[ahead]:
                        os.posix_fadvise(self.files[piece.file][0], piece.file_offset, piece.nbytes, _WILLNEED)
                if used[slot]:
                    self.destination.wait_slot(number, slot)
                start = base + slot * self.config.chunk_bytes
                position = start
                for piece in chunk:
                    view = self.host[position : position + piece.nbytes]
                    fd, path = self.files[piece.file]
                    _read_into(fd, view, piece.file_offset, path)
                    self.destination.upload(number, slot, view, piece.buffer, piece.offset)
                    position += piece.nbytes
                self.destination.slot_reusable(number, slot)
                used[slot] = True
                slot = (slot + 1) % self.config.slots

        if lanes == 1:
            lane(0)
            return 1
        with ThreadPoolExecutor(lanes, thread_name_prefix="fastfuse-read") as pool:
            for future in [pool.submit(lane, n) for n in range(lanes)]:
                future.result()
        return lanes


def _gather(destination: Destination, host_views: Mapping[str, np.ndarray], gathers: Sequence[Gather]) -> None:
    """Tensors stored strided: made contiguous on the host, then uploaded (on lane 0, slot 0)."""
    for gather in gathers:
        flat = np.ascontiguousarray(host_views[gather.key]).reshape(-1).view(np.uint8)
        destination.wait_slot(0, 0)
        destination.upload(0, 0, flat[gather.start : gather.end], gather.buffer, gather.offset)
        destination.slot_reusable(0, 0)
        destination.wait_slot(0, 0)  # ``flat`` is freed when this loop moves on


def run_transfer(
    checkpoint: Checkpoint, transfer: TransferPlan, destination: Destination, config: StagingConfig | None = None
) -> dict[str, Any]:
    """Move ``checkpoint`` as ``transfer`` says; key -> result (the destination's tensors).

    Raises MalformedFileError naming the file if one shrank since its header was read.
    """
    config = config or StagingConfig.from_environment()
    files = []
    try:
        for stored in checkpoint.files:
            files.append((open_regular(stored.path)[0], stored.path))
        destination.allocate(transfer.arena_bytes, transfer.scratch_bytes)
        host = destination.staging(config.total_bytes)
        lanes = _Lanes(destination, host, config, files)
        readahead = config.readahead
        if readahead is None:
            readahead = any(mostly_uncached(fd) for fd, _ in files)
        host_views: dict[str, np.ndarray] | None = None
        used = 1
        for stage in transfer.stages:
            used = max(used, lanes.run(chunks(stage.pieces, config.chunk_bytes), readahead=readahead))
            if stage.gathers:
                host_views = host_views if host_views is not None else checkpoint.arrays()
                _gather(destination, host_views, stage.gathers)
            if stage.moves:
                destination.run_moves(stage.moves, used)
        return destination.results(transfer.placements)
    finally:
        destination.close()
        for fd, _ in files:
            os.close(fd)


class HostDestination:
    """A destination in host memory: numpy buffers, uploads done at once, moves by numpy.

    What CI runs the pipeline with; ``framework="pt"`` returns torch views of the same memory.
    ``uploads`` counts the copies (for tests of the merging and chunking).
    """

    def __init__(self, framework: str = "np") -> None:
        self.framework = framework
        self.buffers: list[np.ndarray] = []
        self.uploads = 0

    def allocate(self, arena_bytes: int, scratch_bytes: int) -> None:
        self.buffers = [np.empty(arena_bytes, np.uint8), np.empty(scratch_bytes, np.uint8)]

    def staging(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def upload(self, lane: int, slot: int, host: np.ndarray, buffer: int, offset: int) -> None:
        self.buffers[buffer][offset : offset + len(host)] = host
        self.uploads += 1

    def slot_reusable(self, lane: int, slot: int) -> None:
        pass

    def wait_slot(self, lane: int, slot: int) -> None:
        pass

    def run_moves(self, moves: Sequence[Move], lanes: int) -> None:
        run_moves_numpy(self.buffers, moves)

    def results(self, placements: Sequence[Placement]) -> dict[str, Any]:
        arena = self.buffers[0]
        self.buffers = [arena]
        out: dict[str, Any] = {}
        for p in placements:
            out[p.key] = arena[p.offset : p.offset + p.nbytes].view(p.dtype).reshape(p.shape)
        if self.framework == "pt":
            from fastfuse import torch_bridge

            out = {key: torch_bridge.to_torch(value) for key, value in out.items()}
        return out

    def close(self) -> None:
        pass
