"""Checkpoints and options shared by the staging tests (CPU, host destination) and the CUDA
tests: every input the CPU load reads, and every option that changes what is moved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from conftest import hf_whisper_shapes, random_tensors
from safetensors.numpy import save_file

OPTIONS: list[dict[str, Any]] = [
    {},
    {"keep_originals": False},
    {"cross_kv": True, "logits": True},
    {"cross_kv": True, "logits": True, "keep_originals": False},
    {"layout": "out_in"},
    {"layout": "out_in", "keep_originals": False, "cross_kv": True},
    {"target": "vllm"},
    {"target": "vllm", "cross_kv": True},
    {"dtype": "float32", "cross_kv": True},
    {"dtype": "float32", "keep_originals": False, "cross_kv": True},
    {"target": "vllm", "dtype": "float32"},
    {"names": {"encoder_qkv": "enc.{i}.qkv.{kind}"}},
    {"target": "vllm", "tp": 2, "rank": 1, "heads": 4},
    {"tp": 2, "rank": 0, "heads": 4, "keep_originals": False},
]


def whisper(dtype: Any = np.float16, seed: int = 0) -> dict[str, np.ndarray]:
    """A small HF Whisper checkpoint (d=32: four heads of 8), with NaN payloads and -0.0."""
    tensors = random_tensors(hf_whisper_shapes(32, 2, 3, 50), np.float32, seed)
    out = {key: value.astype(dtype) for key, value in tensors.items()}
    q = out["model.encoder.layers.0.self_attn.q_proj.weight"]
    bits = q.view(f"u{q.dtype.itemsize}")
    bits[0, :3] = {2: [0x7C01, 0xFE37, 0x8000], 4: [0x7F800001, 0xFFC01234, 0x80000000]}[q.dtype.itemsize]
    return out


def _safetensors(folder: Path, dtype: Any) -> Path:
    path = folder / "model.safetensors"
    save_file(whisper(dtype), str(path), metadata={"format": "pt"})
    return path


def _shards(folder: Path, dtype: Any) -> Path:
    tensors = whisper(dtype)
    keys = list(tensors)
    weight_map = {}
    for n, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _torch_file(folder: Path, dtype: Any) -> Path:
    """A ``pytorch_model.bin`` by torch.save: tied embedding, a strided view, an offset view."""
    import torch

    def tensor(a: np.ndarray) -> Any:
        if a.dtype == np.dtype(ml_dtypes.bfloat16):
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    state = {k: tensor(v) for k, v in whisper(dtype).items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # tied: one storage
    q = "model.decoder.layers.1.self_attn.q_proj.weight"
    state[q] = state[q].T.contiguous().T  # strided: stored column-major
    k = "model.encoder.layers.1.self_attn.k_proj.weight"
    big = torch.cat([state[k].reshape(-1), state[k].reshape(-1)])
    state[k] = big[state[k].numel() :].view(state[k].shape)  # an offset view of a larger storage
    path = folder / "pytorch_model.bin"
    torch.save(state, path)
    return path


INPUTS: dict[str, Callable[[Path, Any], Path]] = {
    "safetensors": _safetensors,
    "shards": _shards,
    "folder": lambda folder, dtype: _safetensors(folder, dtype).parent,
    "torch": _torch_file,
}
DTYPES = {"float16": np.float16, "bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.float32}
