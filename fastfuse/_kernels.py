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

How a tile moves (timed on whole large-v3 by ``bench/report.py``, see ``run_tiles``): a tile is a band of
``TILE_ROWS`` source rows, normally whole rows wide. It is cut into blocks of ``B x B``
elements with ``B * itemsize == 64`` bytes, one cache line per block row: ``B`` source lines are
loaded, transposed in vector registers (``log2(B)`` rounds of two-input shuffles) and written as
``B`` whole destination lines. Walking a band left to right reads ``B`` sequential streams (the
hardware prefetcher's best case) and writes every destination line exactly once, whole, so the
stores are non-temporal: no read-for-ownership of the destination, no cache pollution. The
block grid is shifted per part so those stores are 64-byte aligned; the few rows and columns
outside the grid and strided sources go element by element; widening f16/bf16 to f32
transposes blocks into a scratch block and converts its rows.

Importing this module imports numba (about 0.2 s); ``fastfuse`` imports it only when a kernel
is needed. With ``NUMBA_DISABLE_JIT=1`` the intrinsics are replaced by slow pure-Python
equivalents (ctypes on the same addresses) and workers are plain functions, so the tile logic
stays testable.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Job table columns.
J_SRC, J_SRC_ROW, J_SRC_COL, J_ROWS, J_COLS, J_DST, J_DST_ROW, J_TILING, J_MODE, J_TILE_END = range(10)
JOB_COLUMNS = 10
# How a job is cut into tiles: bands of line blocks (a transpose), or destination rows (copies).
TILING_BLOCKS, TILING_ROWS = 0, 1
ROWS_PER_TILE = 64

# Conversion modes: the destination element from the source element's bits.
MODE_COPY, MODE_F16_TO_F32, MODE_BF16_TO_F32 = 0, 1, 2

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

# Bytes per block row: one cache line, one AVX-512 register (LLVM splits it into two or four
# registers on older CPUs; the result is the same bits).
LINE = 64

# Tile shape in elements: TILE_ROWS source rows (output columns) by TILE_COLS source columns
# (output rows). Whole source rows per band keep B long sequential read streams; bands of 64
# rows give enough tiles to balance threads (20 per 1280-row part).
TILE_ROWS = 64
TILE_COLS = 8192

# The one place numba options are set: we move bits, so no fastmath; error_model numpy avoids
# division checks in the tile arithmetic. Helpers are inlined into the worker that uses them,
# so each worker is one library (compiled once, not once per caller).
_OPTIONS: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
_inline = numba.njit(inline="always", error_model="numpy")


def tiling(src_row: int, src_col: int, width: int, mode: int) -> int:
    """How to tile a source with these byte strides: row copies when ``S[:, r]`` is contiguous."""
    return TILING_ROWS if mode == MODE_COPY and src_row == width and src_col != width else TILING_BLOCKS


def tile_count(rows: int, cols: int, tiling: int = TILING_BLOCKS) -> int:
    """Tiles a ``rows x cols`` source is cut into (for ``J_TILE_END``)."""
    if tiling == TILING_ROWS:
        return -(-cols // ROWS_PER_TILE) if rows else 0
    return -(-rows // TILE_ROWS) * -(-cols // TILE_COLS)


# ---------------------------------------------------------------------------------------------
# Intrinsics: single LLVM instructions on byte addresses.


@intrinsic
def _load(typingctx, address, like):  # type: ignore[no-untyped-def]
    """Load one element of ``like``'s dtype from a byte address (no alignment assumed)."""
    sig = like.dtype(types.intp, like)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        pointer_type = context.get_value_type(like.dtype).as_pointer()
        return builder.load(builder.inttoptr(args[0], pointer_type), align=1)

    return sig, codegen


@intrinsic
def _store(typingctx, address, value):  # type: ignore[no-untyped-def]
    """Store ``value`` at a byte address (no alignment assumed)."""
    sig = types.void(types.intp, value)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        pointer_type = context.get_value_type(value).as_pointer()
        builder.store(args[1], builder.inttoptr(args[0], pointer_type), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _transpose_block(typingctx, src, src_stride, dst, dst_stride, streaming, like):  # type: ignore[no-untyped-def]
    """Transpose one ``B x B`` block, ``B = 64 // itemsize``, through vector registers.

    Loads ``B`` rows of 64 bytes from ``src + i * src_stride``, transposes them with
    ``log2(B)`` rounds of interleaves, stores ``B`` rows to ``dst + i * dst_stride``.
    Addresses and strides are in bytes. ``streaming`` stores need 64-byte aligned destination
    rows and bypass the cache (finish with ``_store_fence``). One shuffle network serves both
    kinds of store: the block is the bulk of a worker's compile time.
    """
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.boolean, like)
    bits = like.dtype.bitwidth
    side = LINE * 8 // bits

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        src_addr, src_step, dst_addr, dst_step, stream, _ = args
        vector_ptr = ir.VectorType(ir.IntType(bits), side).as_pointer()
        mask_type = ir.VectorType(ir.IntType(32), side)
        half = side // 2
        low = ir.Constant(mask_type, [v for k in range(half) for v in (k, k + side)])
        high = ir.Constant(mask_type, [v for k in range(half, side) for v in (k, k + side)])

        def row_pointers(base, step):  # type: ignore[no-untyped-def]
            pointers, address = [], base
            for _ in range(side):
                pointers.append(builder.inttoptr(address, vector_ptr))
                address = builder.add(address, step)
            return pointers

        rows = [builder.load(p, align=1) for p in row_pointers(src_addr, src_step)]
        # log2(B) rounds of interleaving rows i and i + B/2. (Swapping index bits inside
        # 64-bit lanes with shifts and masks instead needs fewer shuffle-port uops but was
        # no faster here: the kernel waits on memory, not on shuffles.)
        for _ in range(side.bit_length() - 1):
            interleaved = []
            for i in range(half):
                a, b = rows[i], rows[i + half]
                interleaved.append(builder.shuffle_vector(a, b, low))
                interleaved.append(builder.shuffle_vector(a, b, high))
            rows = interleaved
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        if stream.type != ir.IntType(1):
            stream = builder.icmp_unsigned("!=", stream, ir.Constant(stream.type, 0))
        with builder.if_else(stream) as (then, otherwise):
            with then:
                for row, pointer in zip(rows, row_pointers(dst_addr, dst_step)):
                    builder.store(row, pointer, align=LINE).set_metadata("nontemporal", nontemporal)
            with otherwise:
                for row, pointer in zip(rows, row_pointers(dst_addr, dst_step)):
                    builder.store(row, pointer, align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _typed_pointer(typingctx, address, like):  # type: ignore[no-untyped-def]
    """A typed pointer to ``like``'s element type at a byte address (for ``numba.carray``)."""
    sig = types.CPointer(like.dtype)(types.intp, like)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(like.dtype).as_pointer())

    return sig, codegen


@intrinsic
def _job_pointer(typingctx, address):  # type: ignore[no-untyped-def]
    """The job table row at a byte address, as an int64 pointer."""
    sig = types.CPointer(types.int64)(types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], ir.IntType(64).as_pointer())

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The uint32 bit pattern of a float32 (a bitcast, no conversion)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _copy_bytes(typingctx, dst, src, count):  # type: ignore[no-untyped-def]
    """``memcpy(dst, src, count)`` on byte addresses (the ranges never overlap)."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        byte_ptr = ir.IntType(8).as_pointer()
        dst_ptr, src_ptr = (builder.inttoptr(a, byte_ptr) for a in args[:2])
        cgutils.raw_memcpy(builder, dst_ptr, src_ptr, args[2], 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):  # type: ignore[no-untyped-def]
    """``sfence``: make this thread's non-temporal stores globally visible, in order."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if _X86:
            fn_type = ir.FunctionType(ir.VoidType(), [])
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=fn_type), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _call_worker(typingctx, worker, jobs, row, tile):  # type: ignore[no-untyped-def]
    """Call the worker ``cfunc`` at address ``worker`` with ``(jobs, row, tile, NULL)``.

    Every worker takes ``(intp, intp, intp, pointer)``; the pointer's type only selects the
    worker's element width at compile time, so NULL is passed.
    """
    sig = types.void(types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        word = ir.IntType(64)
        fn_type = ir.FunctionType(ir.VoidType(), [word, word, word, ir.IntType(8).as_pointer()])
        function = builder.inttoptr(args[0], fn_type.as_pointer())
        builder.call(function, [*args[1:], ir.Constant(ir.IntType(8).as_pointer(), None)])
        return context.get_dummy_value()

    return sig, codegen


@_inline
def _job(jobs: int, row: int):  # type: ignore[no-untyped-def]
    return numba.carray(_job_pointer(jobs + row * (JOB_COLUMNS * 8)), JOB_COLUMNS)


@_inline
def _row(address, count, like):  # type: ignore[no-untyped-def]
    """``count`` elements of ``like``'s type at a byte address, as an array (vectorizable loops)."""
    return numba.carray(_typed_pointer(address, like), count)


@_inline
def _like(element):  # type: ignore[no-untyped-def]
    """An empty array of the element type a worker's pointer argument declares."""
    return numba.carray(element, 0)


if numba.config.DISABLE_JIT:  # pragma: no cover - exercised by the NUMBA_DISABLE_JIT test run
    # Intrinsics only exist in compiled code; these do the same on the same addresses.

    def _view(address, dtype, count):  # type: ignore[no-untyped-def]
        buffer = (ctypes.c_char * (int(count) * dtype.itemsize)).from_address(int(address))
        return np.frombuffer(buffer, dtype)

    def _load(address, like):  # type: ignore[no-redef,no-untyped-def]
        return _view(address, like.dtype, 1)[0]

    def _store(address, value):  # type: ignore[no-redef,no-untyped-def]
        _view(address, value.dtype, 1)[0] = value

    def _transpose_block(src, src_stride, dst, dst_stride, streaming, like):  # type: ignore[no-redef,no-untyped-def]
        assert not streaming or (dst % LINE == 0 and dst_stride % LINE == 0), "streaming stores need aligned rows"
        side = LINE // like.itemsize
        block = [_view(src + i * src_stride, like.dtype, side).copy() for i in range(side)]
        for i in range(side):
            _view(dst + i * dst_stride, like.dtype, side)[:] = [row[i] for row in block]

    def _store_fence():  # type: ignore[no-redef,no-untyped-def]
        pass

    def _copy_bytes(dst, src, count):  # type: ignore[no-redef,no-untyped-def]
        ctypes.memmove(int(dst), int(src), int(count))

    def _job(jobs, row):  # type: ignore[no-redef,no-untyped-def]
        return _view(jobs + row * JOB_COLUMNS * 8, np.dtype(np.int64), JOB_COLUMNS)

    def _row(address, count, like):  # type: ignore[no-redef,no-untyped-def]
        return _view(address, like.dtype, count)

    def _like(element):  # type: ignore[no-redef,no-untyped-def]
        return element

    def _f32_bits(value):  # type: ignore[no-redef,no-untyped-def]
        return np.float32(value).view(np.uint32)

    def _call_worker(worker, jobs, row, tile):  # type: ignore[no-redef,no-untyped-def]
        function, element = worker
        function(jobs, row, tile, element)


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
    subnormal = _f32_bits(np.float32(magnitude) * np.float32(2.0**-24))
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
            _store(dst, _convert(_load(src, like_src), mode, like_dst))
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
def _tile_bounds(job, tile, shift):  # type: ignore[no-untyped-def]
    """``(r0, r1, c0, c1)`` of block tile ``tile``: output rows ``r``, source rows ``c``."""
    rows, cols = job[J_ROWS], job[J_COLS]
    tiles_down = (rows + TILE_ROWS - 1) // TILE_ROWS
    tiles_across = (cols + TILE_COLS - 1) // TILE_COLS
    r0, r1 = _tile_span(tile // tiles_down, tiles_across, TILE_COLS, 0, cols)
    c0, c1 = _tile_span(tile % tiles_down, tiles_down, TILE_ROWS, shift, rows)
    return r0, r1, c0, c1


@_inline
def _move_band(job, c, r0, r1, streaming, like):  # type: ignore[no-untyped-def]
    """Blocks for source rows ``c..c+B`` and columns ``r0..r1`` (``r1 - r0 >= B``), left to right.

    ``B`` sequential read streams; each block writes ``B`` whole destination lines. A ragged
    right edge is one more block ending at ``r1``, overlapping its neighbour (same bits twice).
    """
    width = like.itemsize
    side = LINE // width
    src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
    for b in range((r1 - r0 + side - 1) // side):
        r = min(r0 + b * side, r1 - side)
        src = job[J_SRC] + c * src_row + r * width
        dst = job[J_DST] + r * dst_row + c * width
        _transpose_block(src, src_row, dst, dst_row, streaming, like)


@_inline
def _copy_rows(job, tile, width):  # type: ignore[no-untyped-def]
    """Destination rows ``ROWS_PER_TILE * tile ...``: each a contiguous run of the source."""
    r0 = tile * ROWS_PER_TILE
    r1 = min(r0 + ROWS_PER_TILE, job[J_COLS])
    count = job[J_ROWS] * width
    for r in range(r0, r1):
        _copy_bytes(job[J_DST] + r * job[J_DST_ROW], job[J_SRC] + r * job[J_SRC_COL], count)


# ---------------------------------------------------------------------------------------------
# Workers: one tile of one job. Compiled as C callbacks, one per element width (or conversion).


def _copy_tile(jobs, row, tile, element):  # type: ignore[no-untyped-def]
    """Tile ``tile`` of job ``row``: bands of line blocks, row copies, or elements if too small."""
    job = _job(jobs, row)
    like = _like(element)
    width = like.itemsize
    if job[J_TILING] == TILING_ROWS:
        _copy_rows(job, tile, width)
        return
    side = LINE // width
    blocks = job[J_SRC_COL] == width
    # Shift the band grid along c so block rows land on destination line boundaries (aligned
    # streaming stores). Aligning source loads too (a shift along r) did not pay.
    c_shift = _grid_shift(job[J_DST], job[J_DST_ROW], width) if blocks else -1
    r0, r1, c0, c1 = _tile_bounds(job, tile, max(c_shift, 0))
    if r1 - r0 < side or c1 - c0 < side or not blocks:
        _move_elements(job, r0, r1, c0, c1, like, like)
        return
    streaming = c_shift >= 0
    c_grid = min(c1, c_shift) if streaming and c0 == 0 else c0
    c_end = c_grid + (c1 - c_grid) // side * side
    # Rows before the grid (less than one destination line per output row) go element by
    # element: a cached block there would share lines with the streaming stores, and a line
    # written both ways costs a flush (f16 in-cache rate halved). Rows after it likewise when
    # streaming; otherwise one cached band overlapping the grid (same bits written twice).
    _move_elements(job, r0, r1, c0, c_grid, like, like)
    for c in range(c_grid, c_end, side):
        _move_band(job, c, r0, r1, streaming, like)
    if c_end < c1:
        if streaming:
            _move_elements(job, r0, r1, c_end, c1, like, like)
        else:
            _move_band(job, c1 - side, r0, r1, False, like)
    if streaming:
        _store_fence()


def _widen_tile(jobs, row, tile, element):  # type: ignore[no-untyped-def]
    """A converting tile (2-byte source, 4-byte destination; ``J_MODE`` says which widening).

    Line blocks are transposed into a scratch block, then widened row by row: the scratch
    keeps the source reads sequential (as for copies) and turns the conversion into contiguous
    rows the compiler vectorizes. Edges and strided sources go element by element.
    """
    job = _job(jobs, row)
    like_src = _like(element)
    like_dst = np.empty(0, np.uint32)
    width, dst_width = like_src.itemsize, like_dst.itemsize
    side = LINE // width
    mode = job[J_MODE]
    r0, r1, c0, c1 = _tile_bounds(job, tile, 0)
    if r1 - r0 < side or c1 - c0 < side or job[J_SRC_COL] != width:
        _move_elements(job, r0, r1, c0, c1, like_src, like_dst)
        return
    scratch = np.empty(side * side, like_src.dtype)
    block = scratch.ctypes.data
    src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
    c_end = c0 + (c1 - c0) // side * side
    r_end = r0 + (r1 - r0) // side * side
    for c in range(c0, c_end, side):
        for r in range(r0, r_end, side):
            _transpose_block(job[J_SRC] + c * src_row + r * width, src_row, block, LINE, False, like_src)
            for i in range(side):
                out = _row(job[J_DST] + (r + i) * dst_row + c * dst_width, side, like_dst)
                for j in range(side):
                    out[j] = _convert(scratch[i * side + j], mode, like_dst)
    _move_elements(job, r0, r1, c_end, c1, like_src, like_dst)
    _move_elements(job, r_end, r1, c0, c_end, like_src, like_dst)


# ---------------------------------------------------------------------------------------------
# The parallel driver and the worker registry.


def _run_tiles(jobs, worker):  # type: ignore[no-untyped-def]
    """Run every tile of every job in one parallel loop, each through ``worker``.

    ``jobs``: int64 ``[n_parts, JOB_COLUMNS]``, C-contiguous, with ``J_TILE_END`` the running
    tile count. ``worker``: the address of a worker (:func:`worker`) for the jobs' widths.

    Timed by ``bench/report.py`` on whole large-v3 QKV (64 groups x 3 parts [1280, 1280], a
    2-core VM, ratio to ``np.copyto`` of the same bytes), the designs tried in turn: 16-byte
    blocks in 32 x 256 tiles with cached stores ran at
    2.6x (f32) / 3.1x (f16); whole-line blocks with cached stores 3.0x / 3.3x; whole-line blocks
    with non-temporal stores in 64 x 256 tiles 1.0-1.6x / 1.2x; the same in bands of whole
    rows about 0.75x / 1.0x (one thread: 1.45x / 1.75x).
    """
    n_tiles = jobs[-1, J_TILE_END] if jobs.shape[0] > 0 else 0
    tile_ends = jobs[:, J_TILE_END]
    base = jobs.ctypes.data
    for t in numba.prange(n_tiles):
        p = np.searchsorted(tile_ends, t, side="right")
        first = tile_ends[p - 1] if p > 0 else 0
        _call_worker(worker, base, p, t - first)


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

_WORKERS: dict[tuple[str, int], Any] = {}  # (kind, width) -> address (or function, without JIT)
_COMPILED: dict[tuple[str, int], Any] = {}  # (kind, width) -> numba CFunc
_WORKERS_LOCK = threading.Lock()
_UINTS = {1: types.uint8, 2: types.uint16, 4: types.uint32, 8: types.uint64}


def worker(mode: int, width: int) -> Any:
    """The worker for jobs of ``mode`` (copies, or any widening) whose source elements are
    ``width`` bytes, compiled (or loaded from numba's cache) on first use; its address, for
    :func:`run_tiles`."""
    kind = "copy" if mode == MODE_COPY else "widen"
    key = (kind, width)
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            function = _copy_tile if kind == "copy" else _widen_tile
            if numba.config.DISABLE_JIT:
                _WORKERS[key] = (function, np.empty(0, np.dtype(f"u{width}")))
            else:
                signature = types.void(types.intp, types.intp, types.intp, types.CPointer(_UINTS[width]))
                compiled = _compile(lambda cache: numba.cfunc(signature, cache=cache, error_model="numpy")(function))
                _COMPILED[key] = compiled
                _WORKERS[key] = compiled.address
        return _WORKERS[key]


def cache_hits() -> dict[str, int]:
    """How many kernels this process loaded from numba's cache (the rest, if any, it compiled)."""
    hits = {"driver": sum(run_tiles.stats.cache_hits.values()) if hasattr(run_tiles, "stats") else 0}
    with _WORKERS_LOCK:
        for (kind, width), compiled in _COMPILED.items():
            hits[f"{kind}-{width}"] = compiled.cache_hits
    return hits


def cache_location() -> str | None:
    """The folder numba caches the kernels in (None: caching is off, nowhere was writable).

    Read from numba's cache object (not a public API: any surprise there reads as None).
    """
    try:
        cache = run_tiles._cache
        return str(cache.cache_path) if type(cache).__name__ != "NullCache" else None
    except AttributeError:
        return None
