"""The engines' work described by memory (``kernels.regions``: Block, Copy): copies of any
strides, into either orientation of a destination, on both engines, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fastfuse.errors import FuseError
from fastfuse.kernels.engine import run_copies
from fastfuse.kernels.regions import Block, Copy


def _views(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    base = rng.integers(0, 2**16, size=(70, 90), dtype=np.uint16).view(np.float16)
    return [
        ("C", base[:33, :41]),
        ("F", np.asfortranarray(base[:33, :41])),
        ("stepped", base[::2, 1::2][:33, :41]),
        ("reversed", base[::-1, ::-1][:33, :41]),
        ("read-only", np.array(base[:33, :41])),
    ]


@pytest.mark.parametrize("orientation", ["rows adjacent", "columns adjacent"])
@pytest.mark.parametrize("widen", [False, True])
def test_copies_of_any_source_strides(engine: str, orientation: str, widen: bool) -> None:
    rng = np.random.default_rng(7)
    for name, source in _views(rng):
        source.flags.writeable = name != "read-only"
        dtype = np.float32 if widen else np.float16
        out = (
            np.full((41, 33), np.nan, dtype) if orientation == "columns adjacent" else np.full((33, 41), np.nan, dtype)
        )
        destination = out.T if orientation == "columns adjacent" else out
        run_copies([Copy.of(source, destination)])
        expected = source.astype(np.float32) if widen else source
        assert np.array_equal(destination.view(f"u{dtype().itemsize}"), expected.view(f"u{dtype().itemsize}")), name


def test_a_block_holds_its_array(engine: str) -> None:
    block = Block.of(np.arange(6.0).reshape(2, 3)[:, 1:])
    assert (block.rows, block.cols, block.row_stride, block.col_stride, block.itemsize) == (2, 2, 24, 8, 8)
    assert isinstance(block.owner, np.ndarray) and block.T.owner.base is block.owner.base
    out = np.zeros((2, 2))
    run_copies([Copy(block, Block.of(out))])  # the source array lives only in the block
    assert out.tolist() == [[1.0, 2.0], [4.0, 5.0]]
    run_copies([Copy(block, Block.of(out).T)])
    assert out.tolist() == [[1.0, 4.0], [2.0, 5.0]]


def test_blocks_by_address_alone(engine: str) -> None:
    """No array behind the blocks (as a caller holding raw memory would make them)."""
    source = np.arange(12, dtype=np.int16).reshape(3, 4)
    out = np.zeros((4, 3), np.int16)
    address = Block(source.ctypes.data, 3, 4, 8, 2, 2)
    run_copies([Copy(address, Block(out.ctypes.data, 3, 4, 2, 6, 2))])  # into out.T
    assert np.array_equal(out, source.T)


def test_a_device_block_is_refused_by_name() -> None:
    out = np.zeros((2, 2), np.float32)
    device = Block(4096, 2, 2, 8, 4, 4, "cuda:0")
    with pytest.raises(FuseError) as caught:
        run_copies([Copy(device, Block.of(out))])
    assert str(caught.value) == "a copy to or from cuda:0: the numba and numpy engines move CPU memory only"


def test_a_destination_with_no_adjacent_axis_is_refused(engine: str) -> None:
    out = np.zeros((4, 6), np.float32)
    with pytest.raises(FuseError) as caught:
        run_copies([Copy.of(np.ones((2, 3), np.float32), out[::2, ::2])])
    assert str(caught.value) == (
        "a copy into strides (48, 8) of 4-byte elements: expected its rows or its columns adjacent "
        "(a view of a C-contiguous array)"
    )
    assert not out.any()
