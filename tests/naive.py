"""Slow, obviously correct references (as stumpy keeps in tests/naive.py)."""

from __future__ import annotations

import numpy as np


def fused_reference(parts: list[np.ndarray]) -> np.ndarray:
    """``[in, sum(o_j)]`` by numpy transposes."""
    return np.ascontiguousarray(np.concatenate([p.T for p in parts], axis=1))


def original_loop(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The algorithm fastfuse replaces: a zeroed [d, 3d] output filled element by element."""
    d = q.shape[0]
    out = np.zeros((d, 3 * d), q.dtype)
    for i in range(d):
        for j in range(d):
            out[i, j] = q[j, i]
            out[i, d + j] = k[j, i]
            out[i, 2 * d + j] = v[j, i]
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bytes (NaN payloads and -0.0 included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
