"""The kernel logic under NUMBA_DISABLE_JIT=1: tiles, block grids, edges and row copies run as
Python (the intrinsics fall back to ctypes on the same addresses), so their logic is covered
by a reference comparison independent of compiled code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_kernel_logic_without_jit() -> None:
    code = textwrap.dedent("""
        import numpy as np
        import fastfuse
        from fastfuse import transpose_concat
        rng = np.random.default_rng(0)
        cases = [
            (np.float32, [(40, 37), (17, 37)]),     # 16 x 16 blocks, ragged edges
            (np.float16, [(70, 66)]),               # 32 x 32 blocks
            (np.uint8, [(3, 5), (1, 5)]),           # elements only
            (np.float64, [(9, 24), (16, 24), (9, 24)]),
        ]
        for dtype, shapes in cases:
            parts = [rng.integers(0, 100, size=s).astype(dtype) for s in shapes]
            expected = np.concatenate([p.T for p in parts], axis=1)
            assert np.array_equal(transpose_concat(parts), expected), (dtype, shapes)
            aligned = np.empty(expected.size + 64, dtype)
            offset = (-aligned.ctypes.data % 64) // aligned.itemsize
            out = aligned[offset : offset + expected.size].reshape(expected.shape)
            assert np.array_equal(transpose_concat(parts, out=out), expected), ("aligned", dtype, shapes)
            fortran = [np.asfortranarray(p) for p in parts]  # row copies
            assert np.array_equal(transpose_concat(fortran), expected), ("fortran", dtype, shapes)
        half = rng.standard_normal((40, 70)).astype(np.float16)  # widening blocks and edges
        assert np.array_equal(transpose_concat([half], dtype="float32"), half.T.astype(np.float32))
        import sys, fastfuse.kernels.numba_kernels as k
        assert k.numba.config.DISABLE_JIT and k.run_tiles.__module__ == "fastfuse.kernels.numba_kernels", "compiled?"
        print("ok", sorted(fastfuse.kernels.engine.status()["ready"]))
    """)
    # FASTFUSE_ENGINE=numba: these inputs are small, and would otherwise take the numpy engine.
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "FASTFUSE_ENGINE": "numba"}
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.stdout == "ok [(0, 1), (0, 2), (0, 4), (0, 8), (1, 2)]\n", result.stderr
