"""Numba kernels: move bits from parts to a fused buffer, in parallel, one pass.

This module knows arrays of unsigned integers and byte addresses, nothing else: no key names,
no dtypes beyond element width, no I/O, no allocation of results. All validation happens before
a kernel runs; a kernel trusts its job table.

The job table (one row per part) and the block shapes are described in :mod:`~fastfuse.kernels.job_table`.

The parallel driver (:func:`run_tiles`) is one small function for every width; it calls the
tile *worker* of the job's width and block shape through a C function pointer: a ``cfunc``
whose helpers are inlined, compiled when a job of its kind first runs and cached on disk like
the driver (why: compile time, ``docs/design.md``).

How a tile moves: a tile is ``Shape.tile_rows`` source rows, cut into bands of ``B`` rows
(``B * itemsize == 64``) and blocks of ``B`` rows by ``S`` columns (``S * itemsize ==
Shape.vector``); a block's ``B`` vectors are transposed in registers and written as ``S``
whole destination lines, non-temporally (every line written once, whole). Bands are walked
left to right (``B`` sequential read streams) or, ``Shape.columns_first``, block column by
block column (runs of lines per destination row), optionally prefetching each row's lines
``Shape.prefetch`` columns ahead. The block grid is shifted per part so those stores are
aligned; the rows beside it go through a scratch block, strided sources element by element;
widening transposes into a scratch block and converts its rows. The measurements behind each
choice: ``docs/design.md``.

Importing this module imports numba (about 0.2 s); ``fastfuse`` imports it only when a kernel
is needed. With ``NUMBA_DISABLE_JIT=1`` the intrinsics are replaced by slow pure-Python
equivalents (ctypes on the same addresses) and workers are plain functions, so the tile logic
stays testable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import types

from fastfuse.kernels import job_table as jt
from fastfuse.kernels.intrinsics import (
    LINE,
    call_worker,
    copy_bytes,
    f32_bits,
    job_pointer,
    load_at,
    prefetch,
    store_at,
    store_fence,
    stream_lines,
    transpose_block,
)
from fastfuse.kernels.job_table import DEFAULT_SHAPE, Shape

__all__ = ["run_tiles", "worker"]

# The one place numba options are set: we move bits, so no fastmath; error_model numpy avoids
# division checks in the tile arithmetic. Helpers are inlined into the worker that uses them,
# so each worker is one library (compiled once, not once per caller).
_OPTIONS: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
_inline = numba.njit(inline="always", error_model="numpy")


@_inline
def _job(jobs: int, row: int):  # type: ignore[no-untyped-def]
    return numba.carray(job_pointer(jobs + row * (jt.JOB_COLUMNS * 8)), jt.JOB_COLUMNS)


@_inline
def _like(element):  # type: ignore[no-untyped-def]
    """An empty array of the element type a worker's pointer argument declares."""
    return numba.carray(element, 0)


if numba.config.DISABLE_JIT:  # pragma: no cover - exercised by the NUMBA_DISABLE_JIT test run
    from fastfuse.kernels.intrinsics import view

    def _job(jobs, row):  # type: ignore[no-redef,no-untyped-def]
        return view(jobs + row * jt.JOB_COLUMNS * 8, np.dtype(np.int64), jt.JOB_COLUMNS)

    def _like(element):  # type: ignore[no-redef,no-untyped-def]
        return element


# ---------------------------------------------------------------------------------------------
# Helpers, inlined into the workers.


@_inline
def _convert(bits, mode, like_dst):  # type: ignore[no-untyped-def]
    """The destination element for one source element's bits, by conversion mode.

    Widening is exact and branch-free (selects, so a row of them vectorizes): bf16 is the top
    half of f32; f16 normals rebias the exponent, subnormals are ``m * 2**-24`` (exact in f32),
    inf and NaN keep their payload shifted into the f32 mantissa, never quieted.
    """
    if mode == jt.MODE_COPY:
        return like_dst.dtype.type(bits)
    h = np.uint32(bits)
    if mode == jt.MODE_BF16_TO_F32:
        return like_dst.dtype.type(h << np.uint32(16))
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    magnitude = h & np.uint32(0x7FFF)
    normal = (magnitude << np.uint32(13)) + np.uint32(112 << 23)
    special = np.uint32(0x7F800000) | ((magnitude & np.uint32(0x3FF)) << np.uint32(13))
    subnormal = f32_bits(np.float32(magnitude) * np.float32(2.0**-24))
    value = special if magnitude >= np.uint32(0x7C00) else (normal if magnitude >= np.uint32(0x0400) else subnormal)
    return like_dst.dtype.type(value | sign)


