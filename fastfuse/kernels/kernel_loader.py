"""Loading the numba kernels in this process: in a background thread or now, exit-safe.

The engine (:mod:`fastfuse.kernels.engine`) decides *when* the kernels are worth loading; this
module loads them and keeps what the process knows about them in one object, :data:`state`.

Exit is safe at every moment: no background thread ever runs LLVM while the interpreter could
be torn down. When numba's cache does not hold the kernels, the loader thread has a child
process compile them into the cache (``python -m fastfuse.kernels.cache_filler``, see
``kernel_cache``) and only waits for it; then it loads them from the cache in process, one
kernel at a time, each inside an *LLVM section*. An exit hook (``atexit``) ends the child and
waits for the section in progress (one kernel's load, a fraction of a second; at most
``EXIT_WAIT``); no section starts once the hook has run. Where numba has nowhere to write a
cache, the kernels compile in process, and exit waits for the one being compiled (a few
seconds at most).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from fastfuse.errors import FuseError
from fastfuse.kernels import kernel_cache

__all__ = ["ALL_SPECS", "LOAD_AFTER_BYTES", "Spec", "load_here", "load_now", "request", "state"]

Spec = tuple[int, int]  # (0 copy or 1 widen, source element width): one kernel worker

LOAD_AFTER_BYTES = 32 << 20
ALL_SPECS: frozenset[Spec] = frozenset({(0, 1), (0, 2), (0, 4), (0, 8), (1, 2)})
EXIT_WAIT = 120.0  # seconds the exit hook waits for the kernel being loaded (or, without a cache, compiled)


class _Closing(Exception):
    """The interpreter is exiting: no LLVM work may start."""


class LoaderState:
    """What the process knows about the kernels. Every field is guarded by ``lock`` (a condition,
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
        self.copies_run = {"numba": 0, "numpy": 0}  # by engine, for the engine's status()
        self.in_llvm = 0  # threads inside an LLVM section
        self.closing = False  # the exit hook ran


state = LoaderState()


@contextlib.contextmanager
def _llvm_section() -> Iterator[None]:
    """Around anything that may run LLVM (importing the kernels, loading or compiling one):
    refused once the exit hook ran; the hook waits for the sections in progress."""
    with state.lock:
        if state.closing:
            raise _Closing
        state.in_llvm += 1
    try:
        yield
    finally:
        with state.lock:
            state.in_llvm -= 1
            state.lock.notify_all()


def _at_exit() -> None:
    """End the compiling child, wait (at most ``EXIT_WAIT``) for the LLVM section in progress."""
    with state.lock:
        state.closing = True
        child = state.child
    if child is not None:
        with contextlib.suppress(OSError):
            child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(EXIT_WAIT)
    deadline = time.monotonic() + EXIT_WAIT
    with state.lock:
        while state.in_llvm and time.monotonic() < deadline:
            state.lock.wait(deadline - time.monotonic())
        if state.in_llvm:
            print(f"fastfuse: kernels still loading after {EXIT_WAIT:.0f} s at exit", file=sys.stderr)


atexit.register(_at_exit)


def load_here(specs: Iterable[Spec], *, calibrate: bool = False) -> None:
    """Load (from numba's cache) or compile the driver and the workers of ``specs`` in this
    thread, one LLVM section each; mark them ready (``calibrate``: measure the block shapes the
    cache holds no choice for first). Raises ``_Closing`` once exiting."""
    with _llvm_section():
        kernel_cache.compile_here(())  # numba, the kernels module and the driver
    for spec in sorted(specs):
        if spec in state.ready and not calibrate:  # a warm-up still measures what the file lacks
            continue
        with _llvm_section():
            kernel_cache.compile_here((spec,), driver=False, calibrate=calibrate)
        with state.lock:
            state.ready = state.ready | {spec}


def load_now(specs: Iterable[Spec], *, calibrate: bool = False) -> None:
    """:func:`load_here` for a caller that needs the kernels (``FASTFUSE_ENGINE=numba``, ``warm_up``)."""
    try:
        load_here(specs, calibrate=calibrate)
    except _Closing:
        raise FuseError("the interpreter is exiting: the kernels can no longer be loaded") from None


def _fill_in_child(todo: list[Spec]) -> None:
    """Have a child process compile ``todo`` into numba's cache when it seems not to hold them
    (its failure is not ours to report: loading in process then compiles, and tells)."""
    if kernel_cache.looks_warm() or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return

    def remember(child: subprocess.Popen[bytes]) -> None:
        with state.lock:
            state.child = child
            closing = state.closing
        if closing:  # the exit hook ran before it could see this child
            child.kill()

    with state.lock:
        state.phase = "compiling in a child"
    try:
        code, stderr = kernel_cache.fill(todo, remember)
    finally:
        with state.lock:
            state.child = None
    if code not in (0, kernel_cache.NO_CACHE) and not state.closing:
        with state.lock:
            state.child_failure = f"exit {code}: {stderr.strip()[-300:]}"


def _background() -> None:
    """The loader thread: load what is wanted until nothing is left, then end."""
    try:
        while True:
            with state.lock:
                todo = sorted(state.wanted - state.ready)
                if not todo or state.failure is not None or state.closing:
                    return
            _fill_in_child(todo)
            with state.lock:
                state.phase = "loading"
            load_here(todo)
    except _Closing:
        return
    except BaseException as e:  # noqa: BLE001 - recorded; the process stays on numpy
        with state.lock:
            state.failure = e
    finally:
        with state.lock:
            state.loader = None
            state.phase = "idle"


def request(specs: set[Spec], nbytes: int) -> None:
    """Count ``nbytes``; once past ``LOAD_AFTER_BYTES``, have the loader thread load ``specs``."""
    with state.lock:
        state.seen_bytes += nbytes
        if state.seen_bytes < LOAD_AFTER_BYTES or state.failure is not None or state.closing:
            return
        state.wanted.update(specs)
        if state.loader is None and not specs <= state.ready:
            state.loader = threading.Thread(target=_background, name="fastfuse-kernel-loader", daemon=True)
            state.phase = "starting"
            state.loader.start()
