"""Where every byte of a load goes: a pure function of a checkpoint's header and a fusion plan.

The results (kept originals, then fused tensors, in the order ``fastfuse.load`` returns them)
are carved from one allocation, the *arena* (buffer 0), each 256-byte aligned, except a kept
original that follows another in its file after a gap of at most ``MAX_GAP`` bytes (a torch zip
member's header): it keeps that gap in the arena (at least 64-byte aligned), so that both are
one read and one upload. What crosses to the destination:

- a kept original stored as one byte run: a :class:`Piece` (file bytes -> arena bytes); file
  neighbours stay neighbours, so that a whole file section is one run to read and upload;
- a kept original stored strided (a ``torch.save`` view): a :class:`Gather` from its host view;
- a fused part whose source is kept: a :class:`~fastfuse.kernels.regions.Move` from the
  source's place in the arena (no second read of those bytes);
- a fused part whose source is dropped and whose rows are a row concatenation of the same
  bits (``out_in``, biases): a Piece straight into its place in the fused tensor;
- any other dropped source (``in_out`` without originals, a widening): the rows it needs are
  staged into a bounded *scratch* (buffer 1), in blocks of at most ``block_bytes``, then moved.
  Stages run in order: a stage's pieces land, then its moves run; the next stage reuses the
  scratch. So dropped sources never stay, and the destination holds at most the results plus
  ``scratch_bytes``.

Nothing here reads data or imports torch: CI checks it on the CPU with a host destination.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from fastfuse.aliases import TensorLike
from fastfuse.formats.checkpoint import Checkpoint
from fastfuse.formats.stored import StoredTensor
from fastfuse.kernels.regions import Move, Placement, Region
from fastfuse.planning.planner import FusedTensor, Plan

__all__ = [
    "ALIGN",
    "SCRATCH_BYTES",
    "Gather",
    "Piece",
    "Placement",
    "Stage",
    "TransferPlan",
    "fused_moves",
    "plan_transfer",
]

ALIGN = 256  # a result starts here (what cudaMalloc guarantees), or as in the file:
MIN_ALIGN = 64  # a kept original at its file gap after the one before it keeps at least this
MAX_GAP = 4096  # bytes between two kept originals in a file still read as one run
SCRATCH_BYTES = 256 << 20  # dropped sources staged for a move, at most this much at a time
ARENA, SCRATCH = 0, 1


@dataclass(frozen=True)
class Piece:
    """``nbytes`` of file number ``file`` at ``file_offset`` -> ``buffer`` at ``offset``."""

    file: int
    file_offset: int
    nbytes: int
    buffer: int
    offset: int


@dataclass(frozen=True)
class Gather:
    """Bytes ``start:end`` of a C-contiguous copy of the host view of ``key`` (a tensor stored
    strided) -> ``buffer`` at ``offset``."""

    key: str
    start: int
    end: int
    buffer: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Stage:
    """Bytes to land, then the moves that read them."""

    pieces: tuple[Piece, ...] = ()
    gathers: tuple[Gather, ...] = ()
    moves: tuple[Move, ...] = ()


@dataclass(frozen=True)
class TransferPlan:
    """Everything a destination needs: sizes, where each result is, and the stages to run."""

    arena_bytes: int
    scratch_bytes: int
    placements: tuple[Placement, ...]
    stages: tuple[Stage, ...]

    @property
    def bytes_read(self) -> int:
        """Bytes that cross to the destination from the files (pieces and gathers)."""
        return sum(p.nbytes for s in self.stages for p in s.pieces) + sum(
            g.nbytes for s in self.stages for g in s.gathers
        )


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class _Builder:
    checkpoint: Checkpoint
    metas: Mapping[str, TensorLike]
    scratch_limit: int
    block_bytes: int
    arena: dict[str, int] = field(default_factory=dict)  # kept key -> arena offset
    pieces: list[Piece] = field(default_factory=list)
    gathers: list[Gather] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    staged: list[tuple[list[Piece | Gather], Move, int]] = field(default_factory=list)  # (loads, move, bytes)
    _extents: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)  # file -> tensor starts, ends

    def entry(self, key: str) -> tuple[int, StoredTensor]:
        return self.checkpoint.location[key]

    def keep(self, key: str, offset: int) -> None:
        """A kept original at ``offset``: one piece (the last one grown, where it is the file's
        and the arena's next bytes), or a gather of its strided view."""
        number, entry = self.entry(key)
        self.arena[key] = offset
        if entry.nbytes == 0:
            return
        if not entry.contiguous:
            self.gathers.append(Gather(key, 0, entry.nbytes, ARENA, offset))
            return
        last = self.pieces[-1] if self.pieces else None
        if (
            last is not None
            and last.file == number
            and entry.offset - last.file_offset == offset - last.offset >= last.nbytes
        ):  # the gap between them (a zip member's header, padding) is read into arena padding
            self.pieces[-1] = Piece(number, last.file_offset, offset + entry.nbytes - last.offset, ARENA, last.offset)
        else:
            self.pieces.append(Piece(number, entry.offset, entry.nbytes, ARENA, offset))

    def kept_offset(self, key: str, end: int) -> int:
        """Where kept original ``key`` goes, the arena used up to ``end``: ``ALIGN``-aligned, or
        as far after the last piece as it is in the file, where that gap is at most ``MAX_GAP``
        bytes and keeps ``MIN_ALIGN`` (so one read and one upload take both)."""
        number, entry = self.entry(key)
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last.file == number and entry.contiguous and entry.nbytes:
            follows = last.offset + entry.offset - last.file_offset
            if (
                end <= follows <= end + MAX_GAP
                and follows % max(MIN_ALIGN, entry.dtype.itemsize) == 0
                and self._no_tensor_bytes(number, last.file_offset + last.nbytes, entry.offset)
            ):
                return follows
        return _align(end)

    def _no_tensor_bytes(self, number: int, low: int, high: int) -> bool:
        """Does ``[low, high)`` of file ``number`` hold no byte of any tensor (kept or dropped:
        a dropped source must never be read)?"""
        if number not in self._extents:
            spans = sorted(e.span() for n, e in self.checkpoint.location.values() if n == number and e.nbytes)
            starts = [a for a, _ in spans]
            ends = list(itertools.accumulate((b for _, b in spans), max))
            self._extents[number] = (starts, ends)
        starts, ends = self._extents[number]
        before = bisect.bisect_left(starts, low)  # tensors starting before the gap end by ``low``
        return (before == 0 or ends[before - 1] <= low) and (before == len(starts) or starts[before] >= high)

    def add_fused(self, target: FusedTensor, offset: int) -> None:
        """Every part of ``target`` (at arena ``offset``): a move from the arena, a piece, or staged."""
        for key, source, destination, transpose, widen in _parts(target, offset, self.metas):
            if key is None or source is None:
                self.moves.append(Move(None, destination))
                continue
            number, entry = self.entry(key)
            if key in self.arena:
                self.moves.append(Move(_in_buffer(source, ARENA, self.arena[key]), destination, transpose, widen))
            elif not transpose and widen is None and entry.contiguous and _dense(source) and _dense(destination):
                self.pieces.append(Piece(number, entry.offset + source.offset, source.span, ARENA, destination.offset))
            else:
                self._stage(key, number, entry, source, destination, transpose, widen)

    def _stage(
        self,
        key: str,
        number: int,
        entry: StoredTensor,
        source: Region,
        destination: Region,
        transpose: bool,
        widen: str | None,
    ) -> None:
        """A dropped source's region, through the scratch, in blocks of at most ``block_bytes``
        (whole rows of the region: its rows are the destination's columns when ``transpose``)."""
        per_block = max(1, self.block_bytes // max(source.row_stride, 1))
        for block_start in range(0, source.rows, per_block):
            block_rows = min(per_block, source.rows - block_start)
            block = Region(SCRATCH, 0, block_rows, source.cols, source.row_stride, source.itemsize)
            low = source.offset + block_start * source.row_stride  # bytes of the stored tensor
            high = low + block.span
            if transpose:  # the block's rows are columns block_start:... of the destination
                step = replace(
                    destination, offset=destination.offset + block_start * destination.itemsize, cols=block_rows
                )
            else:
                step = replace(
                    destination, offset=destination.offset + block_start * destination.row_stride, rows=block_rows
                )
            load: Piece | Gather
            if entry.contiguous:
                load = Piece(number, entry.offset + low, high - low, SCRATCH, 0)
            else:
                load = Gather(key, low, high, SCRATCH, 0)
            self.staged.append(([load], Move(block, step, transpose, widen), _align(high - low)))

    def stages(self) -> tuple[tuple[Stage, ...], int]:
        """The first stage (arena), then scratch stages packed up to ``scratch_limit``; and the
        scratch size they need."""
        stages = [Stage(tuple(self.pieces), tuple(self.gathers), tuple(self.moves))]
        loads: list[Piece | Gather] = []
        moves: list[Move] = []
        used = peak = 0
        for block_loads, move, nbytes in self.staged:
            if used and used + nbytes > self.scratch_limit:
                stages.append(_stage_of(loads, moves))
                loads, moves, used = [], [], 0
            loads.extend(_at(load, used) for load in block_loads)
            assert move.source is not None
            moves.append(_shifted(move, used))
            used += nbytes
            peak = max(peak, used)
        if moves:
            stages.append(_stage_of(loads, moves))
        return tuple(stages), peak


def _stage_of(loads: Iterable[Piece | Gather], moves: list[Move]) -> Stage:
    loads = list(loads)
    return Stage(
        tuple(x for x in loads if isinstance(x, Piece)), tuple(x for x in loads if isinstance(x, Gather)), tuple(moves)
    )


def _at(load: Piece | Gather, offset: int) -> Piece | Gather:
    return replace(load, offset=offset)


def _shifted(move: Move, offset: int) -> Move:
    assert move.source is not None
    return replace(move, source=_in_buffer(move.source, move.source.buffer, offset))


def _in_buffer(region: Region, buffer: int, base: int) -> Region:
    return Region(buffer, base + region.offset, region.rows, region.cols, region.row_stride, region.itemsize)


def _dense(region: Region) -> bool:
    return region.rows <= 1 or region.row_stride == region.cols * region.itemsize


def _destination(target: FusedTensor, offset: int, column: int, rows: int, total: int) -> Region:
    """Where part ``rows`` (after ``column`` rows of earlier parts) goes in ``target``."""
    itemsize = target.dtype.itemsize
    if target.kind == "bias":
        return Region(ARENA, offset + column * itemsize, 1, rows, rows * itemsize, itemsize)
    width = target.shape[0] if target.layout == "in_out" else target.shape[1]  # in
    if target.layout == "in_out":  # columns column:column+rows of [in, total]
        return Region(ARENA, offset + column * itemsize, width, rows, total * itemsize, itemsize)
    return Region(ARENA, offset + column * width * itemsize, rows, width, width * itemsize, itemsize)


def _parts(
    target: FusedTensor, offset: int, metas: Mapping[str, TensorLike]
) -> Iterator[tuple[str | None, Region | None, Region, bool, str | None]]:
    """Each part of ``target`` placed at ``offset`` of the arena: (source key, its region within
    the source tensor, the destination region, transpose, widen)."""
    total = sum(target.rows)
    column = 0
    for key, start, rows in zip(target.sources, target.row_starts(), target.rows):
        destination = _destination(target, offset, column, rows, total)
        column += rows
        if key is None:
            yield None, None, destination, False, None
            continue
        entry = metas[key]
        widen = entry.dtype.name if entry.dtype != target.dtype else None
        # in_out writes part.T; a source stored [in, out] is already transposed
        transpose = target.kind == "weight" and (target.layout == "in_out") != target.transposed
        yield key, _source_region(target, entry, start, rows), destination, transpose, widen


def fused_moves(
    fused: Iterable[FusedTensor], metas: Mapping[str, TensorLike], buffers: Mapping[str, int]
) -> tuple[tuple[Placement, ...], int, tuple[Move, ...]]:
    """``fused`` carved from buffer 0 (placements, its size) and the moves that fill it from
    sources held whole (C-contiguous, from byte 0) in buffer ``buffers[key]``: how
    ``fastfuse.fuse`` fuses tensors already on a device."""
    placements: list[Placement] = []
    moves: list[Move] = []
    end = 0
    for target in fused:
        start = _align(end)
        placements.append(Placement(target.key, start, tuple(target.shape), target.dtype))
        for key, source, destination, transpose, widen in _parts(target, start, metas):
            moved = None if key is None or source is None else _in_buffer(source, buffers[key], 0)
            moves.append(Move(moved, destination, transpose, widen))
        end = start + target.nbytes
    return tuple(placements), _align(end), tuple(moves)


def _source_region(target: FusedTensor, entry: TensorLike, start: int, rows: int) -> Region:
    """The part's elements in the stored tensor's own orientation, ``offset`` counted from the
    tensor's first byte (of its C-contiguous copy, for a strided one)."""
    itemsize = entry.dtype.itemsize
    if target.kind == "bias":
        return Region(ARENA, start * itemsize, 1, rows, rows * itemsize, itemsize)
    stored_rows, stored_cols = entry.shape[0], entry.shape[1]
    if target.transposed:  # stored [in, out]: columns start:start+rows of every row
        return Region(ARENA, start * itemsize, stored_rows, rows, stored_cols * itemsize, itemsize)
    return Region(ARENA, start * stored_cols * itemsize, rows, stored_cols, stored_cols * itemsize, itemsize)


def plan_transfer(
    checkpoint: Checkpoint,
    fusion: Plan | None,
    *,
    scratch_bytes: int = SCRATCH_BYTES,
    block_bytes: int = 64 << 20,
) -> TransferPlan:
    """The transfer of ``checkpoint`` fused by ``fusion`` (None: every tensor as stored).

    Results: the kept originals in file order, then ``fusion.fused`` in plan order (as
    ``fastfuse.load`` returns them). ``scratch_bytes`` bounds the staging of dropped sources
    (a single block may take up to ``block_bytes`` rounded up to one source row).
    """
    fused = fusion.fused if fusion is not None else ()
    skip = (fusion.dropped if fusion is not None else frozenset()) | {t.key for t in fused}
    kept = [key for key in checkpoint.location if key not in skip]
    builder = _Builder(checkpoint, checkpoint.metas(), scratch_bytes, min(block_bytes, scratch_bytes))
    end = 0
    offsets: dict[str, int] = {}
    for key in checkpoint.in_file_order(kept):
        offsets[key] = offset = builder.kept_offset(key, end)
        builder.keep(key, offset)
        end = offset + checkpoint.location[key][1].nbytes
    placements: list[Placement] = []
    for key in kept:
        entry = checkpoint.location[key][1]
        placements.append(Placement(key, offsets[key], tuple(entry.shape), entry.dtype))
    for target in fused:
        start = _align(end)
        placements.append(Placement(target.key, start, tuple(target.shape), target.dtype))
        builder.add_fused(target, start)
        end = start + target.nbytes
    stages, scratch = builder.stages()
    return TransferPlan(_align(end), scratch, tuple(placements), stages)
