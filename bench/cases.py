"""Benchmark cases, shared by the pytest-benchmark file (``test_bench.py``) and ``report.py``.

A *group* has parameters (a dtype, a source format, a startup variant), each with named
implementations. ``impls(group, size, param)`` builds the data once (cached, one parameter at a
time, so a 3 GB working set is freed before the next) and returns ``name -> Impl``.

Groups: ``kernel`` (whole-model QKV in memory against memcpy, numpy, torch, the serial loop),
``widen`` (f16/bf16 -> f32), ``layouts`` (GQA, both layouts), ``loop`` (a loader's per-layer
loop in a fresh process: first pass and steady state), ``load`` (numpy), ``torch``
(``framework="pt"`` against safetensors' torch loaders), ``ptload`` (a ``torch.save`` file,
Hugging Face's and openai-whisper's, against ``torch.load(mmap=True)`` alone and with the torch
fusion, and the pickle parse alone), ``file`` (file to file against ``cp`` + ``sync``, from
safetensors and from torch files, and against CTranslate2's converter where installed),
``startup`` (fresh processes, warm and cold numba cache) and ``scaling`` (threads). The cases
that run whole processes (``file``, ``startup``) are built in ``file_cases.py``.

Checkpoints have the real Hugging Face Whisper key names and shapes (``fastfuse.cli.demo``) with
random values, written once into ``$FASTFUSE_BENCH_CACHE`` (default ``.bench-cache/``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import numpy as np
from codegen_cases import CODEGENS, build_codegen
from codegen_cases import IMPLS as CODEGEN_IMPLS
from file_cases import FILE_IMPLS, TINY, build_file, build_startup
from harness import (
    Impl,
    checkpoint_file,
    fresh,
    lower_peak,
    np_dtype,
    openai_checkpoint_file,
    python_argv,
    torch_checkpoint_file,
    warm_page_cache,
)

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Group:
    params: dict[str, tuple[str, ...]]  # parameter -> implementation names
    build: Callable[[str, str], dict[str, Impl | None]]  # (size, param) -> impls (None: unavailable)
    rounds: int  # timed runs (min of them in report.py)


# ---------------------------------------------------------------------------------------------
# In memory: the kernel against memcpy and the ways people fuse today.


@functools.lru_cache(maxsize=1)
def qkv_arrays(size: str, dtype: str) -> np.ndarray:
    """Whole-model self-attention Q/K/V (64 groups for large-v3) as one ``[groups, 3, d, d]`` buffer."""
    from fastfuse.cli.demo import whisper_shapes

    shapes = [shape for key, shape in whisper_shapes(size).items() if key.endswith("self_attn.q_proj.weight")]
    rng = np.random.default_rng(0)
    return rng.standard_normal((len(shapes), 3, *shapes[0]), dtype=np.float32).astype(np_dtype(dtype), copy=False)


def _kernels_loaded() -> None:
    """In-process groups time the kernels, not the engine's policy (``loop`` and ``startup`` do):
    load them all now, so the first timed call does not run on numpy while they load."""
    import fastfuse

    fastfuse.warm_up()


def aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros (pages touched) in fastfuse's own allocation for outputs, which starts on a cache
    line (``np.zeros`` of a large array starts 16 bytes into a page)."""
    from fastfuse.fusion import _new_buffer

    out = _new_buffer(int(np.prod(shape)) * np.dtype(dtype).itemsize).view(dtype).reshape(shape)
    out[...] = 0
    return out


def _fastfuse(qkv: np.ndarray, out_dtype: Any) -> tuple[np.ndarray, Callable[[], list[np.ndarray]]]:
    """A ``[groups, d, 3d]`` output (pages touched) and fastfuse filling all of it in one call."""
    from fastfuse.kernels.engine import run_copies
    from fastfuse.kernels.regions import Copy

    _kernels_loaded()
    out = aligned_zeros((qkv.shape[0], qkv.shape[3], 3 * qkv.shape[2]), out_dtype)
    d = qkv.shape[2]
    work = [
        Copy.of(part, fused[:, j * d : (j + 1) * d].T)
        for parts, fused in zip(qkv, out, strict=True)
        for j, part in enumerate(parts)
    ]

    def fuse() -> list[np.ndarray]:
        run_copies(work)
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


