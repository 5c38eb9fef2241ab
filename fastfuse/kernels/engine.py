"""Which engine moves the bits: numpy now, or the numba kernels once they are loaded.

Every fusion ends in :func:`run_groups`. Two engines give the same bits: the numba kernels
(``_kernels``: parallel, at memory speed) and numpy (``_numpy_path``: one thread, 4-8x slower,
nothing to load). Loading the kernels costs about 0.5 s in a fresh process when numba's on-disk
cache is warm, and several seconds when it is cold (numba compiles them: the first run after an
install, or every run where the cache is not kept). The policy, per process:

- Output bytes asked for are counted. Until ``LOAD_AFTER_BYTES`` (whisper-tiny's QKV is 14 MB),
  everything runs on numpy and numba is never imported: a small job costs what numpy costs.
- Past it, a background thread loads the kernels a job needs (from the cache, or compiling
  them). When numba's cache seems to hold them (file names tell, without importing numba),
  the call waits for them (about 0.5 s, at most ``WARM_WAIT``). Otherwise calls keep running on
  numpy while they compile; a call in progress hands its remaining groups to the kernels the
  moment they are ready; every later call uses them. No call waits for a compile, so a first
  run is never slower than numpy, and a per-layer loop reaches kernel speed as soon as the
  process has seen enough work to pay for it, whatever the size of each call.
- ``FASTFUSE_ENGINE=numba`` loads (or compiles) the kernels in the calling thread and always
  uses them; ``FASTFUSE_ENGINE=numpy`` never loads numba. :func:`warm_up` compiles every
  kernel into numba's cache (``fastfuse warmup``), so that the next process starts warm.

Exit is safe at every moment: no background thread ever runs LLVM while the interpreter could
be torn down. When numba's cache does not hold the kernels, the loader thread has a child
process compile them into the cache (``python -m fastfuse.kernels.cache_filler``, see ``kernel_cache``)
and only waits for it; then it loads them from the cache in process, one kernel at a time,
each inside an *LLVM section*. An exit hook (``atexit``) ends the child and waits for the
section in progress (one kernel's load, a fraction of a second; at most ``EXIT_WAIT``); no
section starts once the hook has run. Where numba has nowhere to write a cache, the kernels
compile in process, and exit waits for the one being compiled (a few seconds at most).

Kernel launches take turns (one lock): each already uses every core, and numba's workqueue
threading layer (used where neither TBB nor OpenMP is installed) aborts the process on
concurrent launches.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fastfuse.dtypes import WIDENINGS
from fastfuse.errors import FuseError
from fastfuse.kernels import kernel_cache

__all__ = [
    "ENGINES",
    "LOAD_AFTER_BYTES",
    "Expectation",
    "Group",
    "cache_report",
    "expect",
    "impatient",
    "run_groups",
    "status",
    "warm_up",
]

Group = tuple[Sequence[np.ndarray], np.ndarray]  # parts [o_j, in] -> output [in, sum(o_j)]
Spec = tuple[int, int]  # (0 copy or 1 widen, source element width): one kernel worker

LOAD_AFTER_BYTES = 32 << 20
ALL_SPECS: frozenset[Spec] = frozenset({(0, 1), (0, 2), (0, 4), (0, 8), (1, 2)})
ENGINES = ("auto", "numba", "numpy")
EXIT_WAIT = 120.0  # seconds the exit hook waits for the kernel being loaded (or, without a cache, compiled)


class _Closing(Exception):
    """The interpreter is exiting: no LLVM work may start."""


class _EngineState:
    """What the engine knows in this process. Every field is guarded by ``lock`` (a condition,
    never held while compiling), except ``ready``, which is replaced, never mutated, and read
    without it."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.seen_bytes = 0
        self.wanted: set[Spec] = set()
        self.ready: frozenset[Spec] = frozenset()
        self.loader: threading.Thread | None = None
        self.phase = "idle"  # the loader's: "starting", "compiling in a child", "loading", "idle"
        self.child: subprocess.Popen[bytes] | None = None
        self.failure: BaseException | None = None
        self.child_failure: str | None = None  # how the compiling child failed (then: compiled in process)
        self.groups_moved = {"numba": 0, "numpy": 0}  # by engine, for status()
        self.in_llvm = 0  # threads inside an LLVM section
        self.closing = False  # the exit hook ran


