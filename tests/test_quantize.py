"""fastfuse.kernels.quantize against independent references: torch's casts, and a per-row int8
quantizer written out element by element; odd sizes, zero rows, ties, -0.0 and NaN."""

from __future__ import annotations

import numpy as np
import pytest

from fastfuse.kernels.quantize import Digest, cast, int8_rows, int16_rows, int16_scale

torch = pytest.importorskip("torch")

SHAPES = [(1, 1), (3, 7), (17, 5), (4, 3, 3), (65, 129)]


def _values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape) * rng.choice([1e-6, 1.0, 300.0])).astype(np.float32)
    values.reshape(shape[0], -1)[0] = 0.0  # an all-zero row
    if values.size > 4:
        values.flat[1] = np.float32(0.5) * 3  # ties after scaling are likely with simple values
        values.flat[2] = -0.0
    return values


def _int8_reference(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = values.reshape(values.shape[0], -1)
    q = np.empty(rows.shape, np.int8)
    scales = np.empty(rows.shape[0], np.float32)
    for r, row in enumerate(rows):
        amax = max((abs(float(x)) for x in row), default=0.0)
        amax32 = np.float32(127.0) if amax == 0 else max(np.float32(amax), np.float32(127) / np.finfo(np.float32).max)
        scale = np.float32(np.float32(127) / np.float32(amax32))
        scales[r] = scale
        for c, x in enumerate(row):
            q[r, c] = int(np.rint(np.float32(x) * scale))
    return q.reshape(values.shape), scales


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_rows_is_the_per_row_reference(shape: tuple[int, ...], seed: int) -> None:
    values = _values(shape, seed)
    q, scale = int8_rows(values)
    expected_q, expected_scale = _int8_reference(values)
    assert q.dtype == np.int8 and q.shape == shape
    assert np.array_equal(q, expected_q) and np.array_equal(scale.view(np.uint32), expected_scale.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES)
def test_int16_is_torchs(shape: tuple[int, ...]) -> None:
    values = _values(shape, 3)
    values.flat[-1] = 5.0
    t = torch.from_numpy(values)
    scale = 2**10 / torch.amax(torch.abs(t))
    expected = torch.clamp(torch.round(t * scale), -32768, 32767).to(torch.int16).numpy()
    ours = int16_scale(float(np.abs(values).max()))
    assert ours == np.float32(scale.item())
    assert np.array_equal(int16_rows(values, ours), expected)


@pytest.mark.parametrize("target", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
def test_casts_round_as_torch(source: str, target: str) -> None:
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)
    wide = bits.view(np.float32)
    wide = wide[np.isfinite(wide)]
    t = torch.from_numpy(wide.copy()).to(getattr(torch, source))
    src = cast(wide, source) if source != "float32" else wide
    ours = cast(src, target)
    expected = t.to(getattr(torch, target))
    width = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}[target]
    assert ours.dtype.name == target
    assert np.array_equal(ours.view(np.uint8), expected.view(width).numpy().view(np.uint8))


def test_the_digest_is_of_values() -> None:
    def digest(*blocks: np.ndarray) -> tuple[str, bool]:
        d = Digest()
        for block in blocks:
            d.update(block)
        return d.hexdigest(), d.has_nan

    a = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    assert digest(a) == digest(a[:1], a[1:])  # blocks do not matter
    assert digest(a) == digest(np.array([-0.0, 1.0, 2.0, 3.0], np.float32))  # -0.0 equals 0.0
    assert digest(a) != digest(np.array([0.0, 1.0, 2.0, 4.0], np.float32))
    assert digest(np.array([np.nan], np.float32))[1]
