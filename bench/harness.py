"""What every benchmark needs: generated checkpoints (cached), fresh processes, peak memory,
and min-of-N timing. Shared by ``cases.py`` (what is measured) and ``report.py`` (the table).

This module imports only the standard library and numpy at the top: child processes import it
to run a file operation, and what it imports would count in their memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
QUICK = False  # report.py --quick: one round of everything, one peak-memory run


@dataclass(frozen=True)
class Impl:
    """One implementation of a case."""

    run: Callable[[], Any]  # what is timed
    setup: Callable[[], None] | None = None  # untimed, before each run
    extra: Callable[[], dict[str, float]] | None = None  # measured once, untimed (e.g. peak RSS)
    self_timed: bool = False  # run() returns its own seconds (timed inside a child)


def cache_dir() -> Path:
    path = Path(os.environ.get("FASTFUSE_BENCH_CACHE") or BENCH.parent / ".bench-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_file(name: str = "bench-output.safetensors") -> Path:
    """Where file-to-file cases write (replaced by every run, removed at the end)."""
    return cache_dir() / name


def np_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)


def _cached(path: Path, write: Callable[[Path], None]) -> Path:
    """``path``, written once by ``write(temporary)`` and renamed into place."""
    if not path.exists():
        temp = path.with_name(path.name + ".partial")
        write(temp)
        temp.rename(path)
    return path


def checkpoint_file(size: str, dtype: str = "float16") -> Path:
    """The cached ``whisper-{size}-{dtype}.safetensors`` (Hugging Face names, random values)."""

    def write(temp: Path) -> None:
        from safetensors.numpy import save_file

        from fastfuse.cli.demo import whisper_checkpoint

        save_file(whisper_checkpoint(size, np_dtype(dtype)), str(temp), metadata={"format": "pt"})

    return _cached(cache_dir() / f"whisper-{size}-{dtype}-v2.safetensors", write)


def torch_checkpoint_file(size: str, dtype: str = "float16") -> Path:
    """The same checkpoint written by ``torch.save`` (a ``pytorch_model.bin``), cached."""

    def write(temp: Path) -> None:
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(str(checkpoint_file(size, dtype))), str(temp))

    return _cached(cache_dir() / f"whisper-{size}-{dtype}-v2.bin", write)


def openai_checkpoint_file(size: str, dtype: str = "float16") -> Path:
    """The same checkpoint as openai-whisper's ``torch.save({"dims": ..., "model_state_dict": ...})``, cached."""

    def write(temp: Path) -> None:

        import torch
        from safetensors.torch import load_file

        from fastfuse.cli.demo import WHISPER_SIZES

        state = {}
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' name table
        from openai_names import openai_name

        for key, value in load_file(str(checkpoint_file(size, dtype))).items():
            state[openai_name(key)] = value
        d, encoder, decoder, vocab = WHISPER_SIZES[size]
        dims = {"n_mels": 128 if d == 1280 else 80, "n_vocab": vocab, "n_audio_ctx": 1500, "n_audio_state": d}
        dims |= {"n_audio_head": d // 64, "n_audio_layer": encoder, "n_text_ctx": 448, "n_text_state": d}
        dims |= {"n_text_head": d // 64, "n_text_layer": decoder}
        torch.save({"dims": dims, "model_state_dict": state}, str(temp))

    return _cached(cache_dir() / f"whisper-{size}-{dtype}-openai.pt", write)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def fresh(code: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``python -c code`` in a fresh interpreter; (wall seconds, stdout). Fails loudly."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, done.stdout


def python_argv(code: str) -> list[str]:
    """A child interpreter running ``code`` with this folder importable."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r})\n{code}"]


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in fields}


def peak_rss(argv: list[str], interval: float = 0.005) -> dict[str, float]:
    """Run ``argv``, sampling its ``/proc/<pid>/status`` every ``interval`` s from this process.

    Returns the child's wall time, peak ``RssAnon`` and ``VmHWM`` in MB (as last sampled; ``ru_maxrss``
    is no use: Linux carries it over from the forking parent across exec). File-backed mmap pages
    (reading a source map, writing a destination map) count in RssFile, not RssAnon: RssAnon is
    the memory a run really takes from the machine.
    """
    peak = {"RssAnon": 0, "VmHWM": 0}
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child never blocks
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        while child.poll() is None:  # /proc/<pid> stays readable until poll() reaps the child
            for field, kb in _status_kb(child.pid, tuple(peak)).items():
                peak[field] = max(peak[field], kb)
            time.sleep(interval)
        seconds = time.perf_counter() - start
        if child.returncode:
            err.seek(0)
            raise RuntimeError(f"{argv[:4]} failed ({child.returncode}): {err.read()[-2000:]!r}")
    return {"seconds": seconds, "rss_anon_mb": peak["RssAnon"] / 1024, "vm_hwm_mb": peak["VmHWM"] / 1024}


def lower_peak(argv: list[str], setup: Callable[[], None] | None = None, runs: int = 2) -> dict[str, float]:
    """The lower peak RssAnon of ``runs`` runs (the first may also warm caches)."""
    measured = []
    for _ in range(runs):
        if setup:
            setup()
        measured.append(peak_rss(argv))
    return min(measured, key=lambda peak: peak["rss_anon_mb"])


def measure(impls: dict[str, Impl], repeats: dict[str, int]) -> dict[str, float]:
    """Min-of-``repeats[name]`` seconds of each implementation (wall, or the child's own timer for
    self-timed cases), in rounds that take turns: a machine that slows down for a while (a noisy
    neighbour, writeback) slows every implementation of the comparison, not only the one it hits."""
    best = dict.fromkeys(impls, float("inf"))
    result: Any = None
    for round_ in range(max(repeats.values(), default=0)):
        for name, impl in impls.items():
            if round_ >= repeats[name]:
                continue
            if impl.setup:
                impl.setup()
            result = None  # the last run's result is freed here, not inside this run's timing
            start = time.perf_counter()
            result = impl.run()
            best[name] = min(best[name], result if impl.self_timed else time.perf_counter() - start)
    return best


def imports_numba() -> bool:
    """Does a fresh ``import fastfuse`` import numba? (It must not: numba costs 0.2 s.)"""
    return fresh("import sys, fastfuse; print('numba' in sys.modules)")[1].strip() == "True"
