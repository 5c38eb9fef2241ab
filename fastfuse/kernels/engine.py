"""Which engine moves the bits: numpy now, or the numba kernels once they are loaded.

Every fusion ends in :func:`run_copies`. Work is described by memory, not arrays
(:class:`~fastfuse.kernels.regions.Copy` between :class:`~fastfuse.kernels.regions.Block`: an
address, strides, an element size and a device), so that an engine for other memory is a
sibling here, not a change through the callers. Two engines move host memory and give the
same bits: the numba kernels (``numba_kernels``: parallel, at memory speed, one job table of
byte addresses) and numpy (``numpy_engine``: one thread, 4-8x slower, nothing to load).
Loading the kernels costs about 0.5 s in a fresh process when numba's on-disk cache is warm,
and several seconds when it is cold (numba compiles them: the first run after an install, or
every run where the cache is not kept). The policy, per process:

- Output bytes asked for are counted. Until ``LOAD_AFTER_BYTES`` (whisper-tiny's QKV is 14 MB),
  everything runs on numpy and numba is never imported: a small job costs what numpy costs.
- Past it, a background thread loads the kernels a job needs (from the cache, or compiling
  them: :mod:`~fastfuse.kernels.kernel_loader`, exit-safe). When numba's cache seems to hold
  them (file names tell, without importing numba), the call waits for them (about 0.5 s, at
  most ``WARM_WAIT``). Otherwise calls keep running on numpy while they compile; a call in
  progress hands its remaining copies to the kernels the moment they are ready; every later
  call uses them. No call waits for a compile, so a first run is never slower than numpy, and a
  per-layer loop reaches kernel speed as soon as the process has seen enough work to pay for
  it, whatever the size of each call.
- ``FASTFUSE_ENGINE=numba`` loads (or compiles) the kernels in the calling thread and always
  uses them; ``FASTFUSE_ENGINE=numpy`` never loads numba. :func:`warm_up` compiles every
  kernel into numba's cache (``fastfuse warmup``), so that the next process starts warm.

Kernel launches take turns (one lock): each already uses every core, and numba's workqueue
threading layer (used where neither TBB nor OpenMP is installed) aborts the process on
concurrent launches.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fastfuse.dtypes import WIDENINGS
from fastfuse.errors import FuseError
from fastfuse.kernels import job_table, kernel_cache
from fastfuse.kernels.kernel_loader import ALL_SPECS, LOAD_AFTER_BYTES, Spec, load_now, request, state
from fastfuse.kernels.regions import Block, Copy

__all__ = [
    "ENGINES",
    "LOAD_AFTER_BYTES",
    "Expectation",
    "cache_report",
    "expect",
    "run_copies",
    "status",
    "warm_up",
    "without_waiting",
]

ENGINES = ("auto", "numba", "numpy")
WARM_WAIT = 2.0  # seconds a call may wait for kernels numba's cache seems to hold (loading: ~0.5 s)

_launch_lock = threading.Lock()
_caller = threading.local()


def _engine() -> str:
    choice = os.environ.get("FASTFUSE_ENGINE", "auto") or "auto"
    if choice not in ENGINES:
        raise FuseError(f"FASTFUSE_ENGINE={choice!r}: expected one of {list(ENGINES)}")
    return choice


def _mode(copy: Copy) -> int:
    """The kernels' conversion mode: 0 copies bits, else a widening (``dtypes.WIDENINGS``)."""
    return 0 if copy.widen is None else WIDENINGS[(copy.widen, "float32")]


def _spec(copy: Copy) -> Spec:
    """The kernel worker ``copy`` needs: (0 copy or 1 widen, source element width)."""
    return (0 if copy.widen is None else 1, copy.source.itemsize)


def _kernels() -> ModuleType:
    from fastfuse.kernels import numba_kernels

    return numba_kernels


@contextlib.contextmanager
def without_waiting() -> Iterator[None]:
    """Calls in this block never wait for loading kernels: they start on numpy and hand over.
    For a caller with other work in flight (a file sink copying), for whom starting now is
    worth more than finishing sooner."""
    before = getattr(_caller, "no_wait", False)
    _caller.no_wait = True
    try:
        yield
    finally:
        _caller.no_wait = before