# Llama-3-8B attention shapes (d 4096, 32 q heads and 8 kv heads of 128), 8 layers; smaller
# sizes: a proportional toy. Engines' [sum(out), in] layout is a row concatenation: a parallel copy.
_LLAMA = {"large-v3": (4096, 1024, 8), "small": (1024, 256, 8), TINY: (256, 64, 2)}


@functools.lru_cache(maxsize=1)
def llama_qkv(size: str) -> list[np.ndarray]:
    """Per layer q ``[d, d]``, k, v ``[kv, d]`` (f16) in one buffer, as GQA checkpoints have them."""
    d, kv, layers = _LLAMA.get(size, _LLAMA["large-v3"])
    flat = np.random.default_rng(0).standard_normal(layers * (d + 2 * kv) * d, dtype=np.float32).astype(np.float16)
    return list(flat.reshape(layers, d + 2 * kv, d))


def _layouts(size: str, layout: str) -> dict[str, Impl | None]:
    """GQA parts (k, v smaller than q) fused in either layout, against a memcpy of the same bytes."""
    from fastfuse.kernels.engine import run_copies
    from fastfuse.kernels.regions import Copy

    _kernels_loaded()
    layers = llama_qkv(size)
    d = layers[0].shape[1]
    kv = (layers[0].shape[0] - d) // 2
    shape = (d, d + 2 * kv) if layout == "in_out" else (d + 2 * kv, d)
    out = np.full((len(layers), *shape), 0, np.float16)
    work = []
    for stacked, fused in zip(layers, out, strict=True):
        q, k, v = stacked[:d], stacked[d : d + kv], stacked[d + kv :]
        for part, start in ((q, 0), (k, d), (v, d + kv)):
            rows = slice(start, start + part.shape[0])
            # in_out: each part is a column block, seen transposed; out_in: a row block
            work.append(Copy.of(part, fused[:, rows].T if layout == "in_out" else fused[rows]))
    source = np.stack(layers)
    return {"fastfuse": Impl(lambda: run_copies(work)), "memcpy": Impl(_copy(out, source))}


# A loader's natural loop, in a fresh process: one ``transpose_concat`` per layer into a
# preallocated buffer. The first pass starts with numba not even imported; the steady state is
# timed once the kernels are loaded (in the background, once the process has seen 32 MB of work:
# during the first pass for large-v3, after a few passes for whisper-tiny).
_LOOP = """
import json, time
import numpy as np
import fastfuse
from fastfuse.kernels import engine as kernel_engine
groups, d = {groups}, {d}
qkv = np.ones((groups, 3, d, d), "{dtype}")
out = np.zeros((groups, d, 3 * d), "{dtype}")

def loop():
    start = time.perf_counter()
    for g in range(groups):
        fastfuse.transpose_concat([qkv[g, 0], qkv[g, 1], qkv[g, 2]], out=out[g])
    return time.perf_counter() - start

first = loop()
deadline = time.monotonic() + 120
while not kernel_engine.status()["ready"] and time.monotonic() < deadline:  # more passes: more work seen
    loop()
steady = min(loop() for _ in range(3))
src, dst = qkv.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)

def copy():
    start = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - start

print(json.dumps({{"first-loop": first, "steady": steady, "memcpy": min(copy() for _ in range(3))}}))
"""


def _loop(size: str, dtype: str) -> dict[str, Impl | None]:
    import json

    from fastfuse.cli.demo import WHISPER_SIZES

    d, encoder, decoder, _ = WHISPER_SIZES[size]
    code = _LOOP.format(groups=encoder + decoder, d=d, dtype=dtype)

    def child(name: str) -> Impl:
        return Impl(lambda: float(json.loads(fresh(code)[1])[name]), self_timed=True)

    return {name: child(name) for name in GROUPS["loop"].params[dtype]}


# ---------------------------------------------------------------------------------------------
# Loading: numpy, torch tensors, torch files.


def _loader(run: Callable[[], Any], child: str) -> Impl:
    """Timed in this process (page cache warm); peak memory of the same load alone in a child."""
    return Impl(run, extra=lambda: lower_peak(python_argv(child), runs=1))


