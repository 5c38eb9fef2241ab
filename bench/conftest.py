"""fastfuse benchmarks (issue 4): ``pytest bench --benchmark-only`` to measure,
``pytest bench --benchmark-disable`` as a quick smoke test, ``python bench/report.py`` for the
ratio table.

Checkpoint size: ``$FASTFUSE_BENCH_SIZE`` (``tiny`` ... ``large-v3``) if set, else ``tiny`` when
benchmarks are disabled or skipped (smoke runs never build the 3 GB file), else ``large-v3``.
Generated checkpoints are cached in ``$FASTFUSE_BENCH_CACHE`` (default ``.bench-cache/``).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> str:
    measuring = not (pytestconfig.getoption("benchmark_disable") or pytestconfig.getoption("benchmark_skip"))
    measuring = measuring or pytestconfig.getoption("benchmark_enable")
    return os.environ.get("FASTFUSE_BENCH_SIZE") or ("large-v3" if measuring else "tiny")