_state = _EngineState()
_launch_lock = threading.Lock()


@contextlib.contextmanager
def _llvm_section() -> Iterator[None]:
    """Around anything that may run LLVM (importing the kernels, loading or compiling one):
    refused once the exit hook ran; the hook waits for the sections in progress."""
    with _state.lock:
        if _state.closing:
            raise _Closing
        _state.in_llvm += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.in_llvm -= 1
            _state.lock.notify_all()


def _at_exit() -> None:
    """End the compiling child, wait (at most ``EXIT_WAIT``) for the LLVM section in progress."""
    with _state.lock:
        _state.closing = True
        child = _state.child
    if child is not None:
        with contextlib.suppress(OSError):
            child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(EXIT_WAIT)
    deadline = time.monotonic() + EXIT_WAIT
    with _state.lock:
        while _state.in_llvm and time.monotonic() < deadline:
            _state.lock.wait(deadline - time.monotonic())
        if _state.in_llvm:
            print(f"fastfuse: kernels still loading after {EXIT_WAIT:.0f} s at exit", file=sys.stderr)


atexit.register(_at_exit)


def _engine() -> str:
    choice = os.environ.get("FASTFUSE_ENGINE", "auto") or "auto"
    if choice not in ENGINES:
        raise FuseError(f"FASTFUSE_ENGINE={choice!r}: expected one of {list(ENGINES)}")
    return choice


def _mode(parts: Sequence[np.ndarray], out: np.ndarray) -> int:
    """The kernels' conversion mode: 0 copies, else a widening (``_dtypes.WIDENINGS``)."""
    source = parts[0].dtype
    return 0 if source == out.dtype else WIDENINGS[(source.name, out.dtype.name)]


def _spec(parts: Sequence[np.ndarray], out: np.ndarray) -> Spec:
    return (min(_mode(parts, out), 1), parts[0].dtype.itemsize)


def _kernels() -> ModuleType:
    from fastfuse.kernels import numba_kernels

    return numba_kernels


def _load(specs: Iterable[Spec]) -> None:
    """Load (from numba's cache) or compile the driver and the workers of ``specs`` in this
    thread, one LLVM section each; mark them ready. Raises :class:`_Closing` once exiting."""
    with _llvm_section():
        kernel_cache.compile_here(())  # numba, the kernels module and the driver
    for spec in sorted(specs):
        if spec in _state.ready:
            continue
        with _llvm_section():
            kernel_cache.compile_here((spec,), driver=False)
        with _state.lock:
            _state.ready = _state.ready | {spec}


def _load_now(specs: Iterable[Spec]) -> None:
    """:func:`_load` for a caller that needs the kernels (``FASTFUSE_ENGINE=numba``, ``warm_up``)."""
    try:
        _load(specs)
    except _Closing:
        raise FuseError("the interpreter is exiting: the kernels can no longer be loaded") from None


def _fill_in_child(todo: list[Spec]) -> None:
    """Have a child process compile ``todo`` into numba's cache when it seems not to hold them
    (its failure is not ours to report: loading in process then compiles, and tells)."""
    if kernel_cache.looks_warm() or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return

    def remember(child: subprocess.Popen[bytes]) -> None:
        with _state.lock:
            _state.child = child
            closing = _state.closing
        if closing:  # the exit hook ran before it could see this child
            child.kill()

    with _state.lock:
        _state.phase = "compiling in a child"
    try:
        code, stderr = kernel_cache.fill(todo, remember)
    finally:
        with _state.lock:
            _state.child = None
    if code not in (0, kernel_cache.NO_CACHE) and not _state.closing:
        with _state.lock:
            _state.child_failure = f"exit {code}: {stderr.strip()[-300:]}"


