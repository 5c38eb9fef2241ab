"""Which block shape each kernel worker uses on this CPU: measured once, kept beside the kernels.

The workers have one code path whose parameters (:class:`~fastfuse.kernels.job_table.Shape`:
bytes per block row vector, source rows per tile) are constants of the compiled code. Which
shape is fastest depends on the CPU and on the instructions numba generates for it (on one
Zen 4, 32-byte vectors beat 64-byte ones for f16 by 8% under AVX-512 code and by 23% under AVX2
code: ``docs/design.md``), so it is measured, not assumed: :func:`calibrate` compiles each candidate
of a worker, times it on a synthetic transpose larger than the caches (a few tenths of a
second for all of them once compiled), and writes the winner to a *choice file* in numba's
cache folder for the kernels, keyed by what numba keys its own cache on (target triple, CPU
name and features) plus the numba version and the kernels' source. A missing, stale or
unreadable choice file reads as "not measured": the default shape, until the next ``warm_up()``
(``fastfuse warmup``) measures again; a load never measures (a second or two on its path). No
shape changes a single bit of the result.

``FASTFUSE_BLOCK_SHAPE=v32-t64`` (a :meth:`Shape.name`) forces one shape for every worker
(tests run each shape this way on any host). Without numba's cache, or with
``NUMBA_DISABLE_JIT=1``, nothing is measured: the default shape.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from typing import Any

import numba
import numpy as np

from fastfuse.errors import FuseError
from fastfuse.kernels import intrinsics, job_table, kernel_cache, numba_kernels
from fastfuse.kernels.job_table import DEFAULT_SHAPE, SHAPES, Shape

__all__ = ["CALIBRATED", "CANDIDATES", "calibrate", "choice_file", "chosen", "target"]

Spec = tuple[int, int]  # (0 copy or 1 widen, source element width)

# The workers whose shape is measured, and the shapes each may take (the default first): the
# copies of 2-byte (f16, bf16) and 4-byte (f32) elements, where the shapes' speeds differ most
# from CPU to CPU and code generation to code generation. Each candidate costs a compile at the
# first warm-up (about a second), so the widening and the rarer widths keep the default.
CANDIDATES: dict[Spec, tuple[Shape, ...]] = {
    (0, 2): (DEFAULT_SHAPE, Shape(64, 128, True, 2), Shape(32, 128, True, 2)),
    (0, 4): (DEFAULT_SHAPE, Shape(64, 64, True, 2), Shape(32, 64, True, 2)),
}
CALIBRATED: frozenset[Spec] = frozenset(CANDIDATES)
FORCE_VARIABLE = "FASTFUSE_BLOCK_SHAPE"
SOURCE_BYTES = 48 << 20  # per calibration transpose: past the last-level caches measured (32 MB)
ROUNDS = 5
# A candidate replaces the default only when it is this much faster: on shared machines two
# shapes' minima differ by a few percent from run to run, and a choice made on noise is kept.
MARGIN = 0.03

_JIT_DISABLED = bool(numba.config.DISABLE_JIT)  # type: ignore[attr-defined]
_lock = threading.Lock()
_choices: dict[str, dict[Spec, Shape]] = {}  # choice file path -> choices read or measured


@functools.cache
def target() -> tuple[str, ...]:
    """What numba keys compiled code on: target triple, CPU name, CPU features (fixed for the
    process: computed once, as :func:`chosen` runs on every kernel call)."""
    from numba.core.registry import cpu_target

    return tuple(str(part) for part in cpu_target.target_context.codegen().magic_tuple())


@functools.cache
def _key() -> dict[str, Any]:
    sources = hashlib.sha1()
    for module in (numba_kernels, job_table, intrinsics):
        with open(str(module.__file__), "rb") as f:
            sources.update(f.read())
    return {"target": list(target()), "numba": numba.__version__, "kernels": sources.hexdigest()}


@functools.cache
def choice_file() -> str | None:
    """The choice file for this target (None: numba caches nothing, so nothing is kept). Fixed
    for the process, like numba's cache folder (looked up once: every kernel launch asks)."""
    folder = kernel_cache.location()
    if folder is None:
        return None
    return os.path.join(folder, _file_name())


@functools.cache
def _file_name() -> str:
    return f"block-shapes-{hashlib.sha1(json.dumps(target()).encode()).hexdigest()[:16]}.json"


def _document(path: str) -> dict[str, Any]:
    """The choice file at ``path``; {} when it is missing, unreadable, or for another key."""
    try:
        with open(path) as f:
            found = json.load(f)
        return found if isinstance(found, dict) and found.get("key") == _key() else {}
    except (OSError, ValueError):
        return {}


def _read(path: str) -> dict[Spec, Shape]:
    """The choices in ``path`` (see :func:`_document`); entries that name no known shape are left out."""
    names = {shape.name(): shape for shape in SHAPES}
    try:
        return {
            (int(kind), int(width)): names[name]
            for kind, width, name in _document(path).get("choices", [])
            if (int(kind), int(width)) in CALIBRATED and name in names
        }
    except (ValueError, TypeError):
        return {}


def _forced() -> Shape | None:
    name = os.environ.get(FORCE_VARIABLE, "")
    if not name:
        return None
    for shape in SHAPES:
        if shape.name() == name:
            return shape
    raise FuseError(f"{FORCE_VARIABLE}={name!r}: expected one of {[shape.name() for shape in SHAPES]}")


