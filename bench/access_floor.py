"""The kernel walk's two halves against memcpy: ``python bench/access_floor.py [--dtype float16] [--shape v64-t64-c-p2]``.

For whisper large-v3's QKV (the ``scaling`` case: 64 groups of three 1280 x 1280 parts fused
into ``[1280, 3840]``), at each thread count: libc memcpy of the same bytes split over numba's
threads (the scaling baseline), the fastfuse kernel forced to one block shape (``--shape``,
default the band walk), and each half of that shape's walk alone, over the same tiles in the
same order (its prefetches included):

- *reads*: every block loaded and transposed into a scratch block in L1, nothing written out;
- *stores*: every destination line of the walk written (non-temporal, as the kernel does) from a
  scratch block in L1, nothing read from memory. The block holds varied nonzero bits: on the
  2-core EPYC VM, lines of zeros were written twice as fast as any other.

Ratios are to the memcpy of the same thread count. When one half alone takes about as long as
memcpy (read and write), the walk's access pattern, not its arithmetic, is the floor; the kernel
then sits between the larger half and the sum of both. ``docs/design.md`` quotes the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import cases
import numba
import numpy as np

from fastfuse.kernels import block_shape, job_table
from fastfuse.kernels.intrinsics import LINE, prefetch, store_fence, transpose_block

READS, STORES = 1, 2


@functools.cache
def half_walk(shape: job_table.Shape) -> Callable[..., None]:
    """The walk of ``shape`` (its order, vector, tile rows and prefetch, as the kernel's copy
    worker walks a tile), compiled: ``walk(sources, destinations, rows, cols, dst_row, half,
    like)`` runs half ``half`` (READS or STORES) over parts ``sources[p]`` (C-contiguous
    ``rows x cols``) into ``destinations[p]`` (rows ``dst_row`` bytes apart, line-aligned):
    tiles of ``tile_rows`` source rows in one ``prange``."""
    vector, tile_rows, columns_first, ahead = shape

    @numba.njit(parallel=True, nogil=True)
    def walk(sources, destinations, rows, cols, dst_row, half, like):  # type: ignore[no-untyped-def]
        width = like.itemsize
        side = LINE // width
        step = vector // width
        tiles = (rows + tile_rows - 1) // tile_rows
        for t in numba.prange(sources.size * tiles):
            scratch = np.empty(side * step, like.dtype)
            for k in range(scratch.size):  # nonzero and varied: lines of zeros are written faster
                scratch[k] = (k + 1) * 2654435761
            block = scratch.ctypes.data
            src, dst = sources[t // tiles], destinations[t // tiles]
            c0 = (t % tiles) * tile_rows
            bands = (min(rows, c0 + tile_rows) - c0) // side
            columns = cols // step
            for k in range(bands * columns):
                band, column = (k % bands, k // bands) if columns_first else (k // columns, k % columns)
                c, r = c0 + band * side, column * step
                last = (r + (ahead + 1) * step) * width - 1  # as the kernel: the line `ahead` columns on
                if half == READS and ahead > 0 and last < cols * width and (src + last) % LINE < vector:
                    for i in range(side):
                        prefetch(src + (c + i) * cols * width + last)
                if half == READS:
                    transpose_block(src + (c * cols + r) * width, cols * width, block, LINE, False, like, vector)
                else:
                    transpose_block(block, 0, dst + r * dst_row + c * width, dst_row, True, like, vector)
            store_fence()

    return walk  # type: ignore[no-any-return]


def part_addresses(qkv: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The addresses of every part of ``qkv`` (``[groups, 3, d, d]``) and of where it goes in
    ``out`` (``[groups, d, 3d]``: part ``j`` at column ``j * d``), for :func:`half_walk`."""
    groups, parts, d, _ = qkv.shape
    pairs = [
        (qkv[g, j].ctypes.data, out[g].ctypes.data + j * d * out.itemsize) for g in range(groups) for j in range(parts)
    ]
    sources, destinations = np.array(pairs, np.int64).T.copy()
    return sources, destinations


def _best(fn: Callable[[], Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(
    dtype: str,
    threads: list[int],
    size: str,
    rounds: int,
    shape: job_table.Shape = job_table.DEFAULT_SHAPE,
    prefetch: int | None = None,
) -> str:
    """The table for ``shape``'s walk (the kernel forced to the same shape meanwhile); the
    halves prefetch ``prefetch`` columns ahead instead of the shape's own, when given."""
    before = os.environ.get(block_shape.FORCE_VARIABLE)
    os.environ[block_shape.FORCE_VARIABLE] = shape.name()
    try:
        ahead = shape.prefetch if prefetch is None else prefetch
        return _table(dtype, threads, size, rounds, shape, shape._replace(prefetch=ahead))
    finally:
        if before is None:
            del os.environ[block_shape.FORCE_VARIABLE]
        else:
            os.environ[block_shape.FORCE_VARIABLE] = before


def _table(
    dtype: str, threads: list[int], size: str, rounds: int, shape: job_table.Shape, halves: job_table.Shape
) -> str:
    walk = half_walk(halves)
    qkv = cases.qkv_arrays(size, dtype)  # [groups, 3, d, d]
    out, fuse = cases._fastfuse(qkv, qkv.dtype)  # line-aligned [groups][d, 3d]
    d = qkv.shape[2]
    like = np.empty(0, f"u{qkv.dtype.itemsize}")
    width = qkv.dtype.itemsize
    sources, destinations = part_addresses(qkv, out)
    lines = [
        f"{size} QKV, {dtype}, {qkv.nbytes / 1e6:.0f} MB, kernel {shape.name()}, halves {halves.name()};"
        + f" min of {rounds}; ratios to memcpy of the same thread count",
        "",
        "| threads | memcpy | kernel | reads alone | stores alone |",
        "|---|---|---|---|---|",
    ]
    for n in threads:
        numba.set_num_threads(n)
        times = {
            "memcpy": cases._copy(out, qkv, parallel=True),
            "kernel": fuse,
            "reads": lambda: walk(sources, destinations, d, d, 3 * d * width, READS, like),
            "stores": lambda: walk(sources, destinations, d, d, 3 * d * width, STORES, like),
        }
        for fn in times.values():  # warm: compiled, pages touched
            fn()
        seconds = {name: _best(fn, rounds) for name, fn in times.items()}
        m = seconds["memcpy"]
        lines.append(
            f"| {n} | {m * 1e3:.1f} ms | "
            + " | ".join(f"{seconds[k] / m:.2f}x" for k in ("kernel", "reads", "stores"))
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=cases.DTYPES)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (at most the host's CPUs)")
    parser.add_argument("--size", default="large-v3")
    parser.add_argument("--rounds", type=int, default=5)
    names = {shape.name(): shape for shape in job_table.SHAPES}
    parser.add_argument(
        "--shape", default=job_table.DEFAULT_SHAPE.name(), choices=names, help="the walk (a block shape)"
    )
    parser.add_argument("--prefetch", type=int, help="columns ahead the halves prefetch (default: the shape's)")
    args = parser.parse_args()
    counts = [n for n in map(int, args.threads.split(",")) if n <= numba.config.NUMBA_NUM_THREADS]
    print(main(args.dtype, counts, args.size, args.rounds, names[args.shape], args.prefetch))
