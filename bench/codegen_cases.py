"""The kernel and the per-layer loop under each instruction set numba can generate here.

One child process per round and code generation (``host``: numba's default, the host CPU;
``haswell``: ``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=``, AVX2 code, with its own
``NUMBA_CACHE_DIR`` under the bench cache so the two never share compiled code). The child loads the kernels (compiling them
the first time), then times, taking turns, min of its rounds: the kernel on whole-model QKV in
one call, the per-layer loop (one ``transpose_concat`` per layer, steady state) and
``np.copyto`` of the same bytes. Its three figures come back as JSON; ``report.py`` shows each
against the memcpy of the same child.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from harness import Impl, cache_dir, fresh

CODEGENS = ("host", "haswell") if platform.machine().lower() in ("x86_64", "amd64") else ("host",)
IMPLS = ("kernel", "loop", "memcpy")

_CHILD = """
import json, time
import numpy as np
import fastfuse
from fastfuse.kernels.engine import run_copies, warm_up
from fastfuse.kernels.regions import Copy
from fastfuse.cli.demo import whisper_shapes
from harness import np_dtype

warm_up()
shapes = [s for k, s in whisper_shapes({size!r}).items() if k.endswith("self_attn.q_proj.weight")]
rng = np.random.default_rng(0)
qkv = rng.standard_normal((len(shapes), 3, *shapes[0]), dtype=np.float32).astype(np_dtype({dtype!r}))
out = np.zeros((qkv.shape[0], qkv.shape[3], 3 * qkv.shape[2]), qkv.dtype)
d = qkv.shape[2]
work = [Copy.of(p, fused[:, j * d : (j + 1) * d].T) for parts, fused in zip(qkv, out) for j, p in enumerate(parts)]
src, dst = qkv.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)

def kernel():
    run_copies(work)

def loop():
    for g in range(qkv.shape[0]):
        fastfuse.transpose_concat([qkv[g, 0], qkv[g, 1], qkv[g, 2]], out=out[g])

def memcpy():
    np.copyto(dst, src)

best = {{"kernel": 1e9, "loop": 1e9, "memcpy": 1e9}}
for name, run in (("kernel", kernel), ("loop", loop), ("memcpy", memcpy)):
    run()  # warm-up: first touch, kernels loaded
for _ in range({rounds}):
    for name, run in (("kernel", kernel), ("loop", loop), ("memcpy", memcpy)):
        start = time.perf_counter()
        run()
        best[name] = min(best[name], time.perf_counter() - start)
print(json.dumps(best))
"""


def environment(codegen: str) -> dict[str, str]:
    """The child's environment for ``codegen``: haswell gets its own numba cache."""
    if codegen == "host":
        return {}
    folder = cache_dir() / f"numba-{codegen}"
    # NUMBA_CPU_FEATURES empty: the CPU's own features. Without it numba keeps the host's
    # (AVX-512 on a Zen 4): NUMBA_CPU_NAME alone only changes the scheduling model.
    return {"NUMBA_CPU_NAME": codegen, "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(folder)}


def build_codegen(size: str, param: str, rounds: int = 5) -> dict[str, Impl | None]:
    """``param`` is ``"CODEGEN/DTYPE"``. The first implementation of a round runs the child; the
    others read the figures that child measured (the same run, alternating inside it)."""
    codegen, _, dtype = param.partition("/")
    bench = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {bench!r})\n" + _CHILD.format(size=size, dtype=dtype, rounds=rounds)
    measured: dict[str, Any] = {}

    def child() -> float:
        measured.clear()
        measured.update(json.loads(fresh(code, env=environment(codegen))[1]))
        return float(measured["kernel"])

    def figure(name: str) -> Impl:
        return Impl(lambda: float(measured[name]), self_timed=True)

    return {"kernel": Impl(child, self_timed=True), "loop": figure("loop"), "memcpy": figure("memcpy")}
