"""Tensor-parallel load, one process per rank: run under ``torchrun``.

    torchrun --nproc-per-node N bench/tp_multi_gpu.py --model whisper-large-v3 [--cold] [--json OUT]
    torchrun --nproc-per-node 2 bench/tp_multi_gpu.py --device cpu --model llama-tiny   # CI: gloo, CPU

Each rank calls ``fastfuse.load(path, framework="pt", device=<its device>, tp=N, rank=rank,
target="vllm")`` on the same checkpoint (generated once by rank 0 into the bench cache), and:

- checks its tensors against an independent split of the unsplit fused load (q rows by heads,
  k/v rows by kv heads, replicated where kv heads < N; gate/up evenly; everything else whole),
  and that an all-gather of every rank's q rows reassembles the unsplit q rows;
- times ``barrier -> load -> synchronize -> barrier`` (every rank's tensors resident) against
  each rank loading the whole file with ``safetensors.torch.load_file(device=...)`` and slicing
  its rows (what a simple engine does), min of ``--rounds``;
- counts the bytes each rank read (``/proc/self/io``: ``rchar`` through syscalls,
  ``read_bytes`` from the disk; pages of a memory map count only in the latter).

torch.distributed is used only where the ranks must agree (barriers, the all-gather, the
report). Models: ``whisper-{size}`` (Hugging Face names, f16) and ``llama-{tiny,small,medium,large}``
(a GQA Llama: kv heads fewer than the ranks for ``tiny`` at N >= 4). Exits 0 with "skipped"
when CUDA is asked for and fewer than N GPUs exist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import numpy as np

WHISPER_HEADS = {"tiny": 6, "base": 8, "small": 12, "medium": 16, "large-v3": 20}
# d, q heads, kv heads, layers (head size d / q heads; ffn 2d)
LLAMA = {"tiny": (256, 8, 2, 2), "small": (1024, 8, 2, 4), "medium": (2048, 16, 8, 24), "large": (4096, 32, 8, 32)}


def _llama_file(size: str) -> Path:
    d, heads, kv_heads, layers = LLAMA[size]

    def write(temp: Path) -> None:
        from safetensors.numpy import save_file

        rng = np.random.default_rng(0)
        hd, ffn = d // heads, 2 * d

        def w(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)

        state = {"model.embed_tokens.weight": w(512, d), "model.norm.weight": w(d), "lm_head.weight": w(512, d)}
        for i in range(layers):
            p = f"model.layers.{i}."
            state |= {p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d)}
            state |= {p + f"self_attn.{n}_proj.weight": w(kv_heads * hd, d) for n in "kv"}
            state |= {p + f"mlp.{n}_proj.weight": w(ffn, d) for n in ("gate", "up")}
            state |= {p + "mlp.down_proj.weight": w(d, ffn), p + "input_layernorm.weight": w(d)}
        save_file(state, str(temp), metadata={"format": "pt"})

    return harness._cached(harness.cache_dir() / f"llama-{size}-float16.safetensors", write)


def checkpoint(model: str) -> tuple[Path, int, int]:
    """The checkpoint's path and its (q heads, kv heads)."""
    family, size = model.split("-", 1)
    if family == "llama":
        _, heads, kv_heads, _ = LLAMA[size]
        return _llama_file(size), heads, kv_heads
    return harness.checkpoint_file(size, "float16"), WHISPER_HEADS[size], WHISPER_HEADS[size]


def expected_rows(key: str, full: Any, rank: int, tp: int, heads: int, kv_heads: int) -> Any:
    """The rows of unsplit fused tensor ``full`` that ``rank`` keeps (an independent split)."""
    if key.endswith("gate_up_proj.weight"):
        gate, up = full.chunk(2)
        return _cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    hd = full.shape[0] // (heads + 2 * kv_heads)
    q, k, v = full.split([heads * hd, kv_heads * hd, kv_heads * hd])
    if kv_heads >= tp:
        kr = k.chunk(tp)[rank], v.chunk(tp)[rank]
    else:
        head = rank * kv_heads // tp
        kr = k[head * hd : (head + 1) * hd], v[head * hd : (head + 1) * hd]
    return _cat([q.chunk(tp)[rank], *kr])


