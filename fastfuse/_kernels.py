"""Numba kernels: move bits from parts to a fused buffer, in parallel, one pass.

This module knows arrays of unsigned integers and byte addresses, nothing else: no key names,
no dtypes beyond element width, no I/O, no allocation of results. All validation happens in
``fastfuse.core`` before a kernel runs; a kernel trusts its job table.

A *job table* has one int64 row per part (see the ``J_*`` column indices). Part ``p`` is a
strided 2-D source ``S[c, r]`` (``c < rows``, ``r < cols``) written transposed into a
destination whose row ``r`` starts at ``dst + r * dst_row_stride`` and holds ``S[0..rows, r]``
as consecutive elements. The tile grid of every part of every group is one ``prange``, so small
parts never serialize and a whole checkpoint is one parallel region.

Importing this module imports numba (about 0.2 s); ``fastfuse`` imports it only when a kernel
is needed. Compiled code is cached on disk (``cache=True``): see the README for
``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Job table columns.
J_SRC, J_SRC_ROW, J_SRC_COL, J_ROWS, J_COLS, J_DST, J_DST_ROW, J_TILE_END = range(8)
JOB_COLUMNS = 8

# Conversion modes: the destination element from the source element's bits.
MODE_COPY, MODE_F16_TO_F32, MODE_BF16_TO_F32 = 0, 1, 2

# Tile shape in elements: TILE_ROWS source rows (output columns) by TILE_COLS source columns
# (output rows). Chosen by the sweep in bench/ (see README): tall enough that every output row
# receives whole cache lines, narrow enough that source and destination lines stay in L1.
TILE_ROWS = 32
TILE_COLS = 256

# The one place numba options are set: we move bits, so no fastmath; error_model numpy avoids
# division checks in the tile arithmetic.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_parallel_jit = numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")


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


def tile_count(rows: int, cols: int) -> int:
    """Tiles :func:`transpose_parts` cuts a ``rows x cols`` source into (for ``J_TILE_END``)."""
    return -(-rows // TILE_ROWS) * -(-cols // TILE_COLS)


@intrinsic
def _transpose_block(typingctx, src, src_stride, dst, dst_stride, like):  # type: ignore[no-untyped-def]
    """Transpose one ``B x B`` block, ``B = 16 // itemsize``, through vector registers.

    Loads ``B`` rows of 16 bytes from ``src + i * src_stride``, transposes them with
    ``log2(B)`` rounds of interleaves, stores ``B`` rows to ``dst + i * dst_stride``.
    Addresses and strides are in bytes; nothing needs alignment. Any element width that divides
    16 bytes works the same way, which is what makes f32, f16, bf16 and int8 one kernel.
    """
    sig = types.void(types.intp, types.intp, types.intp, types.intp, like)
    bits = like.dtype.bitwidth
    side = 128 // bits

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        src_addr, src_step, dst_addr, dst_step, _ = args
        vector_ptr = ir.VectorType(ir.IntType(bits), side).as_pointer()
        mask_type = ir.VectorType(ir.IntType(32), side)
        half = side // 2
        low = ir.Constant(mask_type, [v for k in range(half) for v in (k, k + side)])
        high = ir.Constant(mask_type, [v for k in range(half, side) for v in (k, k + side)])

        def row_pointer(base, step, i):  # type: ignore[no-untyped-def]
            offset = builder.mul(step, ir.Constant(step.type, i))
            return builder.inttoptr(builder.add(base, offset), vector_ptr)

        rows = [builder.load(row_pointer(src_addr, src_step, i), align=1) for i in range(side)]
        for _ in range(side.bit_length() - 1):
            interleaved = []
            for i in range(half):
                a, b = rows[i], rows[i + half]
                interleaved.append(builder.shuffle_vector(a, b, low))
                interleaved.append(builder.shuffle_vector(a, b, high))
            rows = interleaved
        for i, row in enumerate(rows):
            builder.store(row, row_pointer(dst_addr, dst_step, i), align=1)
        return context.get_dummy_value()

    return sig, codegen


@_jit
def _f16_bits_to_f32_bits(h):  # type: ignore[no-untyped-def]
    """Exact IEEE half -> single on bit patterns; NaN payloads are kept (shifted), not quieted."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    magnitude = h & np.uint32(0x7FFF)
    if magnitude >= np.uint32(0x7C00):  # inf / NaN
        return sign | np.uint32(0x7F800000) | ((magnitude & np.uint32(0x3FF)) << np.uint32(13))
    if magnitude >= np.uint32(0x0400):  # normal: rebias the exponent 15 -> 127
        return sign | ((magnitude << np.uint32(13)) + np.uint32(112 << 23))
    if magnitude == np.uint32(0):
        return sign
    exponent = np.uint32(113)  # subnormal: normalize the mantissa
    while magnitude < np.uint32(0x0400):
        magnitude <<= np.uint32(1)
        exponent -= np.uint32(1)
    return sign | (exponent << np.uint32(23)) | ((magnitude & np.uint32(0x3FF)) << np.uint32(13))


