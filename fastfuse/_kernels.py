"""Numba kernels: move bits from parts to a fused buffer, in parallel, one pass.

This module knows arrays of unsigned integers and byte addresses, nothing else: no key names,
no dtypes beyond element width, no I/O, no allocation of results. All validation happens in
``fastfuse.core`` before a kernel runs; a kernel trusts its job table.

A *job table* has one int64 row per part (see the ``J_*`` column indices). Part ``p`` is a
strided 2-D source ``S[c, r]`` (``c < rows``, ``r < cols``) written transposed into a
destination whose row ``r`` starts at ``dst + r * dst_row_stride`` and holds ``S[0..rows, r]``
as consecutive elements. The tile grid of every part of every group is one ``prange``, so small
parts never serialize and a whole checkpoint is one parallel region. When ``S[0..rows, r]`` is
itself contiguous (a Fortran-ordered part, or the rows of an ``out_in`` layout) the job is
tiled in destination rows instead (``J_TILING == TILING_ROWS``) and each row is one memcpy.

How a tile moves (measured on whole large-v3, see ``transpose_parts``): a tile is a band of
``TILE_ROWS`` source rows, normally whole rows wide. It is cut into blocks of ``B x B``
elements with ``B * itemsize == 64`` bytes, one cache line per block row: ``B`` source lines are
loaded, transposed in vector registers (``log2(B)`` rounds of two-input shuffles) and written as
``B`` whole destination lines. Walking a band left to right reads ``B`` sequential streams (the
hardware prefetcher's best case) and writes every destination line exactly once, whole, so the
stores are non-temporal: no read-for-ownership of the destination, no cache pollution. The
block grid is shifted per part so those stores are 64-byte aligned; the few rows and columns
outside the grid, strided sources and widening conversions go element by element.

Importing this module imports numba (about 0.2 s); ``fastfuse`` imports it only when a kernel
is needed. Compiled code is cached on disk (``cache=True``): see the README for
``NUMBA_CACHE_DIR``. With ``NUMBA_DISABLE_JIT=1`` the intrinsics are replaced by slow
pure-Python equivalents (ctypes on the same addresses), so the tile logic stays testable.
"""

from __future__ import annotations

import ctypes
import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Job table columns.
J_SRC, J_SRC_ROW, J_SRC_COL, J_ROWS, J_COLS, J_DST, J_DST_ROW, J_TILING, J_TILE_END = range(9)
JOB_COLUMNS = 9
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
# rows give enough tiles to balance threads (20 per 1280-row part). Sweep: see transpose_parts.
TILE_ROWS = 64
TILE_COLS = 8192

# The one place numba options are set: we move bits, so no fastmath; error_model numpy avoids
# division checks in the tile arithmetic.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_parallel_jit = numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")


def tiling(src_row: int, src_col: int, width: int, mode: int) -> int:
    """How to tile a source with these byte strides: row copies when ``S[:, r]`` is contiguous."""
    return TILING_ROWS if mode == MODE_COPY and src_row == width and src_col != width else TILING_BLOCKS


