"""transpose_concat against numpy references: dtypes, sizes, part counts, memory layouts.

Every behaviour test runs on both engines (the ``engine`` fixture of ``conftest.py``): the numba
kernels, and the numpy path calls take before the kernels are loaded; both must give the same bits.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import fused_reference, same_bits

from fastfuse import DtypeMismatchError, ShapeMismatchError, transpose_concat

pytestmark = pytest.mark.usefixtures("engine")

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int8, np.uint16]
SHAPES = [
    [(1, 1)],
    [(3, 5), (3, 5), (3, 5)],
    [(127, 127), (127, 127), (127, 127)],
    [(1280, 1280)],
    [(48, 64), (16, 64), (16, 64)],  # GQA-like: k and v smaller than q
    [(5, 131), (17, 131), (1, 131), (64, 131)],
    [(200, 3)],
]


def random_bits(shape: tuple[int, ...], dtype: object, rng: np.random.Generator) -> np.ndarray:
    """Arbitrary bit patterns (NaNs with payloads, -0.0, subnormals included)."""
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{len(s)}x{s[0][1]}")
def test_matches_numpy_bit_for_bit(dtype: object, shapes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(len(shapes))
    parts = [random_bits(s, dtype, rng) for s in shapes]
    assert same_bits(transpose_concat(parts), fused_reference(parts))


def fortran(a: np.ndarray) -> np.ndarray:
    return np.asfortranarray(a)


def strided(a: np.ndarray) -> np.ndarray:
    big = np.zeros((a.shape[0] * 2, a.shape[1] * 3), a.dtype)
    big[::2, ::3] = a
    return big[::2, ::3]


def readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def reversed_rows(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[::-1])[::-1]


@pytest.mark.parametrize("layout", [fortran, strided, readonly, reversed_rows])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.float64], ids=lambda d: np.dtype(d).name)
def test_any_input_layout(layout: object, dtype: object) -> None:
    rng = np.random.default_rng(1)
    parts = [random_bits(s, dtype, rng) for s in [(33, 70), (17, 70), (40, 70)]]
    views = [layout(p) for p in parts]  # type: ignore[operator]
    assert same_bits(transpose_concat(views), fused_reference(parts))


def test_memory_mapped_inputs_and_output(tmp_path: object) -> None:
    rng = np.random.default_rng(2)
    parts = [random_bits((64, 96), np.float16, rng) for _ in range(3)]
    path = f"{tmp_path}/parts.bin"
    np.concatenate([p.ravel() for p in parts]).tofile(path)
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=(3, 64, 96))
    out_path = f"{tmp_path}/out.bin"
    out = np.memmap(out_path, dtype=np.float16, mode="w+", shape=(96, 192))
    transpose_concat(list(mapped), out=out)
    out.flush()
    assert same_bits(np.fromfile(out_path, np.float16).reshape(96, 192), fused_reference(parts))


def test_out_is_a_slice_of_a_bigger_buffer() -> None:
    rng = np.random.default_rng(3)
    parts = [random_bits((7, 9), np.float32, rng) for _ in range(3)]
    buffer = np.full(9 * 21 + 10, -1.0, np.float32)
    out = buffer[5 : 5 + 9 * 21].reshape(9, 21)
    assert transpose_concat(parts, out=out) is out
    assert same_bits(out, fused_reference(parts))
    assert (buffer[:5] == -1).all() and (buffer[-5:] == -1).all()


def test_a_new_result_starts_on_a_cache_line() -> None:
    parts = [np.ones((300, 200), np.float16)] * 3
    assert transpose_concat(parts).ctypes.data % 64 == 0  # the kernels' streaming stores need it


OFFSET_CASES = [(np.float32, None), (np.float16, None), (np.int8, None), (np.float64, None)]
OFFSET_CASES += [(np.float16, np.float32), (ml_dtypes.bfloat16, np.float32)]  # widening


@pytest.mark.parametrize(("dtype", "widen_to"), OFFSET_CASES, ids=lambda d: np.dtype(d).name if d else "same")
@pytest.mark.parametrize("rows", [128, 131], ids=["line-rows", "ragged-rows"])
def test_out_at_every_offset_into_a_cache_line(dtype: object, widen_to: object, rows: int) -> None:
    """Destinations that start anywhere in a line: the rows before and after the streaming grid
    (less than a line of each output row) take another path than the grid itself."""
    rng = np.random.default_rng(rows)
    if widen_to is None:
        parts = [random_bits((rows, 70), dtype, rng) for _ in range(3)]
        expected = fused_reference(parts)
    else:  # finite values: numpy's own widening is the reference
        parts = [rng.standard_normal((rows, 70), dtype=np.float32).astype(dtype) for _ in range(3)]
        expected = fused_reference([p.astype(widen_to) for p in parts])
    width, size = expected.itemsize, expected.size
    for offset in range(0, 64, width):
        raw = np.full(size * width + 192, 0x5A, np.uint8)
        start = -raw.ctypes.data % 64 + 64 + offset
        out = raw[start : start + size * width].view(expected.dtype).reshape(expected.shape)
        assert transpose_concat(parts, out=out, dtype=widen_to) is out
        assert same_bits(out, expected), offset
        assert (raw[:start] == 0x5A).all() and (raw[start + size * width :] == 0x5A).all(), offset


def test_nan_payloads_and_signed_zero_survive() -> None:
    bits = np.array([[0x7E01, 0xFE02, 0x7C01, 0x8000], [0x0000, 0x0001, 0x7BFF, 0xFFFF]], np.uint16)
    out = transpose_concat([bits.view(np.float16)])
    assert same_bits(out.view(np.uint16), bits.T)


def test_widens_every_float16_pattern_exactly() -> None:
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    out = transpose_concat([patterns], dtype="float32")
    expected = patterns.T.astype(np.float32)
    finite = ~np.isnan(expected)
    assert same_bits(out[finite], expected[finite])
    # NaN: sign and payload kept (shifted into the f32 mantissa), never quieted or canonicalised
    half_bits = patterns.T.view(np.uint16).astype(np.uint32)
    nan_expected = ((half_bits & 0x8000) << 16) | 0x7F800000 | ((half_bits & 0x3FF) << 13)
    assert (out.view(np.uint32)[~finite] == nan_expected[~finite]).all()


def test_widens_every_bfloat16_pattern_exactly() -> None:
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(512, 128)
    out = transpose_concat([bits.view(ml_dtypes.bfloat16)], dtype="float32")
    assert same_bits(out.view(np.uint32), bits.T.astype(np.uint32) << 16)


@pytest.mark.parametrize(("rows", "cols"), [(257, 255), (33, 70), (1, 65), (95, 17), (64, 129)])
def test_widening_ragged_shapes(rows: int, cols: int) -> None:
    """Sizes that are not multiples of the block (edges of the tile and block grids), f16 and bf16,
    into an output whose rows start off the cache-line grid too."""
    rng = np.random.default_rng(rows * cols)
    half = rng.standard_normal((rows, cols)).astype(np.float16)
    bits = rng.integers(0, 2**16, size=(rows, cols), dtype=np.uint16)
    buffer = np.full(2 * rows * cols + 3, np.nan, np.float32)
    out = buffer[3:].reshape(cols, 2 * rows)  # 12 bytes past the allocation: off the line grid
    assert same_bits(transpose_concat([half], dtype="float32"), half.T.astype(np.float32))
    transpose_concat([half, half[::-1]], dtype="float32", out=out)
    assert same_bits(out, np.concatenate([half.T, half[::-1].T], axis=1).astype(np.float32))
    got_bf16 = transpose_concat([bits.view(ml_dtypes.bfloat16)], dtype="float32")
    assert same_bits(got_bf16.view(np.uint32), bits.T.astype(np.uint32) << 16)


# The engine fixture only sets an environment variable: sharing it across examples is fine.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    width=st.integers(1, 70),
    dtype=st.sampled_from([np.uint8, np.float16, np.float32, np.int64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_any_shapes(rows: list[int], width: int, dtype: object, seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [random_bits((r, width), dtype, rng) for r in rows]
    fused = transpose_concat(parts)
    assert same_bits(fused, fused_reference(parts))
    # and splitting the fused tensor gives the inputs back
    starts = np.cumsum([0, *rows])
    for part, a, b in zip(parts, starts, starts[1:]):
        assert same_bits(fused[:, a:b].T, part)


@pytest.mark.parametrize(
    ("parts", "kwargs", "error", "message"),
    [
        ([], {}, ShapeMismatchError, r"needs a non-empty sequence of 2-D arrays"),
        (
            np.zeros((2, 2)),
            {},
            ShapeMismatchError,
            r"needs a non-empty sequence of 2-D arrays, e\.g\. \[q, k, v\]; found ndarray",
        ),
        ([np.zeros(3)], {}, ShapeMismatchError, r"part 0: expected 2 dimensions \[out, in\], found shape \[3\]"),
        (
            [np.zeros((2, 3)), np.zeros((2, 4))],
            {},
            ShapeMismatchError,
            r"part 1: expected shape \[\*, 3\] like part 0, found \[2, 4\]",
        ),
        (
            [np.zeros((2, 3)), np.zeros((2, 3), np.float16)],
            {},
            DtypeMismatchError,
            r"part 1: expected dtype float64 like part 0, found float16",
        ),
        ([np.zeros((2, 3), "U3")], {}, DtypeMismatchError, r"dtype <U3 is not a plain 1, 2, 4 or 8-byte element type"),
        (
            [np.zeros((2, 3), np.float32)],
            {"dtype": "float16"},
            DtypeMismatchError,
            r"cannot fuse float32 parts into float16",
        ),
        (
            [np.zeros((2, 3), np.float32)],
            {"dtype": "no-such-type"},
            DtypeMismatchError,
            r"unknown dtype 'no-such-type'",
        ),
        (
            [np.zeros((2, 3))],
            {"out": np.zeros((3, 3))},
            ShapeMismatchError,
            r"out: expected shape \[3, 2\] of float64, found \[3, 3\] of float64",
        ),
        (
            [np.zeros((2, 3))],
            {"out": np.zeros((2, 3)).T},
            ShapeMismatchError,
            r"out: expected a writable C-contiguous array",
        ),
        ([np.zeros((2, 3))], {"out": [[0.0]]}, ShapeMismatchError, r"out: expected a numpy array, found list"),
    ],
)
def test_errors_name_what_was_expected_and_found(
    parts: object, kwargs: dict[str, object], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        transpose_concat(parts, **kwargs)  # type: ignore[arg-type]


def test_out_overlapping_an_input_is_refused() -> None:
    buffer = np.zeros(2 * 2 * 2)
    part = buffer[:4].reshape(2, 2)
    with pytest.raises(ShapeMismatchError, match="out overlaps part 0; fastfuse does not fuse in place"):
        transpose_concat([part], out=buffer[2:6].reshape(2, 2))
