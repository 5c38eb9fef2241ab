"""LLVM intrinsics for the kernels: single instructions on byte addresses, and the block transpose.

Numba cannot express unaligned typed loads and stores at a byte address, non-temporal stores,
vector shuffles or an indirect call; these emit them directly. With ``NUMBA_DISABLE_JIT=1`` they
are replaced by slow pure-Python equivalents (ctypes on the same addresses), so the kernels'
logic stays testable without compiling.
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

__all__ = [
    "LINE",
    "VECTORS",
    "call_worker",
    "copy_bytes",
    "f32_bits",
    "job_pointer",
    "load_at",
    "prefetch",
    "store_at",
    "store_fence",
    "stream_lines",
    "transpose_block",
]

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

# Bytes per block row: one cache line, one AVX-512 register (LLVM splits it into two or four
# registers on older CPUs; the result is the same bits).
LINE = 64


@intrinsic
def load_at(typingctx, address, like):  # type: ignore[no-untyped-def]
    """Load one element of ``like``'s dtype from a byte address (no alignment assumed)."""
    sig = like.dtype(types.intp, like)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        pointer_type = context.get_value_type(like.dtype).as_pointer()
        return builder.load(builder.inttoptr(args[0], pointer_type), align=1)

    return sig, codegen


@intrinsic
def store_at(typingctx, address, value):  # type: ignore[no-untyped-def]
    """Store ``value`` at a byte address (no alignment assumed)."""
    sig = types.void(types.intp, value)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        pointer_type = context.get_value_type(value).as_pointer()
        builder.store(args[1], builder.inttoptr(args[0], pointer_type), align=1)
        return context.get_dummy_value()

    return sig, codegen


# Bytes a block's vectors may hold (``transpose_block``'s ``vector``): a whole line, or a half
# or quarter of one (the shape a CPU moves fastest, chosen by measurement: ``block_shape``).
VECTORS = (64, 32, 16)