def _wait_if_cached(expected: Expectation) -> bool:
    """Wait (up to ``WARM_WAIT``) for kernels that are loading when numba's cache seems to hold
    them: loading from the cache beats numpy on any call worth loading for, and numpy running
    meanwhile would only slow the loader down (they share the GIL). True if they are ready."""
    if not expected.pending() or not _cache_looked_warm():
        return False
    deadline = time.monotonic() + WARM_WAIT
    while expected.pending() and time.monotonic() < deadline:
        time.sleep(0.005)
    return expected.specs <= state.ready


_cache_looked_warm = functools.cache(kernel_cache.looks_warm)  # at the first call that asked


class Expectation:
    """The kernels a caller is about to need (see :func:`expect`)."""

    def __init__(self, specs: frozenset[Spec]) -> None:
        self.specs = specs

    def pending(self) -> bool:
        """Are they still loading (so that waiting a little would let the kernels do the work)?"""
        with state.lock:
            return not self.specs <= state.ready and state.loader is not None and state.failure is None


def expect(conversions: Iterable[tuple[np.dtype[Any], np.dtype[Any]]], nbytes: int) -> Expectation:
    """A caller is about to fuse ``nbytes`` with these (source, output) dtypes: count them now,
    so that the kernels they need start loading in the background while it does other work
    (a file sink copies the originals first, and computes once they are loaded)."""
    specs = frozenset((0 if source == out else 1, source.itemsize) for source, out in conversions)
    if _engine() == "auto" and nbytes:
        request(set(specs), nbytes)
    return Expectation(specs)


def run_copies(copies: Sequence[Copy]) -> None:
    """Run every copy (host memory: see :class:`~fastfuse.kernels.regions.Copy`), on the kernels
    (one parallel launch per worker kind) or on numpy.

    Trusts its input: shapes, element sizes and conversions were validated by the caller.
    FuseError for a block on a device other than the CPU, or a destination with neither axis
    adjacent (no engine here moves them).
    """
    work, specs = [], set()
    for copy in copies:
        if copy.destination.rows and copy.destination.cols:
            _check_host(copy)
            work.append(copy)
            specs.add(_spec(copy))
    if not work:
        return
    engine = _engine()
    if engine == "numba":
        if not specs <= state.ready:
            load_now(specs)
        _run_kernels(work)
        return
    if engine == "auto" and specs <= state.ready:
        _run_kernels(work)
        return
    if engine == "auto":
        request(specs, sum(_nbytes(copy.destination) for copy in work))
        if not getattr(_caller, "no_wait", False) and _wait_if_cached(Expectation(frozenset(specs))):
            _run_kernels(work)
            return
    from fastfuse.kernels.numpy_engine import move_with_numpy

    # Largest first: if the kernels arrive meanwhile, the many small copies (biases) go to them in
    # one launch instead of each paying a hand-over of the GIL to the loader thread.
    work.sort(key=lambda copy: _nbytes(copy.destination), reverse=True)
    for index, copy in enumerate(work):
        if engine == "auto" and index and specs <= state.ready:  # loaded meanwhile: the rest at kernel speed
            _count("numpy", index)
            _run_kernels(work[index:])
            return
        move_with_numpy([copy])
    _count("numpy", len(work))


def _nbytes(block: Block) -> int:
    return block.rows * block.cols * block.itemsize


def _count(engine: str, copies: int) -> None:
    with state.lock:
        state.copies_run[engine] += copies


def _check_host(copy: Copy) -> None:
    """FuseError unless both engines here can run ``copy``: host memory, and a destination whose
    rows or columns are adjacent (the kernels write whole rows)."""
    for block in (copy.source, copy.destination):
        if block.device != "cpu":
            raise FuseError(f"a copy to or from {block.device}: the numba and numpy engines move CPU memory only")
    destination = copy.destination
    if destination.itemsize not in (destination.row_stride, destination.col_stride):
        raise FuseError(
            f"a copy into strides ({destination.row_stride}, {destination.col_stride}) of {destination.itemsize}-byte "
            "elements: expected its rows or its columns adjacent (a view of a C-contiguous array)"
        )