@_jit
def _convert(bits, mode, like_dst):  # type: ignore[no-untyped-def]
    """The destination element for one source element, by conversion mode."""
    if mode == MODE_F16_TO_F32:
        return like_dst.dtype.type(_f16_bits_to_f32_bits(bits))
    if mode == MODE_BF16_TO_F32:
        return like_dst.dtype.type(np.uint32(bits) << np.uint32(16))
    return like_dst.dtype.type(bits)


@_jit
def _move_elements(job, r_lo, r_hi, c_lo, c_hi, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """Element by element: the fallback for tile edges, strided sources and conversions."""
    dst_width = like_dst.itemsize
    for r in range(r_lo, r_hi):
        src = job[J_SRC] + r * job[J_SRC_COL] + c_lo * job[J_SRC_ROW]
        dst = job[J_DST] + r * job[J_DST_ROW] + c_lo * dst_width
        for _ in range(c_lo, c_hi):
            _store(dst, _convert(_load(src, like_src), mode, like_dst))
            src += job[J_SRC_ROW]
            dst += dst_width


@_jit
def _move_tile(job, r0, r1, c0, c1, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """One tile: vector blocks where they fit, elements for the ragged edges."""
    width = like_src.itemsize
    if mode != MODE_COPY or job[J_SRC_COL] != width:
        _move_elements(job, r0, r1, c0, c1, mode, like_src, like_dst)
        return
    side = 16 // width
    r_full = r0 + (r1 - r0) // side * side
    c_full = c0 + (c1 - c0) // side * side
    src_row, dst_row = job[J_SRC_ROW], job[J_DST_ROW]
    for r in range(r0, r_full, side):
        src = job[J_SRC] + r * width + c0 * src_row
        dst = job[J_DST] + r * dst_row + c0 * width
        for _ in range(c0, c_full, side):
            _transpose_block(src, src_row, dst, dst_row, like_src)
            src += side * src_row
            dst += side * width
    _move_elements(job, r0, r_full, c_full, c1, mode, like_src, like_dst)
    _move_elements(job, r_full, r1, c0, c1, mode, like_src, like_dst)


@_parallel_jit
def transpose_parts(jobs, mode, like_src, like_dst):  # type: ignore[no-untyped-def]
    """Run every tile of every job in one parallel loop.

    ``jobs``: int64 ``[n_parts, JOB_COLUMNS]`` with ``J_TILE_END`` the running tile count.
    ``like_src`` / ``like_dst``: any arrays of the source / destination element type (their
    data is never touched; they select the specialisation: uint8/16/32/64).
    """
    n_tiles = jobs[-1, J_TILE_END] if jobs.shape[0] > 0 else 0
    tile_ends = jobs[:, J_TILE_END]
    for t in numba.prange(n_tiles):
        p = np.searchsorted(tile_ends, t, side="right")
        job = jobs[p]
        first = tile_ends[p - 1] if p > 0 else 0
        tiles_across = (job[J_ROWS] + TILE_ROWS - 1) // TILE_ROWS
        tile_r, tile_c = divmod(t - first, tiles_across)
        r0 = tile_r * TILE_COLS
        c0 = tile_c * TILE_ROWS
        r1 = min(r0 + TILE_COLS, job[J_COLS])
        c1 = min(c0 + TILE_ROWS, job[J_ROWS])
        _move_tile(job, r0, r1, c0, c1, mode, like_src, like_dst)
