"""Benchmark cases, shared by the pytest-benchmark file (``test_bench.py``) and ``report.py``.

A *group* (``kernel``, ``widen``, ``load``, ``file``, ``startup``, ``scaling``) has parameters
(a dtype, or a startup variant), each with named implementations. ``impls(group, size, param)``
builds the data once (cached, one parameter at a time, so a 3 GB working set is freed before
the next) and returns ``name -> Impl``: a zero-argument ``run`` to time, plus optional untimed
``setup`` before each run and ``extra`` measurements made once (peak RSS).

Checkpoints have the real Hugging Face Whisper key names and shapes (``fastfuse.demo``) with
random values. Files are written once into ``$FASTFUSE_BENCH_CACHE`` (default
``.bench-cache/`` at the repository root, git-ignored) and reused. In-memory groups generate the
64 (large-v3) self-attention Q/K/V matrices in one buffer, so memcpy moves exactly those bytes.

This module imports only the standard library and numpy at the top: child processes import it
to run a file operation, and what it imports would count in their memory.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
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
DTYPES = ("float32", "float16", "bfloat16")
TINY = "tiny"


def cache_dir() -> Path:
    path = Path(os.environ.get("FASTFUSE_BENCH_CACHE") or BENCH.parent / ".bench-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_file() -> Path:
    """Where file-to-file cases write (one file, replaced by every run)."""
    return cache_dir() / "bench-output.safetensors"


def np_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)


def checkpoint_file(size: str, dtype: str = "float16") -> Path:
    """The cached ``whisper-{size}-{dtype}.safetensors`` (HF names, random values); written once, atomically."""
    path = cache_dir() / f"whisper-{size}-{dtype}.safetensors"
    if not path.exists():
        from safetensors.numpy import save_file

        from fastfuse.demo import whisper_checkpoint

        temp = path.with_suffix(".partial")
        save_file(whisper_checkpoint(size, np_dtype(dtype)), str(temp), metadata={"format": "pt"})
        temp.rename(path)
    return path


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


# ---------------------------------------------------------------------------------------------
# Child processes: one helper for fresh-process timing, one for peak-memory sampling.


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


# ---------------------------------------------------------------------------------------------
# The numpy way of fusing (what a user writes without fastfuse) and the file operations.

_Q_KEY = re.compile(r"(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.self_attn\.q_proj\.weight")


def numpy_fuse(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Self-attention QKV (weights and biases) with numpy, fastfuse's key names and layout."""
    fused = {}
    for key in tensors:
        match = _Q_KEY.fullmatch(key)
        if not match:
            continue
        base, name = key[: -len("q_proj.weight")], f"fused.{match[1]}.{match[2]}.self_attn.qkv"
        weights = [tensors[f"{base}{p}_proj.weight"] for p in "qkv"]
        fused[f"{name}.weight"] = np.ascontiguousarray(np.concatenate([w.T for w in weights], axis=1))
        zeros = np.zeros(weights[0].shape[0], weights[0].dtype)
        fused[f"{name}.bias"] = np.concatenate([tensors.get(f"{base}{p}_proj.bias", zeros) for p in "qkv"])
    return fused


def safe_open_numpy(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    return {**tensors, **numpy_fuse(tensors)}


def _fuse_file(src: str, dst: str) -> None:
    from fastfuse.sink import fuse_file

    fuse_file(src, dst, overwrite_destination=True)


def _numpy_file(src: str, dst: str) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src)
    save_file({**tensors, **numpy_fuse(tensors)}, dst, metadata={"format": "pt"})


