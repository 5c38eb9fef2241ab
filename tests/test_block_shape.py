"""The kernels' block shapes (``job_table.Shape``) and the per-CPU choice among them
(``block_shape``): every shape gives the reference's bits, under the host's code and under
AVX2 code (``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=`` in a child, whatever the host); the
calibration keeps the fastest, and a stale or corrupt choice file is ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numba
import numpy as np
import pytest
from naive import fused_reference, same_bits

import fastfuse
from fastfuse import FuseError, transpose_concat
from fastfuse.kernels import block_shape, numba_kernels
from fastfuse.kernels.job_table import ALIASING_STRIDE, DEFAULT_SHAPE, SHAPES, Shape

V64 = block_shape.CANDIDATES[(0, 2)][1]  # a candidate beside the default (64-byte vectors)
AVX2 = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}  # features empty: haswell's own


def random_bits(shape: tuple[int, int], dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, -0.0, subnormals included)."""
    dtype = np.dtype(dtype)
    return rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8).view(dtype).reshape(shape)


def off_grid(rows: int, cols: int, dtype: Any, skip: int = 3) -> np.ndarray:
    """A C-contiguous ``rows x cols`` output starting ``skip`` elements past its allocation."""
    return np.zeros(rows * cols + skip, dtype)[skip:].reshape(rows, cols)