@_inline
def _move_elements(job, r_lo, r_hi, c_lo, c_hi, like_src, like_dst):  # type: ignore[no-untyped-def]
    """Element by element: the fallback for block-grid edges and strided sources."""
    dst_width = like_dst.itemsize
    mode = job[jt.J_MODE]
    for r in range(r_lo, r_hi):
        src = job[jt.J_SRC] + r * job[jt.J_SRC_COL] + c_lo * job[jt.J_SRC_ROW]
        dst = job[jt.J_DST] + r * job[jt.J_DST_ROW] + c_lo * dst_width
        for _ in range(c_lo, c_hi):
            store_at(dst, _convert(load_at(src, like_src), mode, like_dst))
            src += job[jt.J_SRC_ROW]
            dst += dst_width


@_inline
def _grid_shift(address, stride, width):  # type: ignore[no-untyped-def]
    """Elements to skip so ``address + k * width`` is line-aligned on every row (-1: never)."""
    misalignment = -address % LINE
    if stride % LINE != 0 or misalignment % width != 0:
        return -1
    return misalignment // width


@_inline
def _tile_span(index, count, tile, shift, size):  # type: ignore[no-untyped-def]
    """Bounds of tile ``index`` of ``count`` over ``0..size`` with inner edges at ``shift + k*tile``.

    The first tile absorbs the ``shift`` elements before the block grid, the last one whatever is
    left, so the tile count does not depend on the shift.
    """
    lo = 0 if index == 0 else min(size, index * tile + shift)
    hi = size if index == count - 1 else min(size, (index + 1) * tile + shift)
    return lo, hi