def _copy_fsync(src: str, dst: str) -> None:
    """A plain copy, made as durable as fastfuse's atomic writer makes its output (synced before the rename)."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_OPS: dict[str, Callable[[str, str], Any]] = {
    "fuse_file": _fuse_file,
    "copyfile": shutil.copyfile,
    "copyfile+fsync": _copy_fsync,
    "numpy": _numpy_file,
}


def file_argv(op: str, src: Path, dst: Path) -> list[str]:
    """The command running file operation ``op`` alone in a child process (``cli``: the real CLI)."""
    if op == "cli":
        return [sys.executable, "-m", "fastfuse", "fuse", str(src), str(dst), "--force"]
    call = f"cases.FILE_OPS[{op!r}]({str(src)!r}, {str(dst)!r})"
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); import cases; {call}"]


# ---------------------------------------------------------------------------------------------
# Cases.


@dataclass(frozen=True)
class Impl:
    run: Callable[[], Any]  # what is timed
    setup: Callable[[], None] | None = None  # untimed, before each run
    extra: Callable[[], dict[str, float]] | None = None  # measured once, untimed (e.g. peak RSS)
    self_timed: bool = False  # run() returns its own seconds (timed inside a child)


@dataclass(frozen=True)
class Group:
    params: dict[str, tuple[str, ...]]  # parameter -> implementation names
    build: Callable[[str, str], dict[str, Impl | None]]  # (size, param) -> impls (None: unavailable)
    rounds: int  # timed runs (min of them in report.py)


@functools.lru_cache(maxsize=1)
def qkv_arrays(size: str, dtype: str) -> np.ndarray:
    """Whole-model self-attention Q/K/V (64 groups for large-v3) as one ``[groups, 3, d, d]`` buffer."""
    from fastfuse.demo import whisper_shapes

    shapes = [shape for key, shape in whisper_shapes(size).items() if key.endswith("self_attn.q_proj.weight")]
    rng = np.random.default_rng(0)
    return rng.standard_normal((len(shapes), 3, *shapes[0]), dtype=np.float32).astype(np_dtype(dtype), copy=False)


def _fastfuse(qkv: np.ndarray, out_dtype: Any) -> tuple[np.ndarray, Callable[[], list[np.ndarray]]]:
    """A ``[groups, d, 3d]`` output (pages touched) and fastfuse filling all of it in one ``run_groups`` call."""
    from fastfuse._engine import run_groups

    groups, _, rows, cols = qkv.shape
    out = np.full((groups, cols, 3 * rows), 0, out_dtype)
    work = [(list(parts), fused) for parts, fused in zip(qkv, out, strict=True)]

    def fuse() -> list[np.ndarray]:
        run_groups(work)
        return list(out)

    return out, fuse


def _copy(out: np.ndarray, qkv: np.ndarray, parallel: bool = False) -> Callable[[], Any]:
    """memcpy of the input bytes into ``out``: np.copyto, or libc memcpy split over numba's threads."""
    dst, src = out.reshape(-1).view(np.uint8), qkv.reshape(-1).view(np.uint8)
    if not parallel:
        return lambda: np.copyto(dst, src)
    import baselines

    return lambda: baselines.parallel_copy(dst, src)


