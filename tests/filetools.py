"""File-building helpers shared by the format and writer tests (not fastfuse's own code paths)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fastfuse.formats.safetensors_file import Header, OutputTensor, layout, read_safetensors
from fastfuse.formats.stored import map_arrays
from fastfuse.sinks.atomic import AtomicWriter


def _permissions_enforced() -> bool:
    """False for root with CAP_DAC_OVERRIDE, which reads and writes anything."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_bytes(b"")
        probe.chmod(0)
        return not os.access(probe, os.R_OK)


NO_PERMISSIONS = pytest.mark.skipif(not _permissions_enforced(), reason="root ignores permissions")
BF16 = np.dtype(ml_dtypes.bfloat16)


def raw_file(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """File bytes: an 8-byte length (``length`` or the real one), the header, then ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def entry(dtype: Any, shape: Any, start: Any, end: Any = None) -> dict[str, Any]:
    offsets = start if end is None else [start, end]
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def write(
    path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, tuple[int, int]]:
    """Write ``arrays`` with layout + AtomicWriter (the way fastfuse writes files)."""
    prefix, offsets = layout([OutputTensor(k, a.dtype, a.shape) for k, a in arrays.items()], metadata)
    size = max((end for _, end in offsets.values()), default=0)
    with AtomicWriter(path, prefix, size, **kwargs) as w:
        for name, a in arrays.items():
            w.view(*offsets[name], a.dtype, a.shape)[...] = a
    return offsets


def map_tensors(header: Header) -> dict[str, np.ndarray]:
    """Zero-copy views of a file whose header was read (as ``Checkpoint.arrays`` makes them)."""
    return map_arrays(read_safetensors(header.path))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaN payloads, -0.0) including dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    specials = np.array([0x7C01, 0x8000, 0xFE00, 0x3C00], np.uint16)  # NaN payload, -0.0, ...
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": specials.view(np.float16).reshape(2, 2),
        "bf16": specials.view(BF16),
        "f64": np.array(3.5),  # 0-d
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i8": np.array([-128, 127], np.int8),
        "u16": np.array([[1, 65535]], np.uint16),
        "u8": np.arange(7, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
    }
