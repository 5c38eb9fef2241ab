"""Numba kernels: move bits from parts to a fused buffer, in parallel, one pass.

This module knows arrays of unsigned integers and byte addresses, nothing else: no key names,
no dtypes beyond element width, no I/O, no allocation of results. All validation happens before
a kernel runs; a kernel trusts its job table.

A *job table* has one int64 row per part (see the ``J_*`` column indices). Part ``p`` is a
strided 2-D source ``S[c, r]`` (``c < rows``, ``r < cols``) written transposed into a
destination whose row ``r`` starts at ``dst + r * dst_row_stride`` and holds ``S[0..rows, r]``
as consecutive elements. :func:`run_tiles` runs the tile grid of every part of every group in
one ``prange``, so small parts never serialize and a whole checkpoint is one parallel region.
When ``S[0..rows, r]`` is itself contiguous (a Fortran-ordered part, or the rows of an
``out_in`` layout) the job is tiled in destination rows instead and each row is one memcpy.

Compilation is the cost that matters on a first run: numba compiles every jitted function into
its own library and compiles each callee again inside every caller, and the block transpose is
hundreds of vector shuffles. So the parallel driver is one small function for every width,
calling the tile *worker* of the job's width through a C function pointer: a worker is a
``cfunc`` whose helpers are inlined (``inline="always"``), compiled only when a job of its
width first runs (a few tenths of a second each), and cached on disk like the driver.

How a tile moves (the measurements behind it: ``docs/design.md``): a tile is a band of
``Shape.tile_rows`` source rows, normally whole rows wide, cut into blocks of ``B`` source rows
(``B * itemsize == 64`` bytes) by ``S`` columns (``S * itemsize == Shape.vector``): ``B``
vectors are loaded, transposed in registers (``log2(S)`` rounds of two-input shuffles per
``S x S`` square) and written as ``S`` whole destination lines. The shape is a parameter of
the one code path, chosen per CPU by measurement (``block_shape``). Walking a band left to
right reads ``B`` sequential streams (the prefetcher's best case) and writes every destination
line exactly once, whole, so the stores are non-temporal: no read-for-ownership, no cache
pollution. The block grid is shifted per part so those stores are 64-byte aligned; the few rows
and columns outside the grid and strided sources go element by element; widening f16/bf16 to
f32 transposes blocks into a scratch block, converts its rows and streams them out.

Importing this module imports numba (about 0.2 s); ``fastfuse`` imports it only when a kernel
is needed. With ``NUMBA_DISABLE_JIT=1`` the intrinsics are replaced by slow pure-Python
equivalents (ctypes on the same addresses) and workers are plain functions, so the tile logic
stays testable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import types

from fastfuse.kernels.intrinsics import (
    LINE,
    call_worker,
    copy_bytes,
    f32_bits,
    job_pointer,
    load_at,
    store_at,
    store_fence,
    stream_lines,
    transpose_block,
    typed_pointer,
)

# Job table columns.
J_SRC, J_SRC_ROW, J_SRC_COL, J_ROWS, J_COLS, J_DST, J_DST_ROW, J_TILING, J_MODE, J_TILE_END = range(10)
JOB_COLUMNS = 10
# How a job is cut into tiles: bands of line blocks (a transpose), or destination rows (copies).
TILING_BLOCKS, TILING_ROWS = 0, 1
ROWS_PER_TILE = 64

# Conversion modes: the destination element from the source element's bits.
MODE_COPY, MODE_F16_TO_F32, MODE_BF16_TO_F32 = 0, 1, 2


# Tile shape in elements: ``Shape.tile_rows`` source rows (output columns) by TILE_COLS source
# columns (output rows). Whole source rows per band keep B long sequential read streams; bands
# of 64 rows give enough tiles to balance threads (20 per 1280-row part).
TILE_COLS = 8192


class Shape(NamedTuple):
    """The parameters of the one code path: ``vector``, bytes of each source row a block loads
    (``intrinsics.VECTORS``); ``tile_rows``, source rows per tile (whole blocks for every width).
    Every shape writes the same bits; which is fastest depends on the CPU (``block_shape``)."""

    vector: int = 32
    tile_rows: int = 64

    def name(self) -> str:
        return f"v{self.vector}-t{self.tile_rows}"


DEFAULT_SHAPE = Shape()  # fastest for every width tried on a Zen 4, AVX-512 and AVX2 (design.md)
SHAPES = (DEFAULT_SHAPE, Shape(64, 64), Shape(16, 64), Shape(32, 128))  # every shape the tests run

# The one place numba options are set: we move bits, so no fastmath; error_model numpy avoids
# division checks in the tile arithmetic. Helpers are inlined into the worker that uses them,
# so each worker is one library (compiled once, not once per caller).
_OPTIONS: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
_inline = numba.njit(inline="always", error_model="numpy")


def tiling(src_row: int, src_col: int, width: int, mode: int) -> int:
    """How to tile a source with these byte strides: row copies when ``S[:, r]`` is contiguous."""
    return TILING_ROWS if mode == MODE_COPY and src_row == width and src_col != width else TILING_BLOCKS


def tile_count(rows: int, cols: int, tiling: int = TILING_BLOCKS, tile_rows: int = DEFAULT_SHAPE.tile_rows) -> int:
    """Tiles a ``rows x cols`` source is cut into (for ``J_TILE_END``) by a worker whose shape
    has ``tile_rows``."""
    if tiling == TILING_ROWS:
        return -(-cols // ROWS_PER_TILE) if rows else 0
    return -(-rows // tile_rows) * -(-cols // TILE_COLS)


@_inline
def _job(jobs: int, row: int):  # type: ignore[no-untyped-def]
    return numba.carray(job_pointer(jobs + row * (JOB_COLUMNS * 8)), JOB_COLUMNS)


@_inline
def _row(address, count, like):  # type: ignore[no-untyped-def]
    """``count`` elements of ``like``'s type at a byte address, as an array (vectorizable loops)."""
    return numba.carray(typed_pointer(address, like), count)


