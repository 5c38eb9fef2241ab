"""numba's on-disk cache of our kernels: where it is, whether it seems to hold them, what this
process loaded from it, and filling it from a child process.

:func:`places` and :func:`looks_warm` never import numba (a small job must not pay for it);
they follow numba's own naming (``numba.core.caching._CacheLocator.get_suitable_cache_subpath``:
``<folder name>_<sha1 of the folder>``, checked against numba's locator by the tests).
:func:`location` and :func:`hits` read numba's objects and import the kernels.

:func:`fill` runs ``python -m fastfuse.kernels.cache_filler copy-2 widen-2 ...`` (from the same
package folder) and waits for it: the child compiles those kernels into the
cache in its own main thread, so the parent process never has LLVM running in a background
thread while it compiles (the parent then loads the kernels from the cache, a fraction of a
second). Exit codes: 0 filled, :data:`NO_CACHE` when numba has nowhere to write (the parent
must compile in process), anything else a failure (the parent compiles in process and
reports what that raises).
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

__all__ = ["NO_CACHE", "PACKAGE", "compile_here", "fill", "hits", "location", "looks_warm", "places", "spec_names"]

Spec = tuple[int, int]  # (0 copy or 1 widen, source element width)
NO_CACHE = 3  # the child's exit code when numba has no writable cache folder
PACKAGE = os.path.dirname(os.path.abspath(__file__))  # fastfuse/kernels, where numba_kernels.py lives


def spec_names(specs: Iterable[Spec]) -> list[str]:
    """``[(0, 2), (1, 2)]`` -> ``["copy-2", "widen-2"]``, sorted."""
    return [f"{'widen' if kind else 'copy'}-{width}" for kind, width in sorted(specs)]


def places() -> list[str]:
    """The folders numba would look in for the kernels' cache, in its order (without numba)."""
    subpath = f"{os.path.basename(PACKAGE)}_{hashlib.sha1(PACKAGE.encode()).hexdigest()}"
    if os.environ.get("NUMBA_CACHE_DIR"):
        return [os.path.join(os.environ["NUMBA_CACHE_DIR"], subpath)]
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return [os.path.join(PACKAGE, "__pycache__"), os.path.join(user_cache, "numba", subpath)]


def looks_warm() -> bool:
    """Does the cache seem to hold the kernels (the driver's index exists)? A guess from file
    names: a stale cache (other numba, other CPU) reads as warm, and loading then compiles."""
    return any(glob.glob(os.path.join(place, "numba_kernels._run_tiles-*.nbi")) for place in places())


def location() -> str | None:
    """The folder numba caches the kernels in (None: caching is off, nowhere was writable).

    Read from numba's cache object (not a public API: any surprise there reads as None).
    """
    from fastfuse.kernels import numba_kernels

    try:
        cache = numba_kernels.run_tiles._cache
        return str(cache.cache_path) if type(cache).__name__ != "NullCache" else None
    except AttributeError:
        return None


def hits() -> dict[str, int]:
    """How many kernels this process loaded from numba's cache (the rest, if any, it compiled):
    the driver, and each worker in the block shape chosen here (``block_shape``)."""
    from fastfuse.kernels import block_shape, numba_kernels

    driver = numba_kernels.run_tiles
    found = {"driver": sum(driver.stats.cache_hits.values()) if hasattr(driver, "stats") else 0}
    with numba_kernels._WORKERS_LOCK:
        compiled_workers = list(numba_kernels._COMPILED.items())
    for (kind, width, shape), compiled in compiled_workers:
        if shape == block_shape.chosen((int(kind == "widen"), width)):
            found[f"{kind}-{width}"] = compiled.cache_hits
    return found


def fill(specs: Iterable[Spec], started: Callable[[subprocess.Popen[bytes]], None]) -> tuple[int, str]:
    """Compile the driver and the workers of ``specs`` into the cache in a child process; wait
    for it. ``started`` gets the child first (so that an exit hook can end it). Returns the
    child's exit code and the tail of its stderr."""
    environment = dict(os.environ)
    root = os.path.dirname(os.path.dirname(PACKAGE))  # the folder holding this fastfuse package
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "fastfuse.kernels.cache_filler", "--package", PACKAGE, *spec_names(specs)]
    child = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment
    )
    started(child)
    _, stderr = child.communicate()
    return child.returncode, stderr.decode(errors="replace")[-2000:]


def compile_here(specs: Iterable[Spec], *, driver: bool = True, calibrate: bool = False) -> None:
    """Compile (or load from the cache) the driver (unless ``driver=False``) and the workers of
    ``specs`` in this thread, each in the block shape chosen for this CPU; ``calibrate`` measures
    the shapes first where the cache holds no choice yet (``block_shape.calibrate``: a second or
    two, so only an explicit warm-up asks for it, never a load)."""
    import numpy as np

    from fastfuse.kernels import block_shape, job_table, numba_kernels

    if driver:  # one driver for every width
        numba_kernels.run_tiles(np.zeros((0, job_table.JOB_COLUMNS), np.int64), 0)
    specs = set(specs)
    shapes = block_shape.calibrate(specs) if calibrate else {spec: block_shape.chosen(spec) for spec in specs}
    for spec, shape in shapes.items():
        numba_kernels.worker(*spec, shape)