def _background() -> None:
    """The loader thread: load what is wanted until nothing is left, then end."""
    try:
        while True:
            with _state.lock:
                todo = sorted(_state.wanted - _state.ready)
                if not todo or _state.failure is not None or _state.closing:
                    return
            _fill_in_child(todo)
            with _state.lock:
                _state.phase = "loading"
            _load(todo)
    except _Closing:
        return
    except BaseException as e:  # noqa: BLE001 - recorded; the process stays on numpy
        with _state.lock:
            _state.failure = e
    finally:
        with _state.lock:
            _state.loader = None
            _state.phase = "idle"


def _request(specs: set[Spec], nbytes: int) -> None:
    """Count ``nbytes``; once past ``LOAD_AFTER_BYTES``, have the loader thread load ``specs``."""
    with _state.lock:
        _state.seen_bytes += nbytes
        if _state.seen_bytes < LOAD_AFTER_BYTES or _state.failure is not None or _state.closing:
            return
        _state.wanted.update(specs)
        if _state.loader is None and not specs <= _state.ready:
            _state.loader = threading.Thread(target=_background, name="fastfuse-kernel-loader", daemon=True)
            _state.phase = "starting"
            _state.loader.start()


WARM_WAIT = 2.0  # seconds a call may wait for kernels numba's cache seems to hold (loading: ~0.5 s)
_caller = threading.local()


@contextlib.contextmanager
def impatient() -> Iterator[None]:
    """Calls in this block never wait for loading kernels: they start on numpy and hand over.
    For a caller with other work in flight (a file sink copying), for whom starting now is
    worth more than finishing sooner."""
    before = getattr(_caller, "impatient", False)
    _caller.impatient = True
    try:
        yield
    finally:
        _caller.impatient = before


def _wait_if_cached(expected: Expectation) -> bool:
    """Wait (up to ``WARM_WAIT``) for kernels that are loading when numba's cache seems to hold
    them: loading from the cache beats numpy on any call worth loading for, and numpy running
    meanwhile would only slow the loader down (they share the GIL). True if they are ready."""
    if not expected.pending() or not _cache_looked_warm():
        return False
    deadline = time.monotonic() + WARM_WAIT
    while expected.pending() and time.monotonic() < deadline:
        time.sleep(0.005)
    return expected.specs <= _state.ready


_cache_looked_warm = functools.cache(kernel_cache.looks_warm)  # at the first call that asked


class Expectation:
    """The kernels a caller is about to need (see :func:`expect`)."""

    def __init__(self, specs: frozenset[Spec]) -> None:
        self.specs = specs

    def pending(self) -> bool:
        """Are they still loading (so that waiting a little would let the kernels do the work)?"""
        with _state.lock:
            return not self.specs <= _state.ready and _state.loader is not None and _state.failure is None


def expect(conversions: Iterable[tuple[np.dtype[Any], np.dtype[Any]]], nbytes: int) -> Expectation:
    """A caller is about to fuse ``nbytes`` with these (source, output) dtypes: count them now,
    so that the kernels they need start loading in the background while it does other work
    (a file sink copies the originals first, and computes once they are loaded)."""
    specs = frozenset((0 if source == out else 1, source.itemsize) for source, out in conversions)
    if _engine() == "auto" and nbytes:
        _request(set(specs), nbytes)
    return Expectation(specs)