def numpy_fuse(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Self-attention QKV (weights and biases) with numpy, fastfuse's key names and layout."""
    import re

    fused = {}
    for key in tensors:
        match = re.fullmatch(r"(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.self_attn\.q_proj\.weight", key)
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


def _load(size: str, dtype: str) -> dict[str, Impl | None]:
    import safetensors.numpy

    import fastfuse

    path = checkpoint_file(size, dtype)
    warm_page_cache(path)
    p = str(path)
    return {
        "fastfuse": _loader(lambda: fastfuse.load(path), f"import fastfuse; fastfuse.load({p!r})"),
        "load_file": _loader(
            lambda: safetensors.numpy.load_file(p), f"import safetensors.numpy; safetensors.numpy.load_file({p!r})"
        ),
        "safe_open+numpy": Impl(lambda: safe_open_numpy(path)),
    }


_SAFE_OPEN_PT = """
from safetensors import safe_open
with safe_open({path!r}, "pt") as f:
    tensors = {{k: f.get_tensor(k) for k in f.keys()}}
"""


def _torch(size: str, dtype: str) -> dict[str, Impl | None]:
    """``framework="pt"`` against safetensors' own torch loaders (every tensor read)."""
    if not _importable("torch"):
        return dict.fromkeys(GROUPS["torch"].params[dtype])
    import safetensors.torch
    from safetensors import safe_open

    import fastfuse

    path = checkpoint_file(size, dtype)
    warm_page_cache(path)
    p = str(path)

    def safe_open_pt() -> dict[str, Any]:
        with safe_open(p, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)

    return {
        "fastfuse-pt": _loader(
            lambda: fastfuse.load(path, framework="pt"), f"import fastfuse; fastfuse.load({p!r}, framework='pt')"
        ),
        "load_file-pt": _loader(
            lambda: safetensors.torch.load_file(p), f"import safetensors.torch; safetensors.torch.load_file({p!r})"
        ),
        "safe_open-pt": _loader(safe_open_pt, _SAFE_OPEN_PT.format(path=p)),
    }


def torch_fuse(tensors: dict[str, Any]) -> dict[str, Any]:
    """:func:`numpy_fuse` with torch (``torch.cat`` of the transposed parts, made contiguous):
    what a user of ``torch.load`` writes to get fastfuse's fused tensors; openai or HF names."""
    import re

    import torch

    fused = {}
    for key in tensors:
        match = re.fullmatch(
            r"(?:model\.)?(enc|dec)oder\.(?:layers|blocks)\.(\d+)\.(?:self_)?attn\.(q_proj|query)\.weight", key
        )
        if not match:
            continue
        base, parts = (
            key[: -len(f"{match[3]}.weight")],
            ("q_proj", "k_proj", "v_proj") if match[3] == "q_proj" else ("query", "key", "value"),
        )
        weights = [tensors[f"{base}{p}.weight"] for p in parts]
        name = f"fused.{match[1]}.{match[2]}.self_attn.qkv"
        fused[f"{name}.weight"] = torch.cat([w.t() for w in weights], 1).contiguous()
        zeros = torch.zeros(weights[0].shape[0], dtype=weights[0].dtype)
        fused[f"{name}.bias"] = torch.cat([tensors.get(f"{base}{p}.bias", zeros) for p in parts])
    return fused


def _ptload(size: str, param: str) -> dict[str, Impl | None]:
    """A ``torch.save`` file (``param``: Hugging Face's ``pytorch_model.bin`` or openai-whisper's
    ``.pt``, float16): fastfuse's load (no torch) against ``torch.load(mmap=True)`` alone and
    followed by the torch fusion of the same groups; ``parse``: fastfuse's pickle interpreter
    alone on the file's ``data.pkl`` (in memory)."""
    if not _importable("torch"):
        return dict.fromkeys(GROUPS["ptload"].params[param])
    import zipfile

    import torch

    import fastfuse
    from fastfuse.formats import unpickler

    path = (
        openai_checkpoint_file(size, "float16") if param == "openai-float16" else torch_checkpoint_file(size, "float16")
    )
    warm_page_cache(path)
    p = str(path)
    with zipfile.ZipFile(p) as archive:
        pkl = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        raw = archive.read(pkl)

    def torch_load() -> dict[str, Any]:
        loaded = torch.load(p, mmap=True, weights_only=True)
        return loaded.get("model_state_dict", loaded)

    def torch_load_fuse() -> dict[str, Any]:
        tensors = torch_load()
        return {**tensors, **torch_fuse(tensors)}

    mmap_load = f"torch.load({p!r}, mmap=True, weights_only=True)"
    return {
        "fastfuse": _loader(lambda: fastfuse.load(path), f"import fastfuse; fastfuse.load({p!r})"),
        "torch.load-mmap": _loader(torch_load, f"import torch; {mmap_load}"),
        "torch.load-mmap+fusion": Impl(torch_load_fuse),
        "parse": Impl(lambda: unpickler.unpickle(raw, "bench")),
    }


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


KERNEL_IMPLS = ("fastfuse", "memcpy", "numpy", "serial", "torch")
PT_IMPLS = ("fastfuse", "torch.load-mmap", "torch.load-mmap+fusion", "parse")
THREADS = (1, 2)
GROUPS: dict[str, Group] = {
    "kernel": Group({dt: KERNEL_IMPLS for dt in DTYPES}, _kernel, rounds=7),
    "widen": Group({dt: ("fastfuse", "numpy") for dt in ("float16", "bfloat16")}, _widen, rounds=5),
    "layouts": Group({layout: ("fastfuse", "memcpy") for layout in ("in_out", "out_in")}, _layouts, rounds=7),
    "loop": Group({dt: ("first-loop", "steady", "memcpy") for dt in ("float32", "float16")}, _loop, rounds=3),
    "load": Group({"float16": ("fastfuse", "load_file", "safe_open+numpy")}, _load, rounds=5),
    "torch": Group({"float16": ("fastfuse-pt", "load_file-pt", "safe_open-pt")}, _torch, rounds=5),
    "ptload": Group(dict.fromkeys(("float16", "openai-float16"), PT_IMPLS), _ptload, rounds=5),
    "file": Group(FILE_IMPLS, build_file, rounds=3),
    "startup": Group(
        {"load": ("fastfuse", "fastfuse-cold", "load_file"), "fuse": ("fastfuse", "numpy")}, build_startup, rounds=5
    ),
    "codegen": Group({f"{cg}/{dt}": CODEGEN_IMPLS for cg in CODEGENS for dt in DTYPES}, build_codegen, rounds=3),
}


def _scaling_group() -> Group:
    return Group(
        {dt: tuple(f"{impl}-{n}t" for impl in ("fastfuse", "memcpy") for n in THREADS) for dt in DTYPES},
        _scaling,
        rounds=5,
    )


def _cases() -> list[tuple[str, str, str]]:
    return [
        (group, param, impl) for group, spec in GROUPS.items() for param, names in spec.params.items() for impl in names
    ]


GROUPS["scaling"] = _scaling_group()
CASES = _cases()


def set_threads(threads: tuple[int, ...]) -> None:
    """Measure the ``scaling`` group at these thread counts (``report.py --threads``)."""
    global THREADS
    THREADS = threads
    GROUPS["scaling"] = _scaling_group()
    CASES[:] = _cases()


SLOW = {"fastfuse-cold", "ctranslate2+sync"}  # tens of seconds each: fewer rounds
QUICK_LEAVES_OUT = {
    "ctranslate2+sync",
    "cli-ct2+sync",
    "cp-hf+sync",
    "numpy",
    "serial",
    "copyfile+fsync",
    "safe_open+numpy",
}


@functools.lru_cache(maxsize=1)
def impls(group: str, size: str, param: str) -> dict[str, Impl | None]:
    """The implementations of one group and parameter (built once; the previous build is freed)."""
    return GROUPS[group].build(size, param)


def rounds(group: str, impl: str) -> int:
    """Timed runs: fewer for slow cases, one in quick mode."""
    if harness.QUICK:
        return 1
    return (3 if impl == "fastfuse-cold" else 1) if impl in SLOW else GROUPS[group].rounds
