"""Every case of ``cases.GROUPS`` as a pytest-benchmark test, plus checks that the baselines
compute what fastfuse computes (run them alone: ``pytest bench --benchmark-disable``)."""

from __future__ import annotations

import os
import sys
from typing import Any

import cases
import harness
import numpy as np
import pytest

from fastfuse.kernels import block_shape, job_table


@pytest.mark.parametrize(("group", "param", "name"), cases.CASES, ids=["-".join(case) for case in cases.CASES])
def test_bench(benchmark: Any, size: str, group: str, param: str, name: str) -> None:
    impl = cases.impls(group, size, param)[name]
    if impl is None:
        pytest.skip(f"{name} is not installed")
    benchmark.group = f"{group} {param} ({size})"
    if not (benchmark.disabled or impl.self_timed or name in cases.SLOW):  # warm-up: caches, page faults
        if impl.setup:
            impl.setup()
        impl.run()
    seen: list[Any] = []
    benchmark.pedantic(lambda: seen.append(impl.run()), setup=impl.setup, rounds=cases.rounds(group, name))
    if impl.self_timed:
        benchmark.extra_info["child_timer_min_s"] = min(seen)
    if impl.extra:
        benchmark.extra_info.update(impl.extra())


def _bits(array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray):  # a torch tensor
        import torch

        array = array.view(torch.uint8).numpy()
    bits: np.ndarray = array.view(np.uint8)
    return bits


@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_kernel_baselines_agree(dtype: str) -> None:
    impls = cases.impls("kernel", cases.TINY, dtype)
    fastfuse = impls["fastfuse"]
    assert fastfuse is not None
    expected = [_bits(a).copy() for a in fastfuse.run()]
    for name in ("numpy", "serial", "torch"):
        impl = impls[name]
        if impl is not None:
            got = impl.run()
            assert all(np.array_equal(_bits(g), e) for g, e in zip(got, expected, strict=True)), name


def test_numpy_fusion_matches_load() -> None:
    import fastfuse

    path = harness.checkpoint_file(cases.TINY)
    loaded, reference = fastfuse.load(path), cases.safe_open_numpy(path)
    fused = [key for key in reference if key.startswith("fused.")]
    assert fused and all(np.array_equal(_bits(loaded[key]), _bits(reference[key])) for key in fused)
    assert loaded.keys() == reference.keys()


@pytest.mark.parametrize("param", ["float16", "openai-float16"])
def test_torch_fusion_matches_load_of_torch_files(param: str) -> None:
    """The ``ptload`` baseline (torch.load, then torch.cat) builds the tensors fastfuse.load does."""
    torch = pytest.importorskip("torch")
    import fastfuse

    make = harness.openai_checkpoint_file if param == "openai-float16" else harness.torch_checkpoint_file
    path = make(cases.TINY, "float16")
    loaded = torch.load(path, mmap=True, weights_only=True)
    fused = cases.torch_fuse(loaded.get("model_state_dict", loaded))
    found = fastfuse.load(path)
    assert fused and set(fused) == {key for key in found if key.startswith("fused.")}
    assert all(np.array_equal(_bits(found[key]), _bits(t.numpy())) for key, t in fused.items())


def test_import_does_not_load_numba() -> None:
    assert not harness.imports_numba()


def test_peak_rss_sees_anonymous_memory() -> None:
    """The sampler catches a 200 MB allocation held for 0.2 s."""
    code = "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)"
    peak = harness.peak_rss([sys.executable, "-c", code])
    assert 200 <= peak["rss_anon_mb"] <= peak["vm_hwm_mb"] + 1


def test_measure_takes_turns_and_keeps_the_fastest_round() -> None:
    order: list[str] = []

    def impl(name: str, seconds: list[float]) -> harness.Impl:
        left = iter(seconds)
        return harness.Impl(
            lambda: (order.append(name), next(left))[1], setup=lambda: order.append("setup"), self_timed=True
        )

    best = harness.measure({"a": impl("a", [3.0, 1.0]), "b": impl("b", [2.0, 5.0, 4.0])}, {"a": 2, "b": 3})
    assert best == {"a": 1.0, "b": 2.0}
    assert order == ["setup", "a", "setup", "b", "setup", "a", "setup", "b", "setup", "b"]


def test_scaling_group_and_rows_follow_the_thread_counts() -> None:
    import report

    try:
        cases.set_threads((1, 2, 4))
        assert set(cases.GROUPS["scaling"].params) == set(cases.DTYPES)
        assert ("scaling", "bfloat16", "memcpy-4t") in cases.CASES
        same_count = [row for row in report.scaling_rows() if row.impl[-2:] == row.base[-2:]]
        assert {(row.param, row.impl) for row in same_count} == {
            (dt, f"fastfuse-{n}t") for dt in cases.DTYPES for n in (1, 2, 4)
        }
    finally:
        cases.set_threads((1, 2))
    assert ("scaling", "float32", "memcpy-4t") not in cases.CASES


def test_haswell_children_compile_into_their_own_cache() -> None:
    import codegen_cases

    env = codegen_cases.environment("haswell")
    assert env["NUMBA_CPU_NAME"] == "haswell"
    assert env["NUMBA_CPU_FEATURES"] == ""  # else numba keeps the host's features (AVX-512)
    assert env["NUMBA_CACHE_DIR"] != os.environ.get("NUMBA_CACHE_DIR")
    assert codegen_cases.environment("host") == {}


WALKS = [job_table.DEFAULT_SHAPE, job_table.Shape(64, 128, True, 2)]  # the band walk, a prefetched column-first one


@pytest.mark.parametrize("shape", WALKS, ids=job_table.Shape.name)
@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_the_stores_half_walks_every_destination_line(dtype: str, shape: job_table.Shape) -> None:
    import access_floor

    qkv = cases.qkv_arrays(cases.TINY, dtype)
    groups, _, d, _ = qkv.shape
    width = qkv.dtype.itemsize
    out = cases.aligned_zeros((groups, d, 3 * d), f"u{width}")
    _, destinations = access_floor.part_addresses(qkv, out)
    walk = access_floor.half_walk(shape)
    walk(destinations, destinations, d, d, 3 * d * width, access_floor.STORES, out[:0, 0, 0])
    assert out.all()  # every element written (the scratch block holds no zero), as the kernel writes it


def test_access_floor_prints_a_row_per_thread_count() -> None:
    import access_floor

    forced = os.environ.get(block_shape.FORCE_VARIABLE)
    for shape in WALKS:
        table = access_floor.main("float16", [1, 1], cases.TINY, rounds=1, shape=shape)
        assert len([line for line in table.splitlines() if line.startswith("| 1 |")]) == 2
        assert f"kernel {shape.name()}, halves {shape.name()};" in table
        assert os.environ.get(block_shape.FORCE_VARIABLE) == forced  # the kernel's shape forced only meanwhile
    table = access_floor.main("float16", [1], cases.TINY, rounds=1, shape=WALKS[1], prefetch=0)
    assert "kernel v64-t128-c-p2, halves v64-t128-c;" in table