def run_groups(groups: Sequence[Group]) -> None:
    """Fill each group's output (``[in, sum(o_j)]``, C-contiguous) from its parts.

    Trusts its input: shapes, dtypes and conversions were validated by the caller. On the
    kernels, all groups go through one parallel call per worker kind.
    """
    work = [(parts, out) for parts, out in groups if out.size]
    if not work:
        return
    specs = {_spec(parts, out) for parts, out in work}
    engine = _engine()
    if engine == "numba":
        if not specs <= _state.ready:
            _load_now(specs)
        _run_kernels(work)
        return
    if engine == "auto" and specs <= _state.ready:
        _run_kernels(work)
        return
    if engine == "auto":
        _request(specs, sum(out.nbytes for _, out in work))
        if not getattr(_caller, "impatient", False) and _wait_if_cached(Expectation(frozenset(specs))):
            _run_kernels(work)
            return
    from fastfuse.kernels.numpy_engine import move_with_numpy

    # Largest first: if the kernels arrive meanwhile, the many small groups (biases) go to them in
    # one launch instead of each paying a hand-over of the GIL to the loader thread.
    work.sort(key=lambda group: group[1].nbytes, reverse=True)
    for index, group in enumerate(work):
        if engine == "auto" and index and specs <= _state.ready:  # loaded meanwhile: the rest at kernel speed
            _run_kernels(work[index:])
            return
        move_with_numpy([group])
        _count("numpy", 1)


def _count(engine: str, groups: int) -> None:
    with _state.lock:
        _state.groups_moved[engine] += groups


def _run_kernels(work: Sequence[Group]) -> None:
    """One job table per worker, one parallel launch each."""
    kernels = _kernels()
    tables: dict[Spec, list[list[int]]] = {}
    for parts, out in work:
        mode = _mode(parts, out)
        rows = tables.setdefault(_spec(parts, out), [])
        dst = _address(out)
        for part in parts:
            tiling = kernels.tiling(part.strides[0], part.strides[1], part.dtype.itemsize, mode)
            rows.append(
                [
                    _address(part),
                    part.strides[0],
                    part.strides[1],
                    part.shape[0],
                    part.shape[1],
                    dst,
                    out.strides[0],
                    tiling,
                    mode,
                    kernels.tile_count(part.shape[0], part.shape[1], tiling),
                ]
            )
            dst += part.shape[0] * out.dtype.itemsize
    for spec, rows in tables.items():
        jobs = np.array(rows, dtype=np.int64).reshape(-1, kernels.JOB_COLUMNS)
        np.cumsum(jobs[:, kernels.J_TILE_END], out=jobs[:, kernels.J_TILE_END])
        worker = kernels.worker(*spec)
        with _launch_lock:
            kernels.run_tiles(jobs, worker)
    _count("numba", len(work))


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def warm_up(*, wait: bool = True) -> None:
    """Load or compile every kernel specialisation (numba caches them on disk for later processes).

    ``wait=False`` does it in the background (a child process compiles, see the module's
    docstring) and returns at once; calls keep running on numpy until it is done. Raises (when
    waiting) whatever compiling raised.
    """
    if wait:
        _load_now(ALL_SPECS)
        return
    with _state.lock:
        _state.seen_bytes = max(_state.seen_bytes, LOAD_AFTER_BYTES)
    _request(set(ALL_SPECS), 0)


def cache_report() -> dict[str, Any]:
    """Where numba caches the kernels (None: nowhere writable) and which are loaded."""
    return {"cache": kernel_cache.location(), "kernels": kernel_cache.spec_names(_state.ready)}


def status() -> dict[str, Any]:
    """What the engine knows: bytes seen, groups each engine moved, kernels ready, loading (and
    the loader's phase), the failure that stopped loading."""
    with _state.lock:
        return {
            "engine": _engine(),
            "seen_bytes": _state.seen_bytes,
            "groups_moved": dict(_state.groups_moved),
            "ready": sorted(_state.ready),
            "loading": _state.loader is not None,
            "phase": _state.phase,
            "child_failure": _state.child_failure,
            "failure": None if _state.failure is None else f"{type(_state.failure).__name__}: {_state.failure}",
        }