def _job_row(copy: Copy, mode: int, tile_rows: int, tiles_before: int) -> list[int]:
    """The job table row (``job_table.J_*``) of ``copy``, its tiles numbered after
    ``tiles_before`` others. A job writes ``D[c, r] = S[r, c]`` with the elements of each ``D``
    row adjacent: ``D`` is the destination and ``S`` the source seen transposed when the
    destination's elements are adjacent along its rows, else ``D`` is the destination seen
    transposed and ``S`` the source. No blocks are built for it (this runs for every part of
    every call)."""
    source, destination = copy.source, copy.destination
    if destination.col_stride == destination.itemsize:
        src_row, src_col, rows, cols = source.col_stride, source.row_stride, source.cols, source.rows
        dst_row = destination.row_stride
    else:
        src_row, src_col, rows, cols = source.row_stride, source.col_stride, source.rows, source.cols
        dst_row = destination.col_stride
    tiling = job_table.tiling(src_row, src_col, source.itemsize, mode)
    tiles = job_table.tile_count(rows, cols, tiling, tile_rows)
    return [
        source.address,
        src_row,
        src_col,
        rows,
        cols,
        destination.address,
        dst_row,
        tiling,
        mode,
        tiles_before + tiles,
    ]


def _run_kernels(work: Sequence[Copy]) -> None:
    """One job table per worker, one parallel launch each."""
    kernels = _kernels()
    from fastfuse.kernels import block_shape

    shapes: dict[Spec, Any] = {}
    tables: dict[Spec, list[int]] = {}  # flat rows, the last column a running tile count
    for copy in work:
        mode = _mode(copy)
        spec = _spec(copy)
        if spec not in shapes:
            shapes[spec] = block_shape.chosen(spec)
            tables[spec] = []
        table = tables[spec]
        tiles_before = table[job_table.J_TILE_END - job_table.JOB_COLUMNS] if table else 0
        table += _job_row(copy, mode, shapes[spec].tile_rows, tiles_before)
    for spec, flat in tables.items():
        jobs = np.array(flat, dtype=np.int64).reshape(-1, job_table.JOB_COLUMNS)
        worker = kernels.worker(*spec, shapes[spec])
        with _launch_lock:
            kernels.run_tiles(jobs, worker)
    _count("numba", len(work))


def warm_up(*, wait: bool = True) -> None:
    """Load or compile every kernel specialisation (numba caches them on disk for later processes).

    Args:
        wait: True loads (or compiles) them now, in this thread, first measuring which block
            shape suits this CPU where the cache holds no choice yet (``block_shape``; loads
            never measure: without a choice they use the default shape). False starts the
            loading in the background (a child process compiles, see
            :mod:`~fastfuse.kernels.kernel_loader`) and returns at once, measuring nothing;
            calls keep running on numpy until it is done.

    Returns:
        None; :func:`cache_report` then names the kernels loaded and where numba caches them.

    Raises:
        FuseError: the interpreter is exiting (when waiting); whatever compiling raised.

    Example:
        >>> import fastfuse
        >>> fastfuse.warm_up()  # seconds the first time (numba compiles), then from numba's cache
        >>> fastfuse.kernels.engine.cache_report()["kernels"]
        ['copy-1', 'copy-2', 'copy-4', 'copy-8', 'widen-2']
    """
    if wait:
        load_now(ALL_SPECS, calibrate=True)
        return
    with state.lock:
        state.seen_bytes = max(state.seen_bytes, LOAD_AFTER_BYTES)
    request(set(ALL_SPECS), 0)


def cache_report() -> dict[str, Any]:
    """Where numba caches the kernels (None: nowhere writable) and which are loaded."""
    return {"cache": kernel_cache.location(), "kernels": kernel_cache.spec_names(state.ready)}


def status() -> dict[str, Any]:
    """What the engine knows: bytes seen, copies each engine ran, kernels ready, loading (and
    the loader's phase), the failure that stopped loading."""
    with state.lock:
        return {
            "engine": _engine(),
            "seen_bytes": state.seen_bytes,
            "copies_run": dict(state.copies_run),
            "ready": sorted(state.ready),
            "loading": state.loader is not None,
            "phase": state.phase,
            "child_failure": state.child_failure,
            "failure": None if state.failure is None else f"{type(state.failure).__name__}: {state.failure}",
        }