def _uint(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def _kernel(size: str, dtype: str) -> dict[str, Impl | None]:
    import baselines

    qkv = qkv_arrays(size, dtype)
    out, fuse = _fastfuse(qkv, qkv.dtype)
    torch = baselines.torch_fuse(qkv)
    return {
        "fastfuse": Impl(fuse),
        "memcpy": Impl(_copy(out, qkv)),
        "numpy": Impl(lambda: [np.ascontiguousarray(np.concatenate([p.T for p in parts], 1)) for parts in qkv]),
        "serial": Impl(lambda: [baselines.original_loop(*_uint(parts)).view(qkv.dtype) for parts in qkv]),
        "torch": Impl(torch) if torch else None,
    }


def _scaling(size: str, dtype: str) -> dict[str, Impl | None]:
    from baselines import with_threads

    qkv = qkv_arrays(size, dtype)
    out, fuse = _fastfuse(qkv, qkv.dtype)
    impls: dict[str, Impl | None] = {}
    for n in THREADS:
        impls[f"fastfuse-{n}t"] = Impl(with_threads(n, fuse))
        impls[f"memcpy-{n}t"] = Impl(with_threads(n, _copy(out, qkv, parallel=True)))
    return impls


def _widen(size: str, dtype: str) -> dict[str, Impl | None]:
    qkv = qkv_arrays(size, dtype)
    _, fuse = _fastfuse(qkv, np.float32)
    return {
        "fastfuse": Impl(fuse),
        "numpy": Impl(
            lambda: [np.ascontiguousarray(np.concatenate([p.astype(np.float32).T for p in parts], 1)) for parts in qkv]
        ),
    }


# Llama-3-8B attention shapes (d 4096, 32 q heads and 8 kv heads of 128), 8 layers; tiny: a
# proportional toy. Engines' [sum(out), in] layout is a row concatenation: a parallel copy.
_LLAMA = {"large-v3": (4096, 1024, 8), TINY: (256, 64, 2)}


@functools.lru_cache(maxsize=1)
def llama_qkv(size: str) -> list[np.ndarray]:
    """Per layer q ``[d, d]``, k, v ``[kv, d]`` (f16) in one buffer, as GQA checkpoints have them."""
    d, kv, layers = _LLAMA.get(size, _LLAMA["large-v3"])
    flat = np.random.default_rng(0).standard_normal(layers * (d + 2 * kv) * d, dtype=np.float32).astype(np.float16)
    return list(flat.reshape(layers, d + 2 * kv, d))


def _layouts(size: str, layout: str) -> dict[str, Impl | None]:
    """GQA parts (k, v smaller than q) fused in either layout, against a memcpy of the same bytes."""
    from fastfuse._engine import run_groups

    layers = llama_qkv(size)
    d = layers[0].shape[1]
    kv = (layers[0].shape[0] - d) // 2
    shape = (d, d + 2 * kv) if layout == "in_out" else (d + 2 * kv, d)
    out = np.full((len(layers), *shape), 0, np.float16)
    work = []
    for stacked, fused in zip(layers, out, strict=True):
        q, k, v = stacked[:d], stacked[d : d + kv], stacked[d + kv :]
        if layout == "in_out":
            work.append(([q, k, v], fused))
        else:  # rows of the parts become rows of the output: each part, transposed, is a row block
            work += [([part.T], fused[start : start + part.shape[0]]) for part, start in ((q, 0), (k, d), (v, d + kv))]
    source = np.stack(layers)
    return {"fastfuse": Impl(lambda: run_groups(work)), "memcpy": Impl(_copy(out, source))}


def _load(size: str, dtype: str) -> dict[str, Impl | None]:
    from safetensors.numpy import load_file

    import fastfuse

    path = checkpoint_file(size, dtype)
    warm_page_cache(path)
    return {
        "fastfuse": Impl(lambda: fastfuse.load(path)),
        "load_file": Impl(lambda: load_file(path)),
        "safe_open+numpy": Impl(lambda: safe_open_numpy(path)),
    }


def _file(size: str, dtype: str) -> dict[str, Impl | None]:
    src = checkpoint_file(size, dtype)
    dst = output_file()
    warm_page_cache(src)

    def setup() -> None:  # a fresh destination, nothing of ours left dirty
        dst.unlink(missing_ok=True)
        os.sync()

    def impl(op: str) -> Impl:
        argv = file_argv(op, src, dst)
        run: Callable[[], Any] = (
            functools.partial(FILE_OPS[op], str(src), str(dst))
            if op != "cli"
            else functools.partial(subprocess.run, argv, check=True, capture_output=True)
        )

        def extra() -> dict[str, float]:  # the lower of two runs: a first run may (re)compile kernels
            runs = []
            for _ in range(2):
                setup()
                runs.append(peak_rss(argv))
            return min(runs, key=lambda peak: peak["rss_anon_mb"])

        return Impl(run, setup, extra)

    return {op: impl(op) for op in GROUPS["file"].params[dtype]}


_FIRST_FUSE = """\
import json, struct, time
raw = open({path!r}, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8 : 8 + n]); header.pop("__metadata__", None)
start = time.perf_counter()
import numpy as np
tensors = {{k: np.frombuffer(raw, "<f2", (v["data_offsets"][1] - v["data_offsets"][0]) // 2,
                             8 + n + v["data_offsets"][0]).reshape(v["shape"]) for k, v in header.items()}}
{fuse}
print(time.perf_counter() - start)
"""


def _startup(size: str, variant: str) -> dict[str, Impl | None]:
    if variant == "load":
        path = checkpoint_file(size, "float16")
        warm_page_cache(path)
        load = f"import fastfuse; fastfuse.load({str(path)!r})"

        def cold() -> float:
            with tempfile.TemporaryDirectory(prefix="fastfuse-numba-") as empty:
                return fresh(load, {"NUMBA_CACHE_DIR": empty})[0]

        load_file = f"import safetensors.numpy; safetensors.numpy.load_file({str(path)!r})"
        return {
            "fastfuse": Impl(lambda: fresh(load)[0]),
            "fastfuse-cold": Impl(cold),
            "load_file": Impl(lambda: fresh(load_file)[0]),
        }
    path = checkpoint_file(TINY, "float16")  # always whisper-tiny: this measures import + first call

    def child(fuse: str) -> Impl:
        code = _FIRST_FUSE.format(path=str(path), fuse=fuse)
        return Impl(lambda: float(fresh(code)[1]), self_timed=True)

    return {"fastfuse": child("import fastfuse; fastfuse.fuse(tensors)"), "numpy": child("")}


KERNEL_IMPLS = ("fastfuse", "memcpy", "numpy", "serial", "torch")
THREADS = (1, 2)
GROUPS: dict[str, Group] = {
    "kernel": Group({dt: KERNEL_IMPLS for dt in DTYPES}, _kernel, rounds=7),
    "widen": Group({dt: ("fastfuse", "numpy") for dt in ("float16", "bfloat16")}, _widen, rounds=5),
    "layouts": Group({layout: ("fastfuse", "memcpy") for layout in ("in_out", "out_in")}, _layouts, rounds=7),
    "load": Group({"float16": ("fastfuse", "load_file", "safe_open+numpy")}, _load, rounds=5),
    "file": Group({"float16": ("fuse_file", "cli", "copyfile", "copyfile+fsync", "numpy")}, _file, rounds=3),
    "startup": Group(
        {"load": ("fastfuse", "fastfuse-cold", "load_file"), "fuse": ("fastfuse", "numpy")}, _startup, rounds=10
    ),
    "scaling": Group(
        {
            dt: tuple(f"{impl}-{n}t" for impl in ("fastfuse", "memcpy") for n in THREADS)
            for dt in ("float32", "float16")
        },
        _scaling,
        rounds=7,
    ),
}
CASES = [
    (group, param, impl) for group, spec in GROUPS.items() for param, names in spec.params.items() for impl in names
]


@functools.lru_cache(maxsize=1)
def impls(group: str, size: str, param: str) -> dict[str, Impl | None]:
    """The implementations of one group and parameter (built once; the previous build is freed)."""
    return GROUPS[group].build(size, param)


def imports_numba() -> bool:
    """Does a fresh ``import fastfuse`` import numba? (It must not: numba costs 0.2 s.)"""
    return fresh("import sys, fastfuse; print('numba' in sys.modules)")[1].strip() == "True"


def rounds(group: str, impl: str) -> int:
    """Cold compiles take seconds each: fewer of them."""
    return 3 if impl.endswith("-cold") else GROUPS[group].rounds


def measure(impl: Impl, repeat: int) -> float:
    """Min-of-``repeat`` seconds (wall, or the child's own timer for self-timed cases)."""
    best = float("inf")
    for _ in range(repeat):
        if impl.setup:
            impl.setup()
        start = time.perf_counter()
        result = impl.run()
        best = min(best, result if impl.self_timed else time.perf_counter() - start)
    return best