def chosen(spec: Spec) -> Shape:
    """The shape of ``spec``'s worker here: forced, measured (choice file), else the default."""
    forced = _forced()
    if forced is not None:
        return forced
    if spec not in CALIBRATED or _JIT_DISABLED:
        return DEFAULT_SHAPE
    path = choice_file()
    if path is None:
        return DEFAULT_SHAPE
    with _lock:
        if path not in _choices:
            _choices[path] = _read(path)
        return _choices[path].get(spec, DEFAULT_SHAPE)


# The calibration parts' sides: a power of two and not (whisper large's 1280), because strides
# of a power of two map rows onto few cache sets and the shapes' order can differ between them.
SIDES = (1024, 1280)


def _problem(spec: Spec) -> tuple[np.ndarray[Any, Any], list[np.ndarray[Any, Any]], list[np.ndarray[Any, Any]]]:
    """A job table for ``SOURCE_BYTES`` of square parts fused side by side (like QKV), half of
    them of each of :data:`SIDES`, and the arrays it points into (kept alive by the caller). The
    sources hold varied bits: on one EPYC, lines of one repeated value were written faster than
    any other, which favours the shapes whose stores are the slower half."""
    widen, width = spec
    mode = job_table.MODE_F16_TO_F32 if widen else job_table.MODE_COPY
    rows, sources, outs = [], [], []
    for side in SIDES:
        count = max(1, SOURCE_BYTES // len(SIDES) // (side * side * width))
        bits = np.arange(count * side * side, dtype=np.uint32) * np.uint32(2654435761)
        source = (bits >> np.uint32(11)).astype(f"u{width}").reshape(count, side, side)
        out = np.zeros((side, count * side), np.uint32 if widen else source.dtype)
        rows += [
            [
                part.ctypes.data,
                side * width,
                width,
                side,
                side,
                out.ctypes.data + j * side * out.itemsize,
                out.strides[0],
                job_table.TILING_BLOCKS,
                mode,
                0,
            ]
            for j, part in enumerate(source)
        ]
        sources.append(source)
        outs.append(out)
    return np.array(rows, np.int64), sources, outs


def _tiled(jobs: np.ndarray[Any, Any], shape: Shape) -> np.ndarray[Any, Any]:
    """A copy of ``jobs`` whose ``J_TILE_END`` counts the tiles of a worker of ``shape``."""
    table = jobs.copy()
    table[:, job_table.J_TILE_END] = np.cumsum(
        [job_table.tile_count(int(r[3]), int(r[4]), int(r[7]), shape.tile_rows) for r in jobs]
    )
    return table


def _measure(spec: Spec, shapes: tuple[Shape, ...], rounds: int) -> dict[Shape, float]:
    """Min-of-``rounds`` seconds of each shape's worker on one problem, taking turns."""
    jobs, source, out = _problem(spec)
    tables = {shape: (_tiled(jobs, shape), numba_kernels.worker(spec[0], spec[1], shape)) for shape in shapes}
    best = dict.fromkeys(shapes, float("inf"))
    numba_kernels.run_tiles(*tables[shapes[0]])  # first touch of the output
    for turn in range(rounds):
        for shape in shapes if turn % 2 == 0 else shapes[::-1]:
            start = time.perf_counter()
            numba_kernels.run_tiles(*tables[shape])
            best[shape] = min(best[shape], time.perf_counter() - start)
    del source, out
    return best


def calibrate(specs: set[Spec] | frozenset[Spec], rounds: int = ROUNDS) -> dict[Spec, Shape]:
    """Measure the :data:`CANDIDATES` of each spec of ``specs`` in :data:`CALIBRATED` that the
    choice file does not hold yet, and record the fastest (a tie, within :data:`MARGIN`, keeps the default). Returns
    the choices of ``specs``. Nothing is measured without numba's cache, with JIT disabled or
    with a forced shape."""
    wanted = sorted(set(specs) & CALIBRATED)
    path = choice_file()
    if path is None or _JIT_DISABLED or _forced() is not None:
        return {spec: chosen(spec) for spec in specs}
    with _lock:
        choices = dict(_read(path))
        todo = [spec for spec in wanted if spec not in choices]
        figures = _figures(path)
        for spec in todo:
            shapes = CANDIDATES[spec]
            seconds = _measure(spec, shapes, rounds)
            choices[spec] = _fastest(seconds)
            figures[kernel_cache.spec_names([spec])[0]] = {shape.name(): seconds[shape] for shape in shapes}
        if todo:
            _write(path, choices, figures)
        _choices[path] = choices
    return {spec: chosen(spec) for spec in specs}


def _fastest(seconds: dict[Shape, float]) -> Shape:
    """The fastest shape, unless it beats the default by less than :data:`MARGIN` (a tie)."""
    best = min(seconds, key=seconds.__getitem__)
    return best if seconds[best] < seconds[DEFAULT_SHAPE] * (1 - MARGIN) else DEFAULT_SHAPE


def _figures(path: str) -> dict[str, dict[str, float]]:
    """The timings a valid choice file already records (kept when a spec is added)."""
    seconds = _document(path).get("seconds", {})
    return dict(seconds) if isinstance(seconds, dict) else {}


def _write(path: str, choices: dict[Spec, Shape], figures: dict[str, dict[str, float]]) -> None:
    """Write the choice file atomically (a reader sees the old one or the new one, whole)."""
    document = {
        "key": _key(),
        "choices": [[kind, width, shape.name()] for (kind, width), shape in sorted(choices.items())],
        "seconds": figures,
    }
    temporary = f"{path}.{os.getpid()}.partial"
    with open(temporary, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(temporary, path)