@_inline
def _tile_bounds(job, tile, shift, tile_rows):  # type: ignore[no-untyped-def]
    """``(r0, r1, c0, c1)`` of block tile ``tile``: output rows ``r``, source rows ``c``."""
    rows, cols = job[jt.J_ROWS], job[jt.J_COLS]
    tiles_down = (rows + tile_rows - 1) // tile_rows
    tiles_across = (cols + jt.TILE_COLS - 1) // jt.TILE_COLS
    r0, r1 = _tile_span(tile // tiles_down, tiles_across, jt.TILE_COLS, 0, cols)
    c0, c1 = _tile_span(tile % tiles_down, tiles_down, tile_rows, shift, rows)
    return r0, r1, c0, c1


@_inline
def _move_band_rows(job, c, keep_lo, keep_hi, r0, r1, scratch, like, vector):  # type: ignore[no-untyped-def]
    """Source rows ``c + keep_lo .. c + keep_hi`` of the band at ``c`` (``c + B <= J_ROWS``),
    columns ``r0..r1``: each block is transposed into ``scratch`` (``S`` lines, in cache) and
    the kept part of each of its rows copied out with ordinary stores. For the rows beside the
    streaming grid, less than a line per destination row: those lines are written only here,
    so no line is written both ways (that costs a flush), and at block speed, not element by
    element."""
    width = like.itemsize
    step = vector // width
    src_row, dst_row = job[jt.J_SRC_ROW], job[jt.J_DST_ROW]
    block = scratch.ctypes.data
    for b in range((r1 - r0 + step - 1) // step):
        r = min(r0 + b * step, r1 - step)
        transpose_block(job[jt.J_SRC] + c * src_row + r * width, src_row, block, LINE, False, like, vector)
        for i in range(step):
            dst = job[jt.J_DST] + (r + i) * dst_row + (c + keep_lo) * width
            copy_bytes(dst, block + i * LINE + keep_lo * width, (keep_hi - keep_lo) * width)


@_inline
def _move_blocks(job, c_lo, c_hi, r0, r1, streaming, like, vector, ahead):  # type: ignore[no-untyped-def]
    """The blocks of bands ``c_lo..c_hi`` (whole bands of ``B`` source rows) and columns
    ``r0..r1`` (``r1 - r0 >= S``), block column by block column: each column's ``S``
    destination rows get ``c_hi - c_lo`` elements in a row, as whole lines. Over one band this
    walks it left to right: ``B`` sequential read streams. A ragged right edge is one more
    block column ending at ``r1``, overlapping its neighbour (same bits twice). With ``ahead``
    (``Shape.prefetch``), before each block every row of its band prefetches the line where the
    column ``ahead`` columns on ends, when no column before it reaches that line (judged on the
    first row: exact when rows are whole lines apart): one prefetch per new line, inside the tile."""
    width = like.itemsize
    side = LINE // width
    step = vector // width
    src_row, dst_row = job[jt.J_SRC_ROW], job[jt.J_DST_ROW]
    for b in range((r1 - r0 + step - 1) // step):
        r = min(r0 + b * step, r1 - step)
        last = (r0 + (b + ahead + 1) * step) * width - 1  # byte offset in the row, ahead's end
        fetch = ahead > 0 and last < r1 * width and (job[jt.J_SRC] + last) % LINE < vector
        for c in range(c_lo, c_hi, side):
            if fetch:
                for i in range(side):
                    prefetch(job[jt.J_SRC] + (c + i) * src_row + last)
            src = job[jt.J_SRC] + c * src_row + r * width
            dst = job[jt.J_DST] + r * dst_row + c * width
            transpose_block(src, src_row, dst, dst_row, streaming, like, vector)


@_inline
def _widen_block(job, c, r, keep_lo, keep_hi, streaming, scratch, wide, like_dst, vector):  # type: ignore[no-untyped-def]
    """The block at source rows ``c..c+B``, columns ``r..r+S``, widened: transposed into
    ``scratch`` (sequential source reads), each of its ``S`` rows converted into ``wide`` (a
    loop the compiler vectorizes) and elements ``keep_lo..keep_hi`` of it written to the
    destination row: streamed when whole and ``streaming`` (a line-aligned row), else copied."""
    width, dst_width = scratch.itemsize, like_dst.itemsize
    side = LINE // width
    step = vector // width
    mode = job[jt.J_MODE]
    src_row, dst_row = job[jt.J_SRC_ROW], job[jt.J_DST_ROW]
    block, wide_row = scratch.ctypes.data, wide.ctypes.data
    transpose_block(job[jt.J_SRC] + c * src_row + r * width, src_row, block, LINE, False, scratch, vector)
    for i in range(step):
        for j in range(side):
            wide[j] = _convert(scratch[i * side + j], mode, like_dst)
        dst = job[jt.J_DST] + (r + i) * dst_row + (c + keep_lo) * dst_width
        if streaming and keep_hi - keep_lo == side:
            stream_lines(dst, wide_row, side * dst_width // LINE)
        else:
            copy_bytes(dst, wide_row + keep_lo * dst_width, (keep_hi - keep_lo) * dst_width)


@_inline
def _copy_rows(job, tile, width):  # type: ignore[no-untyped-def]
    """Destination rows ``ROWS_PER_TILE * tile ...``: each a contiguous run of the source."""
    r0 = tile * jt.ROWS_PER_TILE
    r1 = min(r0 + jt.ROWS_PER_TILE, job[jt.J_COLS])
    count = job[jt.J_ROWS] * width
    for r in range(r0, r1):
        copy_bytes(job[jt.J_DST] + r * job[jt.J_DST_ROW], job[jt.J_SRC] + r * job[jt.J_SRC_COL], count)


@_inline
def _band_grid(job, tile, tile_rows, width, dst_width):  # type: ignore[no-untyped-def]
    """Tile ``tile``'s ``(r0, r1, c0, c1)``, the first source row of its block grid, whether its
    stores stream, and whether blocks fit (else: element by element). The band grid is shifted
    along c so block rows land on destination line boundaries (aligned streaming stores);
    aligning the source loads too (a shift along r) did not pay."""
    side = LINE // width
    blocks = job[jt.J_SRC_COL] == width
    c_shift = _grid_shift(job[jt.J_DST], job[jt.J_DST_ROW], dst_width) if blocks else -1
    r0, r1, c0, c1 = _tile_bounds(job, tile, max(c_shift, 0), tile_rows)
    streaming = c_shift >= 0
    c_grid = min(c1, c_shift) if streaming and c0 == 0 else c0
    return r0, r1, c0, c1, c_grid, streaming, blocks and r1 - r0 >= side and c1 - c0 >= side


# ---------------------------------------------------------------------------------------------
# Workers: one tile of one job. Compiled as C callbacks, one per element width (or conversion).


def _copy_worker(shape: Shape) -> Callable[..., None]:
    """The copy worker of ``shape``: its parameters are constants of the compiled code."""
    vector, tile_rows, columns_first, ahead = shape

    def copy_tile(jobs, row, tile, element):  # type: ignore[no-untyped-def]
        """Tile ``tile`` of job ``row``: bands of line blocks, row copies, or elements if too small."""
        job = _job(jobs, row)
        like = _like(element)
        width = like.itemsize
        if job[jt.J_TILING] == jt.TILING_ROWS:
            _copy_rows(job, tile, width)
            return
        side = LINE // width
        r0, r1, c0, c1, c_grid, streaming, fits = _band_grid(job, tile, tile_rows, width, width)
        if not fits:
            _move_elements(job, r0, r1, c0, c1, like, like)
            return
        c_end = c_grid + (c1 - c_grid) // side * side
        # Rows before the grid (less than one destination line per output row) and, when
        # streaming, after it go through a scratch block (a cached block overlapping the grid
        # would share lines with the streaming stores, and a line written both ways costs a
        # flush: f16 in-cache rate halved); otherwise one cached band overlaps the grid (same
        # bits written twice).
        if c0 < c_grid or (streaming and c_end < c1):
            scratch = np.empty(side * (vector // width), like.dtype)
            if c0 < c_grid:
                _move_band_rows(job, c0, 0, c_grid - c0, r0, r1, scratch, like, vector)
            if streaming and c_end < c1:
                _move_band_rows(job, c1 - side, c_end - (c1 - side), side, r0, r1, scratch, like, vector)
        if columns_first and job[jt.J_SRC_ROW] % jt.ALIASING_STRIDE != 0:
            _move_blocks(job, c_grid, c_end, r0, r1, streaming, like, vector, ahead)
        else:  # the band walk (the hardware prefetches it)
            for c in range(c_grid, c_end, side):
                _move_blocks(job, c, c + side, r0, r1, streaming, like, vector, 0)
        if c_end < c1 and not streaming:
            _move_blocks(job, c1 - side, c1, r0, r1, False, like, vector, 0)
        if streaming:
            store_fence()

    return copy_tile


def _widen_worker(shape: Shape) -> Callable[..., None]:
    """The widening worker of ``shape`` (2-byte source, 4-byte destination)."""
    vector, tile_rows, columns_first, _ = shape  # (prefetching is the copies')

    def widen_tile(jobs, row, tile, element):  # type: ignore[no-untyped-def]
        """A converting tile (``J_MODE`` says which widening): :func:`_widen_block` over the
        block grid, whole lines streamed where the destination allows; the rows beside the grid
        keep part of each widened row; a ragged right edge is one more block column ending at
        ``r1`` (same bits twice). Strided sources go element by element."""
        job = _job(jobs, row)
        like_src = _like(element)
        like_dst = np.empty(0, np.uint32)
        width, dst_width = like_src.itemsize, like_dst.itemsize
        side = LINE // width
        step = vector // width
        r0, r1, c0, c1, c_grid, streaming, fits = _band_grid(job, tile, tile_rows, width, dst_width)
        if not fits:
            _move_elements(job, r0, r1, c0, c1, like_src, like_dst)
            return
        scratch = np.empty(side * step, like_src.dtype)
        wide = np.empty(side, like_dst.dtype)
        c_end = c_grid + (c1 - c_grid) // side * side
        bands, columns = (c_end - c_grid) // side, (r1 - r0 + step - 1) // step
        for k in range(bands * columns):
            band, column = (k % bands, k // bands) if columns_first else (k // columns, k % columns)
            r = min(r0 + column * step, r1 - step)
            _widen_block(job, c_grid + band * side, r, 0, side, streaming, scratch, wide, like_dst, vector)
        for column in range(columns if c0 < c_grid or c_end < c1 else 0):
            r = min(r0 + column * step, r1 - step)
            if c0 < c_grid:
                _widen_block(job, c0, r, 0, c_grid - c0, False, scratch, wide, like_dst, vector)
            if c_end < c1:
                _widen_block(job, c1 - side, r, c_end - (c1 - side), side, False, scratch, wide, like_dst, vector)
        if streaming:
            store_fence()

    return widen_tile


# ---------------------------------------------------------------------------------------------
# The parallel driver and the worker registry.


def _run_tiles(jobs, worker):  # type: ignore[no-untyped-def]
    """Run every tile of every job in one parallel loop, each through ``worker``.

    ``jobs``: int64 ``[n_parts, JOB_COLUMNS]``, C-contiguous, with ``J_TILE_END`` the running
    tile count. ``worker``: the address of a worker (:func:`worker`) for the jobs' widths.

    Why tiles are bands of whole-line blocks with non-temporal stores (the designs measured):
    ``docs/design.md``.
    """
    n_tiles = jobs[-1, jt.J_TILE_END] if jobs.shape[0] > 0 else 0
    tile_ends = jobs[:, jt.J_TILE_END]
    base = jobs.ctypes.data
    for t in numba.prange(n_tiles):
        p = np.searchsorted(tile_ends, t, side="right")
        first = tile_ends[p - 1] if p > 0 else 0
        call_worker(worker, base, p, t - first)


def _compile(make: Callable[[bool], Any]) -> Any:
    """``make(cache=True)``, or ``make(cache=False)`` when numba has no writable cache folder
    (neither ``NUMBA_CACHE_DIR``, the package's ``__pycache__`` nor the user cache): the kernels
    then compile in every process instead of failing."""
    try:
        return make(True)
    except RuntimeError as e:
        if "no locator available" not in str(e):
            raise
        return make(False)


run_tiles = _compile(lambda cache: numba.njit(parallel=True, cache=cache, **_OPTIONS)(_run_tiles))

WorkerKey = tuple[str, int, Shape]  # (kind, width, shape)
_WORKERS: dict[WorkerKey, Any] = {}  # -> address (or function, without JIT)
_COMPILED: dict[WorkerKey, Any] = {}  # -> numba CFunc
_WORKERS_LOCK = threading.Lock()
_UINTS = {1: types.uint8, 2: types.uint16, 4: types.uint32, 8: types.uint64}


def worker(mode: int, width: int, shape: Shape = DEFAULT_SHAPE) -> Any:
    """The worker of ``shape`` for jobs of ``mode`` (copies, or any widening) whose source
    elements are ``width`` bytes, compiled (or loaded from numba's cache) on first use; its
    address, for :func:`run_tiles`."""
    kind = "copy" if mode == jt.MODE_COPY else "widen"
    key = (kind, width, shape)
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            function = (_copy_worker if kind == "copy" else _widen_worker)(shape)
            if numba.config.DISABLE_JIT:
                _WORKERS[key] = (function, np.empty(0, np.dtype(f"u{width}")))
            else:
                signature = types.void(types.intp, types.intp, types.intp, types.CPointer(_UINTS[width]))
                compiled = _compile(lambda cache: numba.cfunc(signature, cache=cache, error_model="numpy")(function))
                _COMPILED[key] = compiled
                _WORKERS[key] = compiled.address
        return _WORKERS[key]