def _cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whisper-large-v3")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each round (root)")
    parser.add_argument("--check-only", action="store_true", help="check the tensors, time nothing")
    parser.add_argument("--json", help="rank 0 writes the report here")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    tp, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if args.device == "cuda" and torch.cuda.device_count() < tp:
        if rank == 0:
            print(f"skipped: {tp} ranks need {tp} GPUs, found {torch.cuda.device_count()}")
        return 0
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    import fastfuse

    path, heads, kv_heads = checkpoint(args.model) if rank == 0 else (None, 0, 0)
    dist.barrier()
    path, heads, kv_heads = checkpoint(args.model)  # written by rank 0: now only a look-up
    options: dict[str, Any] = {"target": "vllm", "tp": tp, "rank": rank, "heads": heads, "kv_heads": kv_heads}

    def ours() -> dict[str, Any]:
        if device == "cpu":
            return fastfuse.load(path, framework="pt", **options)
        return fastfuse.load(path, framework="pt", device=device, **options)

    mine = ours()
    unsplit = fastfuse.load(path, framework="pt", target="vllm")  # the reference, on the CPU
    bad = []
    for key, value in mine.items():
        full = unsplit[key]
        want = expected_rows(key, full, rank, tp, heads, kv_heads) if ("qkv_proj" in key or "gate_up" in key) else full
        if not torch.equal(value.cpu(), want):
            bad.append(key)
    if set(mine) != set(unsplit):
        bad.append(f"keys differ: {sorted(set(mine) ^ set(unsplit))[:4]}")
    qkv = next(k for k in mine if k.endswith("qkv_proj.weight"))
    hd = unsplit[qkv].shape[0] // (heads + 2 * kv_heads)
    q_rows = heads // tp * hd
    gathered = [torch.empty_like(mine[qkv][:q_rows]) for _ in range(tp)]
    dist.all_gather(gathered, mine[qkv][:q_rows].contiguous())
    if not torch.equal(torch.cat(gathered).cpu(), unsplit[qkv][: heads * hd]):
        bad.append(f"{qkv}: the all-gathered q rows differ from the unsplit ones")
    del mine, unsplit

    report: dict[str, Any] = {"model": args.model, "tp": tp, "device": args.device, "mismatches": bad}
    if not args.check_only:
        report |= _timings(args, path, ours, device, tp, rank, heads, kv_heads)
    reports: list[Any] = [None] * tp
    dist.all_gather_object(reports, report)
    if rank == 0:
        print(json.dumps(reports[0] | {"per_rank": reports}, default=str))
        if args.json:
            Path(args.json).write_text(json.dumps(reports, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 1 if any(r["mismatches"] for r in reports) else 0


def _timings(args: Any, path: Path, ours: Any, device: str, tp: int, rank: int, heads: int, kv_heads: int) -> dict:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    def engine() -> dict[str, Any]:  # what a simple engine does: the whole file, then its rows
        whole = load_file(str(path), device=device)
        return {k: v.chunk(tp)[rank].clone() if k.endswith("q_proj.weight") else v for k, v in whole.items()}

    times: dict[str, list[float]] = {"fastfuse": [], "load_file+slice": []}
    read: dict[str, dict[str, int]] = {}
    for _ in range(args.rounds):
        for name, run in (("fastfuse", ours), ("load_file+slice", engine)):
            if args.cold and rank == 0:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            dist.barrier()
            before, start = _io(), time.perf_counter()
            result = run()
            if device != "cpu":
                torch.cuda.synchronize()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
            after = _io()
            read[name] = {k: after[k] - before[k] for k in ("rchar", "read_bytes")}
            del result
    best = {name: min(values) for name, values in times.items()}
    return {
        "seconds": best,
        "ratio": best["fastfuse"] / best["load_file+slice"],
        "bytes_read": read,
        "file_bytes": path.stat().st_size,
        "cold": args.cold,
    }


if __name__ == "__main__":
    raise SystemExit(main())
