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

Kernel launches take turns (one lock): each already uses every core, and numba's workqueue
threading layer (used where neither TBB nor OpenMP is installed) aborts the process on
concurrent launches.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fastfuse.dtypes import WIDENINGS
from fastfuse.errors import FuseError

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

_state_lock = threading.Lock()  # guards the fields below; never held while compiling
_seen_bytes = 0
_wanted: set[Spec] = set()
_ready: frozenset[Spec] = frozenset()  # replaced, never mutated: read without the lock
_loader: threading.Thread | None = None
_failure: BaseException | None = None
_groups_moved = {"numba": 0, "numpy": 0}  # by engine, for status()
_launch_lock = threading.Lock()


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
    """Load or compile the driver and the workers of ``specs`` in this thread; mark them ready."""
    global _ready
    kernels = _kernels()
    kernels.run_tiles(np.zeros((0, kernels.JOB_COLUMNS), np.int64), 0)  # the driver, for every width
    for spec in specs:
        kernels.worker(*spec)
        with _state_lock:
            _ready = _ready | {spec}


def _background() -> None:
    """The loader thread: load what is wanted until nothing is left, then end."""
    global _loader, _failure
    while True:
        with _state_lock:
            todo = sorted(_wanted - _ready)
            if not todo or _failure is not None:
                _loader = None
                return
        try:
            _load(todo)
        except BaseException as e:  # noqa: BLE001 - recorded; the process stays on numpy
            with _state_lock:
                _failure = e


def _request(specs: set[Spec], nbytes: int) -> None:
    """Count ``nbytes``; once past ``LOAD_AFTER_BYTES``, have the loader thread load ``specs``."""
    global _seen_bytes, _loader
    with _state_lock:
        _seen_bytes += nbytes
        if _seen_bytes < LOAD_AFTER_BYTES or _failure is not None:
            return
        _wanted.update(specs)
        if _loader is None and not specs <= _ready:
            _loader = threading.Thread(target=_background, name="fastfuse-kernel-loader", daemon=True)
            _loader.start()


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
    if not expected.pending() or not _cache_looks_warm():
        return False
    deadline = time.monotonic() + WARM_WAIT
    while expected.pending() and time.monotonic() < deadline:
        time.sleep(0.005)
    return expected.specs <= _ready


@functools.cache
def _cache_looks_warm() -> bool:
    """Does numba's on-disk cache seem to hold the kernels? A guess from file names, without
    importing numba: a stale cache (other numba, other CPU) makes the caller wait ``WARM_WAIT``
    at most once, then it runs on numpy while the kernels compile."""
    package = os.path.dirname(os.path.abspath(__file__))
    subpath = f"{os.path.basename(package)}_{hashlib.sha1(package.encode()).hexdigest()}"  # numba's naming
    if os.environ.get("NUMBA_CACHE_DIR"):
        places = [os.path.join(os.environ["NUMBA_CACHE_DIR"], subpath)]
    else:
        user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        places = [os.path.join(package, "__pycache__"), os.path.join(user_cache, "numba", subpath)]
    return any(glob.glob(os.path.join(place, "numba_kernels._run_tiles-*.nbi")) for place in places)


class Expectation:
    """The kernels a caller is about to need (see :func:`expect`)."""

    def __init__(self, specs: frozenset[Spec]) -> None:
        self.specs = specs

    def pending(self) -> bool:
        """Are they still loading (so that waiting a little would let the kernels do the work)?"""
        with _state_lock:
            return not self.specs <= _ready and _loader is not None and _failure is None


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
        if not specs <= _ready:
            _load(specs)
        _run_kernels(work)
        return
    if engine == "auto" and specs <= _ready:
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
        if engine == "auto" and index and specs <= _ready:  # loaded meanwhile: the rest at kernel speed
            _run_kernels(work[index:])
            return
        move_with_numpy([group])
        _count("numpy", 1)


def _count(engine: str, groups: int) -> None:
    with _state_lock:
        _groups_moved[engine] += groups


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

    ``wait=False`` does it in the background thread and returns at once; calls keep running on
    numpy until it is done. Raises (when waiting) whatever compiling raised.
    """
    if wait:
        _load(sorted(ALL_SPECS))
        return
    global _seen_bytes
    with _state_lock:
        _seen_bytes = max(_seen_bytes, LOAD_AFTER_BYTES)
    _request(set(ALL_SPECS), 0)


def cache_report() -> dict[str, Any]:
    """Where numba caches the kernels (None: nowhere writable) and which are loaded."""
    kernels = _kernels()
    return {
        "cache": kernels.cache_location(),
        "kernels": [f"{'widen' if k else 'copy'}-{w}" for k, w in sorted(_ready)],
    }


def status() -> dict[str, Any]:
    """What the engine knows: bytes seen, groups each engine moved, kernels ready, loading, the
    failure that stopped loading."""
    with _state_lock:
        return {
            "engine": _engine(),
            "seen_bytes": _seen_bytes,
            "groups_moved": dict(_groups_moved),
            "ready": sorted(_ready),
            "loading": _loader is not None,
            "failure": None if _failure is None else f"{type(_failure).__name__}: {_failure}",
        }