@_inline
def _like(element):  # type: ignore[no-untyped-def]
    """An empty array of the element type a worker's pointer argument declares."""
    return numba.carray(element, 0)


if numba.config.DISABLE_JIT:  # pragma: no cover - exercised by the NUMBA_DISABLE_JIT test run
    from fastfuse.kernels.intrinsics import view

    def _job(jobs, row):  # type: ignore[no-redef,no-untyped-def]
        return view(jobs + row * JOB_COLUMNS * 8, np.dtype(np.int64), JOB_COLUMNS)

    def _row(address, count, like):  # type: ignore[no-redef,no-untyped-def]
        return view(address, like.dtype, count)

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
    if mode == MODE_COPY:
        return like_dst.dtype.type(bits)
    h = np.uint32(bits)
    if mode == MODE_BF16_TO_F32:
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
    mode = job[J_MODE]
    for r in range(r_lo, r_hi):
        src = job[J_SRC] + r * job[J_SRC_COL] + c_lo * job[J_SRC_ROW]
        dst = job[J_DST] + r * job[J_DST_ROW] + c_lo * dst_width
        for _ in range(c_lo, c_hi):
            store_at(dst, _convert(load_at(src, like_src), mode, like_dst))
            src += job[J_SRC_ROW]
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
    rows, cols = job[J_ROWS], job[J_COLS]
    tiles_down = (rows + tile_rows - 1) // tile_rows
    tiles_across = (cols + TILE_COLS - 1) // TILE_COLS
    r0, r1 = _tile_span(tile // tiles_down, tiles_across, TILE_COLS, 0, cols)
    c0, c1 = _tile_span(tile % tiles_down, tiles_down, tile_rows, shift, rows)
    return r0, r1, c0, c1


@_inline
def _move_band(job, c, r0, r1, streaming, like, vector):  # type: ignore[no-untyped-def]
    """Blocks for source rows ``c..c+B`` and columns ``r0..r1`` (``r1 - r0 >= B``), left to right.

    ``B`` sequential read streams; each block writes ``S = vector // itemsize`` whole
    destination lines. A ragged right edge is one more block ending at ``r1``, overlapping its
    neighbour (same bits twice).
    """
    width = like.itemsize
    step = vector // width
    src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
    for b in range((r1 - r0 + step - 1) // step):
        r = min(r0 + b * step, r1 - step)
        src = job[J_SRC] + c * src_row + r * width
        dst = job[J_DST] + r * dst_row + c * width
        transpose_block(src, src_row, dst, dst_row, streaming, like, vector)


@_inline
def _copy_rows(job, tile, width):  # type: ignore[no-untyped-def]
    """Destination rows ``ROWS_PER_TILE * tile ...``: each a contiguous run of the source."""
    r0 = tile * ROWS_PER_TILE
    r1 = min(r0 + ROWS_PER_TILE, job[J_COLS])
    count = job[J_ROWS] * width
    for r in range(r0, r1):
        copy_bytes(job[J_DST] + r * job[J_DST_ROW], job[J_SRC] + r * job[J_SRC_COL], count)


@_inline
def _band_grid(job, tile, tile_rows, width, dst_width):  # type: ignore[no-untyped-def]
    """Tile ``tile``'s ``(r0, r1, c0, c1)``, the first source row of its block grid, whether its
    stores stream, and whether blocks fit (else: element by element). The band grid is shifted
    along c so block rows land on destination line boundaries (aligned streaming stores);
    aligning the source loads too (a shift along r) did not pay."""
    side = LINE // width
    blocks = job[J_SRC_COL] == width
    c_shift = _grid_shift(job[J_DST], job[J_DST_ROW], dst_width) if blocks else -1
    r0, r1, c0, c1 = _tile_bounds(job, tile, max(c_shift, 0), tile_rows)
    streaming = c_shift >= 0
    c_grid = min(c1, c_shift) if streaming and c0 == 0 else c0
    return r0, r1, c0, c1, c_grid, streaming, blocks and r1 - r0 >= side and c1 - c0 >= side


# ---------------------------------------------------------------------------------------------
# Workers: one tile of one job. Compiled as C callbacks, one per element width (or conversion).


def _copy_worker(shape: Shape) -> Callable[..., None]:
    """The copy worker of ``shape``: its parameters are constants of the compiled code."""
    vector, tile_rows = shape.vector, shape.tile_rows

    def copy_tile(jobs, row, tile, element):  # type: ignore[no-untyped-def]
        """Tile ``tile`` of job ``row``: bands of line blocks, row copies, or elements if too small."""
        job = _job(jobs, row)
        like = _like(element)
        width = like.itemsize
        if job[J_TILING] == TILING_ROWS:
            _copy_rows(job, tile, width)
            return
        side = LINE // width
        r0, r1, c0, c1, c_grid, streaming, fits = _band_grid(job, tile, tile_rows, width, width)
        if not fits:
            _move_elements(job, r0, r1, c0, c1, like, like)
            return
        c_end = c_grid + (c1 - c_grid) // side * side
        # Rows before the grid (less than one destination line per output row) go element by
        # element: a cached block there would share lines with the streaming stores, and a line
        # written both ways costs a flush (f16 in-cache rate halved). Rows after it likewise when
        # streaming; otherwise one cached band overlapping the grid (same bits written twice).
        _move_elements(job, r0, r1, c0, c_grid, like, like)
        for c in range(c_grid, c_end, side):
            _move_band(job, c, r0, r1, streaming, like, vector)
        if c_end < c1:
            if streaming:
                _move_elements(job, r0, r1, c_end, c1, like, like)
            else:
                _move_band(job, c1 - side, r0, r1, False, like, vector)
        if streaming:
            store_fence()

    return copy_tile


def _widen_worker(shape: Shape) -> Callable[..., None]:
    """The widening worker of ``shape`` (2-byte source, 4-byte destination)."""
    vector, tile_rows = shape.vector, shape.tile_rows

    def widen_tile(jobs, row, tile, element):  # type: ignore[no-untyped-def]
        """A converting tile (``J_MODE`` says which widening). Blocks are transposed into a
        scratch block (sequential source reads), widened row by row into a row scratch (a loop
        the compiler vectorizes) and streamed out as whole lines where the destination allows.
        Edges and strided sources go element by element."""
        job = _job(jobs, row)
        like_src = _like(element)
        like_dst = np.empty(0, np.uint32)
        width, dst_width = like_src.itemsize, like_dst.itemsize
        side = LINE // width
        step = vector // width
        mode = job[J_MODE]
        r0, r1, c0, c1, c_grid, streaming, fits = _band_grid(job, tile, tile_rows, width, dst_width)
        if not fits:
            _move_elements(job, r0, r1, c0, c1, like_src, like_dst)
            return
        scratch = np.empty(side * step, like_src.dtype)
        wide = np.empty(side, like_dst.dtype)
        block, wide_row = scratch.ctypes.data, wide.ctypes.data
        src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
        c_end = c_grid + (c1 - c_grid) // side * side
        r_end = r0 + (r1 - r0) // step * step
        _move_elements(job, r0, r1, c0, c_grid, like_src, like_dst)
        for c in range(c_grid, c_end, side):
            for r in range(r0, r_end, step):
                transpose_block(job[J_SRC] + c * src_row + r * width, src_row, block, LINE, False, like_src, vector)
                for i in range(step):
                    for j in range(side):
                        wide[j] = _convert(scratch[i * side + j], mode, like_dst)
                    dst = job[J_DST] + (r + i) * dst_row + c * dst_width
                    if streaming:
                        stream_lines(dst, wide_row, side * dst_width // LINE)
                    else:
                        copy_bytes(dst, wide_row, side * dst_width)
        _move_elements(job, r0, r1, c_end, c1, like_src, like_dst)
        _move_elements(job, r_end, r1, c_grid, c_end, like_src, like_dst)
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
    n_tiles = jobs[-1, J_TILE_END] if jobs.shape[0] > 0 else 0
    tile_ends = jobs[:, J_TILE_END]
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
    kind = "copy" if mode == MODE_COPY else "widen"
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