def tile_count(rows: int, cols: int, tiling: int = TILING_BLOCKS) -> int:
    """Tiles :func:`transpose_parts` cuts a ``rows x cols`` source into (for ``J_TILE_END``)."""
    if tiling == TILING_ROWS:
        return -(-cols // ROWS_PER_TILE) if rows else 0
    return -(-rows // TILE_ROWS) * -(-cols // TILE_COLS)


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


def _block_intrinsic(streaming: bool):  # type: ignore[no-untyped-def]
    """Build the block transpose; ``streaming`` stores are aligned and non-temporal."""

    def transpose_block(typingctx, src, src_stride, dst, dst_stride, like):  # type: ignore[no-untyped-def]
        sig = types.void(types.intp, types.intp, types.intp, types.intp, like)
        bits = like.dtype.bitwidth
        side = LINE * 8 // bits

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            src_addr, src_step, dst_addr, dst_step, _ = args
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
            for row, pointer in zip(rows, row_pointers(dst_addr, dst_step)):
                store = builder.store(row, pointer, align=LINE if streaming else 1)
                if streaming:
                    store.set_metadata("nontemporal", nontemporal)
            return context.get_dummy_value()

        return sig, codegen

    transpose_block.__name__ = "_transpose_block_stream" if streaming else "_transpose_block"
    transpose_block.__doc__ = (
        "Transpose one ``B x B`` block, ``B = 64 // itemsize``, through vector registers.\n\n"
        "Loads ``B`` rows of 64 bytes from ``src + i * src_stride``, transposes them with\n"
        "``log2(B)`` rounds of interleaves, stores ``B`` rows to ``dst + i * dst_stride``.\n"
        "Addresses and strides are in bytes. The streaming variant needs 64-byte aligned\n"
        "destination rows and bypasses the cache (finish with ``_store_fence``)."
    )
    return intrinsic(transpose_block)


_transpose_block = _block_intrinsic(streaming=False)
_transpose_block_stream = _block_intrinsic(streaming=True)


@intrinsic
def _pointer(typingctx, address, like):  # type: ignore[no-untyped-def]
    """A typed pointer to ``like``'s element type at a byte address (for ``numba.carray``)."""
    sig = types.CPointer(like.dtype)(types.intp, like)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(like.dtype).as_pointer())

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


@_jit
def _row(address, count, like):  # type: ignore[no-untyped-def]
    """``count`` elements of ``like``'s type at a byte address, as an array (vectorizable loops)."""
    return numba.carray(_pointer(address, like), count)


if numba.config.DISABLE_JIT:  # pragma: no cover - exercised by the NUMBA_DISABLE_JIT test run
    # Intrinsics only exist in compiled code; these do the same on the same addresses.

    def _view(address, dtype, count):  # type: ignore[no-untyped-def]
        buffer = (ctypes.c_char * (int(count) * dtype.itemsize)).from_address(int(address))
        return np.frombuffer(buffer, dtype)

    def _load(address, like):  # type: ignore[no-redef,no-untyped-def]
        return _view(address, like.dtype, 1)[0]

    def _store(address, value):  # type: ignore[no-redef,no-untyped-def]
        _view(address, value.dtype, 1)[0] = value

    def _transpose_block(src, src_stride, dst, dst_stride, like):  # type: ignore[no-redef,no-untyped-def]
        side = LINE // like.itemsize
        block = [_view(src + i * src_stride, like.dtype, side).copy() for i in range(side)]
        for i in range(side):
            _view(dst + i * dst_stride, like.dtype, side)[:] = [row[i] for row in block]

    def _transpose_block_stream(src, src_stride, dst, dst_stride, like):  # type: ignore[no-redef,no-untyped-def]
        assert dst % LINE == 0 and dst_stride % LINE == 0, "streaming stores need aligned rows"
        _transpose_block(src, src_stride, dst, dst_stride, like)

    def _store_fence():  # type: ignore[no-redef,no-untyped-def]
        pass

    def _copy_bytes(dst, src, count):  # type: ignore[no-redef,no-untyped-def]
        ctypes.memmove(int(dst), int(src), int(count))

    def _row(address, count, like):  # type: ignore[no-redef,no-untyped-def]
        return _view(address, like.dtype, count)

    def _f32_bits(value):  # type: ignore[no-redef,no-untyped-def]
        return np.float32(value).view(np.uint32)


@_jit
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


@_jit
def _move_elements(job, r_lo, r_hi, c_lo, c_hi, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """Element by element: the fallback for block-grid edges, strided sources and conversions."""
    dst_width = like_dst.itemsize
    for r in range(r_lo, r_hi):
        src = job[J_SRC] + r * job[J_SRC_COL] + c_lo * job[J_SRC_ROW]
        dst = job[J_DST] + r * job[J_DST_ROW] + c_lo * dst_width
        for _ in range(c_lo, c_hi):
            _store(dst, _convert(_load(src, like_src), mode, like_dst))
            src += job[J_SRC_ROW]
            dst += dst_width


@_jit
def _grid_shift(address, stride, width):  # type: ignore[no-untyped-def]
    """Elements to skip so ``address + k * width`` is line-aligned on every row (-1: never)."""
    misalignment = -address % LINE
    if stride % LINE != 0 or misalignment % width != 0:
        return -1
    return misalignment // width


@_jit
def _tile_span(index, count, tile, shift, size):  # type: ignore[no-untyped-def]
    """Bounds of tile ``index`` of ``count`` over ``0..size`` with inner edges at ``shift + k*tile``.

    The first tile absorbs the ``shift`` elements before the block grid, the last one whatever is
    left, so the tile count does not depend on the shift.
    """
    lo = 0 if index == 0 else min(size, index * tile + shift)
    hi = size if index == count - 1 else min(size, (index + 1) * tile + shift)
    return lo, hi


@_jit
def _move_band(job, c, r0, r1, streaming, like):  # type: ignore[no-untyped-def]
    """Blocks for source rows ``c..c+B`` and columns ``r0..r1`` (``r1 - r0 >= B``), left to right.

    ``B`` sequential read streams; each block writes ``B`` whole destination lines. A ragged
    right edge is one more block ending at ``r1``, overlapping its neighbour (same bits twice).
    """
    width = like.itemsize
    side = LINE // width
    src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
    src = job[J_SRC] + c * src_row + r0 * width
    dst = job[J_DST] + r0 * dst_row + c * width
    r_full = r0 + (r1 - r0) // side * side
    if streaming:
        for _ in range(r0, r_full, side):
            _transpose_block_stream(src, src_row, dst, dst_row, like)
            src += LINE
            dst += side * dst_row
    else:
        for _ in range(r0, r_full, side):
            _transpose_block(src, src_row, dst, dst_row, like)
            src += LINE
            dst += side * dst_row
    if r_full < r1:
        src = job[J_SRC] + c * src_row + (r1 - side) * width
        dst = job[J_DST] + (r1 - side) * dst_row + c * width
        if streaming:
            _transpose_block_stream(src, src_row, dst, dst_row, like)
        else:
            _transpose_block(src, src_row, dst, dst_row, like)


@_jit
def _copy_rows(job, tile, width):  # type: ignore[no-untyped-def]
    """Destination rows ``ROWS_PER_TILE * tile ...``: each a contiguous run of the source."""
    r0 = tile * ROWS_PER_TILE
    r1 = min(r0 + ROWS_PER_TILE, job[J_COLS])
    count = job[J_ROWS] * width
    for r in range(r0, r1):
        _copy_bytes(job[J_DST] + r * job[J_DST_ROW], job[J_SRC] + r * job[J_SRC_COL], count)


@_jit
def _widen_tile(job, r0, r1, c0, c1, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """A converting tile: line blocks transposed into a scratch block, then widened row by row.

    The scratch block keeps the source reads sequential (as for copies) and turns the
    conversion into contiguous rows the compiler vectorizes. Ragged edges go element by element.
    """
    width, dst_width = like_src.itemsize, like_dst.itemsize
    side = LINE // width
    scratch = np.empty(side * side, like_src.dtype)
    block = scratch.ctypes.data
    src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
    c_end = c0 + (c1 - c0) // side * side
    r_end = r0 + (r1 - r0) // side * side
    for c in range(c0, c_end, side):
        for r in range(r0, r_end, side):
            _transpose_block(job[J_SRC] + c * src_row + r * width, src_row, block, LINE, like_src)
            for i in range(side):
                out = _row(job[J_DST] + (r + i) * dst_row + c * dst_width, side, like_dst)
                for j in range(side):
                    out[j] = _convert(scratch[i * side + j], mode, like_dst)
    _move_elements(job, r0, r1, c_end, c1, mode, like_src, like_dst)
    _move_elements(job, r_end, r1, c0, c_end, mode, like_src, like_dst)


@_jit
def _move_tile(job, tile, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """Tile ``tile`` of ``job``: bands of line blocks, or elements if too small or converting."""
    width = like_src.itemsize
    rows, cols = job[J_ROWS], job[J_COLS]
    tiles_down = (rows + TILE_ROWS - 1) // TILE_ROWS
    tiles_across = (cols + TILE_COLS - 1) // TILE_COLS
    tile_r, tile_c = tile // tiles_down, tile % tiles_down
    side = LINE // width
    blocks = mode == MODE_COPY and job[J_SRC_COL] == width
    # Shift the band grid along c so block rows land on destination line boundaries (aligned
    # streaming stores). Aligning source loads too (a shift along r) did not pay.
    c_shift = _grid_shift(job[J_DST], job[J_DST_ROW], width) if blocks else -1
    r0, r1 = _tile_span(tile_r, tiles_across, TILE_COLS, 0, cols)
    c0, c1 = _tile_span(tile_c, tiles_down, TILE_ROWS, max(c_shift, 0), rows)
    if r1 - r0 < side or c1 - c0 < side or job[J_SRC_COL] != width:
        _move_elements(job, r0, r1, c0, c1, mode, like_src, like_dst)
        return
    if not blocks:  # a conversion
        _widen_tile(job, r0, r1, c0, c1, mode, like_src, like_dst)
        return
    streaming = c_shift >= 0
    c_grid = min(c1, c_shift) if streaming and tile_c == 0 else c0
    c_end = c_grid + (c1 - c_grid) // side * side
    # Rows before the grid (less than one destination line per output row) go element by
    # element: a cached block there would share lines with the streaming stores, and a line
    # written both ways costs a flush (f16 in-cache rate halved). Rows after it likewise when
    # streaming; otherwise one cached band overlapping the grid (same bits written twice).
    _move_elements(job, r0, r1, c0, c_grid, mode, like_src, like_dst)
    for c in range(c_grid, c_end, side):
        _move_band(job, c, r0, r1, streaming, like_src)
    if c_end < c1:
        if streaming:
            _move_elements(job, r0, r1, c_end, c1, mode, like_src, like_dst)
        else:
            _move_band(job, c1 - side, r0, r1, False, like_src)
    if streaming:
        _store_fence()


@_parallel_jit
def transpose_parts(jobs, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """Run every tile of every job in one parallel loop.

    ``jobs``: int64 ``[n_parts, JOB_COLUMNS]`` with ``J_TILE_END`` the running tile count.
    ``like_src`` / ``like_dst``: any arrays of the source / destination element type (their
    data is never touched; they select the specialisation: uint8/16/32/64).

    Measured on whole large-v3 QKV (64 groups x 3 parts [1280, 1280], 2 cores, ratio to
    ``np.copyto`` of the same bytes): 16-byte blocks in 32 x 256 tiles with cached stores ran at
    2.6x (f32) / 3.1x (f16); whole-line blocks with cached stores 3.0x / 3.3x; whole-line blocks
    with non-temporal stores in 64 x 256 tiles 1.0-1.6x / 1.2x; the same in bands of whole
    rows about 0.75x / 1.0x (one thread: 1.45x / 1.75x).
    """
    n_tiles = jobs[-1, J_TILE_END] if jobs.shape[0] > 0 else 0
    tile_ends = jobs[:, J_TILE_END]
    for t in numba.prange(n_tiles):
        p = np.searchsorted(tile_ends, t, side="right")
        first = tile_ends[p - 1] if p > 0 else 0
        if jobs[p, J_TILING] == TILING_ROWS:
            _copy_rows(jobs[p], t - first, like_src.itemsize)
        else:
            _move_tile(jobs[p], t - first, mode, like_src, like_dst)