@pytest.mark.parametrize("shape", SHAPES, ids=Shape.name)
@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int8, np.float64], ids=lambda d: np.dtype(d).name
)
def test_each_shape_gives_the_reference_bits(shape: Shape, dtype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Odd sizes (edges of the block and tile grids), an output off the line grid, strided and
    Fortran-ordered sources, GQA-like unequal parts, rows ``ALIASING_STRIDE`` bytes apart (walked
    band by band in every shape); and the widenings, for 2-byte types."""
    monkeypatch.setenv("FASTFUSE_ENGINE", "numba")
    monkeypatch.setenv(block_shape.FORCE_VARIABLE, shape.name())
    rng = np.random.default_rng(7)
    aliasing = ALIASING_STRIDE // np.dtype(dtype).itemsize
    for rows, cols in [((257, 255, 1), 131), ((130, 33, 64), 131), ((64, 64, 64), 128), ((130, 33, 64), aliasing)]:
        parts = [random_bits((r, cols), dtype, rng) for r in rows]
        expected = fused_reference(parts)
        assert same_bits(transpose_concat(parts), expected)
        out = off_grid(*expected.shape, dtype)
        assert same_bits(transpose_concat(parts, out=out), expected)
        strided = [np.repeat(p, 2, axis=1)[:, ::2] for p in parts]
        assert same_bits(transpose_concat([np.asfortranarray(strided[0]), *strided[1:]]), expected)
        if np.dtype(dtype).itemsize == 2 and np.dtype(dtype).kind == "f":
            finite = [np.where(np.isfinite(p.astype(np.float32)), p, 0).astype(dtype) for p in parts]
            wide = fused_reference(finite).astype(np.float32)
            assert same_bits(transpose_concat(finite, dtype="float32"), wide)
            assert same_bits(transpose_concat(finite, dtype="float32", out=off_grid(*wide.shape, np.float32)), wide)
    assert ("copy", np.dtype(dtype).itemsize, shape) in numba_kernels._COMPILED  # the forced shape ran


def test_avx2_code_gives_the_same_bits_in_every_shape(tmp_path: Path) -> None:
    """The tests above, in a child whose numba generates AVX2 code (its own cache)."""
    tests = [f"{__file__}::test_each_shape_gives_the_reference_bits", f"{__file__}::test_codegen_is_what_was_asked"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "FASTFUSE_"))}
    environment |= {**AVX2, "NUMBA_CACHE_DIR": str(tmp_path), "FASTFUSE_EXPECT_AVX2": "1"}
    package_root = str(Path(fastfuse.__file__).resolve().parent.parent)  # this fastfuse, installed or not
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(SHAPES) * 5 + 1} passed" in done.stdout, done.stdout[-500:]


def test_codegen_is_what_was_asked() -> None:
    """Under the AVX2 switch the workers hold no AVX-512 register (``NUMBA_CPU_NAME`` alone
    would keep the host's features); on the host, numba's target is the host CPU."""
    numba_kernels.worker(0, 2, DEFAULT_SHAPE)
    cpu, features = block_shape.target()[1:]
    assembly = numba_kernels._COMPILED[("copy", 2, DEFAULT_SHAPE)]._library.get_asm_str()
    if os.environ.get("FASTFUSE_EXPECT_AVX2"):
        assert (cpu, features) == ("haswell", "")
        assert "zmm" not in assembly and "ymm" in assembly
    else:
        assert cpu == os.environ.get("NUMBA_CPU_NAME", cpu)


def test_a_prefetching_shape_prefetches_and_the_others_do_not() -> None:
    """``Shape.prefetch`` changes no bit (the tests above), so what it does is seen in the code:
    the prefetching worker holds prefetch instructions, the default's none."""
    prefetching = next(shape for shape in SHAPES if shape.prefetch)
    signature = numba.types.void(
        numba.types.intp, numba.types.intp, numba.types.intp, numba.types.CPointer(numba.types.uint32)
    )
    for shape, expected in ((prefetching, True), (DEFAULT_SHAPE, False)):
        # compiled here, not loaded from numba's cache: a cached library keeps no assembly
        compiled = numba.cfunc(signature, error_model="numpy")(numba_kernels._copy_worker(shape))
        assert ("prefetcht0" in compiled._library.get_asm_str()) is expected, shape.name()


@pytest.fixture
def choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private choice file (nothing read yet), measurements faked by ``fake_seconds``."""
    path = tmp_path / "block-shapes.json"
    monkeypatch.setattr(block_shape, "choice_file", lambda: str(path))
    monkeypatch.setattr(block_shape, "_choices", {})
    monkeypatch.delenv(block_shape.FORCE_VARIABLE, raising=False)
    return path


def fake_seconds(monkeypatch: pytest.MonkeyPatch, seconds: dict[tuple[int, int], dict[Shape, float]]) -> list[Any]:
    """Replace the timing by ``seconds[spec]`` (shapes not named there: 9 s); the list of specs measured."""
    measured: list[Any] = []

    def measure(spec: tuple[int, int], shapes: tuple[Shape, ...], rounds: int) -> dict[Shape, float]:
        measured.append(spec)
        return {shape: seconds.get(spec, {}).get(shape, 9.0) for shape in shapes}

    monkeypatch.setattr(block_shape, "_measure", measure)
    return measured


def test_calibration_keeps_the_fastest_and_a_tie_keeps_the_default(
    choices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = fake_seconds(monkeypatch, {(0, 2): {DEFAULT_SHAPE: 2.0, V64: 1.0}})
    got = block_shape.calibrate({(0, 2), (0, 1)})
    assert got == {(0, 2): V64, (0, 1): DEFAULT_SHAPE} and measured == [(0, 2)]  # 1 byte: not measured
    document = json.loads(choices.read_text())
    assert document["choices"] == [[0, 2, V64.name()]]
    assert document["seconds"]["copy-2"] == {shape.name(): 9.0 for shape in block_shape.CANDIDATES[(0, 2)]} | {
        "v32-t64": 2.0,
        V64.name(): 1.0,
    }
    monkeypatch.setattr(block_shape, "_choices", {})  # a new process: read back, nothing measured
    assert block_shape.calibrate({(0, 2)}) == {(0, 2): V64} and block_shape.chosen((0, 2)) == V64
    assert len(measured) == 1
    choices.unlink()
    monkeypatch.setattr(block_shape, "_choices", {})
    fake_seconds(monkeypatch, {(0, 2): {DEFAULT_SHAPE: 1.0, V64: 1.0}})
    assert block_shape.calibrate({(0, 2)}) == {(0, 2): DEFAULT_SHAPE}  # a tie keeps the default
    for faster, kept in ((0.98, DEFAULT_SHAPE), (0.96, V64)):  # within the margin: a tie
        choices.unlink()
        monkeypatch.setattr(block_shape, "_choices", {})
        fake_seconds(monkeypatch, {(0, 2): {DEFAULT_SHAPE: 1.0, V64: faster}})
        assert block_shape.calibrate({(0, 2)}) == {(0, 2): kept}, faster


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: "{not json",
        lambda d: json.dumps({**d, "key": {**d["key"], "target": ["other-cpu"]}}),
        lambda d: json.dumps({**d, "key": {**d["key"], "kernels": "an older kernel source"}}),
        lambda d: json.dumps({**d, "choices": [[0, 2, "v48-t64"]]}),
        lambda d: json.dumps({**d, "choices": [[0, 2]]}),
        lambda d: json.dumps([1, 2]),
    ],
    ids=["corrupt", "other-cpu", "other-kernels", "unknown-shape", "short-entry", "not-a-dict"],
)
def test_a_stale_or_corrupt_choice_is_ignored_and_measured_again(
    spoil: Any, choices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = fake_seconds(monkeypatch, {(0, 2): {DEFAULT_SHAPE: 2.0, V64: 1.0}})
    block_shape.calibrate({(0, 2)})
    choices.write_text(spoil(json.loads(choices.read_text())))
    monkeypatch.setattr(block_shape, "_choices", {})
    assert block_shape.chosen((0, 2)) == DEFAULT_SHAPE  # ignored: the default until measured
    monkeypatch.setattr(block_shape, "_choices", {})
    assert block_shape.calibrate({(0, 2)}) == {(0, 2): V64} and len(measured) == 2
    assert json.loads(choices.read_text())["choices"] == [[0, 2, V64.name()]]


def test_a_forced_shape_wins_and_a_wrong_one_is_a_clear_error(choices: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = fake_seconds(monkeypatch, {})
    monkeypatch.setenv(block_shape.FORCE_VARIABLE, "v16-t64")
    assert block_shape.calibrate({(0, 2), (0, 1)}) == {(0, 2): Shape(16, 64), (0, 1): Shape(16, 64)}
    assert not measured and not choices.exists()
    monkeypatch.setenv(block_shape.FORCE_VARIABLE, "v48")
    with pytest.raises(FuseError, match=r"FASTFUSE_BLOCK_SHAPE='v48': expected one of \['v32-t64', 'v64-t64', "):
        block_shape.chosen((0, 2))


def test_the_engine_runs_the_shape_chosen(choices: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTFUSE_ENGINE", "numba")
    fake_seconds(monkeypatch, {(0, 2): {DEFAULT_SHAPE: 2.0, V64: 1.0}})
    block_shape.calibrate({(0, 2)})
    numba_kernels._COMPILED.pop(("copy", 2, V64), None)
    numba_kernels._WORKERS.pop(("copy", 2, V64), None)
    parts = [np.arange(70 * 90, dtype=np.uint16).reshape(70, 90)] * 2
    assert same_bits(transpose_concat(parts), fused_reference(parts))
    assert ("copy", 2, V64) in numba_kernels._COMPILED


def test_only_a_warm_up_measures_never_a_load(choices: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading kernels (a load's loader thread, the cache-filling child) takes the choice file or
    the default; ``warm_up`` measures what the file lacks, once."""
    from fastfuse.kernels import engine, kernel_cache

    measured = fake_seconds(monkeypatch, {(0, 2): {DEFAULT_SHAPE: 2.0, V64: 1.0}})
    kernel_cache.compile_here({(0, 2)})
    assert measured == [] and not choices.exists() and block_shape.chosen((0, 2)) == DEFAULT_SHAPE
    engine.warm_up()
    assert measured == sorted(block_shape.CALIBRATED) and block_shape.chosen((0, 2)) == V64
    engine.warm_up()
    assert measured == sorted(block_shape.CALIBRATED)


def test_the_measurement_times_every_candidate() -> None:
    shapes = block_shape.CANDIDATES[(0, 2)]
    seconds = block_shape._measure((1, 2), shapes, rounds=1)
    assert set(seconds) == set(shapes)
    assert all(0 < s < float("inf") for s in seconds.values())


@pytest.mark.parametrize("spec", sorted(block_shape.CALIBRATED))
def test_the_calibration_problem_is_a_fusion_of_varied_bits(spec: tuple[int, int]) -> None:
    """What the calibration times is a real fusion (every output element written, from its
    part) of parts of both sides, whose bits vary (uniform lines are written faster)."""
    jobs, sources, outs = block_shape._problem(spec)
    numba_kernels.run_tiles(block_shape._tiled(jobs, DEFAULT_SHAPE), numba_kernels.worker(*spec))
    assert sorted(source.shape[1] for source in sources) == sorted(block_shape.SIDES)
    for source, out in zip(sources, outs, strict=True):
        assert same_bits(out, np.concatenate(list(source.transpose(0, 2, 1)), axis=1))
        assert len(np.unique(source[0, :2])) > source.shape[1]


def test_every_candidate_is_a_shape_the_tests_run_and_the_default_comes_first() -> None:
    for spec, shapes in block_shape.CANDIDATES.items():
        assert shapes[0] == DEFAULT_SHAPE and set(shapes) <= set(SHAPES), spec
    assert {(0, 2), (0, 4)} <= block_shape.CALIBRATED
    assert any(shape.columns_first for shapes in block_shape.CANDIDATES.values() for shape in shapes)
