"""fastfuse benchmarks: ``pytest bench --benchmark-only`` to measure,
``pytest bench --benchmark-disable`` as a quick smoke test, ``python bench/report.py`` for the
ratio table.

Checkpoint size: ``$FASTFUSE_BENCH_SIZE`` (``tiny`` ... ``large-v3``) if set, else ``tiny`` when
benchmarks are disabled or skipped (smoke runs never build the 3 GB file), else ``large-v3``.
Generated checkpoints are cached in ``$FASTFUSE_BENCH_CACHE`` (default ``.bench-cache/``): about
3 GB per large-v3 checkpoint (safetensors, and the same as a ``torch.save`` file), more with
CTranslate2's model folder. The full suite takes about ten minutes on a 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> str:
    measuring = not (pytestconfig.getoption("benchmark_disable") or pytestconfig.getoption("benchmark_skip"))
    measuring = measuring or pytestconfig.getoption("benchmark_enable")
    return os.environ.get("FASTFUSE_BENCH_SIZE") or ("large-v3" if measuring else "tiny")


@pytest.fixture(scope="session", autouse=True)
def _remove_output() -> Iterator[None]:
    """File-to-file cases leave their last output (up to 3.7 GB) in the cache: remove it."""
    yield
    import harness

    harness.scratch_file().unlink(missing_ok=True)