@intrinsic
def transpose_block(typingctx, src, src_stride, dst, dst_stride, streaming, like, vector):  # type: ignore[no-untyped-def]
    """Transpose one block of ``B`` source rows by ``S`` columns, ``B = 64 // itemsize``,
    ``S = vector // itemsize`` (``vector``: a literal of :data:`VECTORS`), through registers.

    Loads ``B`` vectors of ``vector`` bytes from ``src + i * src_stride``, transposes each of
    the ``B / S`` stacked ``S x S`` squares with ``log2(S)`` rounds of interleaves, and stores
    ``S`` whole 64-byte rows (the squares' rows side by side) to ``dst + i * dst_stride``.
    Addresses and strides are in bytes. ``streaming`` stores need 64-byte aligned destination
    rows and bypass the cache (finish with ``store_fence``). One shuffle network serves both
    kinds of store: the block is the bulk of a worker's compile time. The bits written do not
    depend on ``vector``; the instructions (and their speed on a given CPU) do.
    """
    if not isinstance(vector, types.IntegerLiteral) or vector.literal_value not in VECTORS:
        return None
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.boolean, like, vector)
    bits = like.dtype.bitwidth
    side = LINE * 8 // bits
    square = vector.literal_value * 8 // bits

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        src_addr, src_step, dst_addr, dst_step, stream = args[:5]
        element = ir.IntType(bits)
        mask_type = ir.VectorType(ir.IntType(32), square)
        half = square // 2
        low = ir.Constant(mask_type, [v for k in range(half) for v in (k, k + square)])
        high = ir.Constant(mask_type, [v for k in range(half, square) for v in (k, k + square)])

        def addresses(base, step, count):  # type: ignore[no-untyped-def]
            found, address = [], base
            for _ in range(count):
                found.append(address)
                address = builder.add(address, step)
            return found

        def pointer(address, lanes):  # type: ignore[no-untyped-def]
            return builder.inttoptr(address, ir.VectorType(element, lanes).as_pointer())

        vectors = [builder.load(pointer(a, square), align=1) for a in addresses(src_addr, src_step, side)]
        squares = []
        for first in range(0, side, square):
            rows = vectors[first : first + square]
            # log2(S) rounds of interleaving rows i and i + S/2. (Swapping index bits inside
            # 64-bit lanes with shifts and masks instead needs fewer shuffle-port uops but was
            # no faster here: the kernel waits on memory, not on shuffles.)
            for _ in range(square.bit_length() - 1):
                interleaved = []
                for i in range(half):
                    a, b = rows[i], rows[i + half]
                    interleaved.append(builder.shuffle_vector(a, b, low))
                    interleaved.append(builder.shuffle_vector(a, b, high))
                rows = interleaved
            squares.append(rows)
        lines = []
        for t in range(square):
            pieces = [rows[t] for rows in squares]
            while len(pieces) > 1:  # side by side, a line of B elements
                lanes = pieces[0].type.count
                both = ir.Constant(ir.VectorType(ir.IntType(32), 2 * lanes), list(range(2 * lanes)))
                pieces = [builder.shuffle_vector(a, b, both) for a, b in zip(pieces[::2], pieces[1::2])]
            lines.append(pieces[0])
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        if stream.type != ir.IntType(1):
            stream = builder.icmp_unsigned("!=", stream, ir.Constant(stream.type, 0))
        targets = addresses(dst_addr, dst_step, square)
        with builder.if_else(stream) as (then, otherwise):
            with then:
                for line, address in zip(lines, targets):
                    builder.store(line, pointer(address, side), align=LINE).set_metadata("nontemporal", nontemporal)
            with otherwise:
                for line, address in zip(lines, targets):
                    builder.store(line, pointer(address, side), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def stream_lines(typingctx, dst, src, count):  # type: ignore[no-untyped-def]
    """Copy ``count`` 64-byte lines from ``src`` (any alignment) to ``dst`` (64-byte aligned)
    with non-temporal stores (finish with ``store_fence``)."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        dst_addr, src_addr, lines = args
        line_ptr = ir.VectorType(ir.IntType(64), LINE // 8).as_pointer()
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, lines) as loop:
            offset = builder.mul(loop.index, ir.Constant(lines.type, LINE))
            value = builder.load(builder.inttoptr(builder.add(src_addr, offset), line_ptr), align=1)
            target = builder.inttoptr(builder.add(dst_addr, offset), line_ptr)
            builder.store(value, target, align=LINE).set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, address):  # type: ignore[no-untyped-def]
    """Ask for the line holding a byte address to be brought into L1 (``prefetcht0``): a hint,
    never a fault, whatever the address; it changes no bits, only when a load finds its line."""
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        byte_ptr, word = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [byte_ptr, word, word, word])
        function = builder.module.declare_intrinsic("llvm.prefetch", fnty=fn_type)
        read, keep_in_l1, data = (ir.Constant(word, v) for v in (0, 3, 1))
        builder.call(function, [builder.inttoptr(args[0], byte_ptr), read, keep_in_l1, data])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def job_pointer(typingctx, address):  # type: ignore[no-untyped-def]
    """The job table row at a byte address, as an int64 pointer."""
    sig = types.CPointer(types.int64)(types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], ir.IntType(64).as_pointer())

    return sig, codegen


@intrinsic
def f32_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The uint32 bit pattern of a float32 (a bitcast, no conversion)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def copy_bytes(typingctx, dst, src, count):  # type: ignore[no-untyped-def]
    """``memcpy(dst, src, count)`` on byte addresses (the ranges never overlap)."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        byte_ptr = ir.IntType(8).as_pointer()
        dst_ptr, src_ptr = (builder.inttoptr(a, byte_ptr) for a in args[:2])
        cgutils.raw_memcpy(builder, dst_ptr, src_ptr, args[2], 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):  # type: ignore[no-untyped-def]
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
def call_worker(typingctx, worker, jobs, row, tile):  # type: ignore[no-untyped-def]
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


if numba.config.DISABLE_JIT:  # pragma: no cover - exercised by the NUMBA_DISABLE_JIT test run
    # Intrinsics only exist in compiled code; these do the same on the same addresses.
    def view(address, dtype, count):  # type: ignore[no-untyped-def]
        buffer = (ctypes.c_char * (int(count) * dtype.itemsize)).from_address(int(address))
        return np.frombuffer(buffer, dtype)

    def load_at(address, like):  # type: ignore[no-redef,no-untyped-def]
        return view(address, like.dtype, 1)[0]

    def store_at(address, value):  # type: ignore[no-redef,no-untyped-def]
        view(address, value.dtype, 1)[0] = value

    def transpose_block(src, src_stride, dst, dst_stride, streaming, like, vector):  # type: ignore[no-redef,no-untyped-def]
        assert not streaming or (dst % LINE == 0 and dst_stride % LINE == 0), "streaming stores need aligned rows"
        side, square = LINE // like.itemsize, vector // like.itemsize
        block = [view(src + i * src_stride, like.dtype, square).copy() for i in range(side)]
        for i in range(square):
            view(dst + i * dst_stride, like.dtype, side)[:] = [row[i] for row in block]

    def store_fence():  # type: ignore[no-redef,no-untyped-def]
        pass

    def prefetch(address):  # type: ignore[no-redef,no-untyped-def]
        pass

    def stream_lines(dst, src, count):  # type: ignore[no-redef,no-untyped-def]
        assert dst % LINE == 0, "streaming stores need aligned lines"
        ctypes.memmove(int(dst), int(src), int(count) * LINE)

    def copy_bytes(dst, src, count):  # type: ignore[no-redef,no-untyped-def]
        ctypes.memmove(int(dst), int(src), int(count))

    def f32_bits(value):  # type: ignore[no-redef,no-untyped-def]
        return np.float32(value).view(np.uint32)

    def call_worker(worker, jobs, row, tile):  # type: ignore[no-redef,no-untyped-def]
        function, element = worker
        function(jobs, row, tile, element)
