"""Slow, obviously correct references (as stumpy keeps in tests/naive.py)."""

from __future__ import annotations

import numpy as np


def fused_reference(parts: list[np.ndarray]) -> np.ndarray:
    """``[in, sum(o_j)]`` by numpy transposes."""
    return np.ascontiguousarray(np.concatenate([p.T for p in parts], axis=1))


def original_loop(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The algorithm fastfuse replaces: a zeroed [d, 3d] output filled element by element."""
    d = q.shape[0]
    out = np.zeros((d, 3 * d), q.dtype)
    for i in range(d):
        for j in range(d):
            out[i, j] = q[j, i]
            out[i, d + j] = k[j, i]
            out[i, 2 * d + j] = v[j, i]
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bytes (NaN payloads and -0.0 included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _fused_group(tensors: dict[str, np.ndarray], base: str, parts: list[str], name: str) -> dict[str, np.ndarray]:
    """``name.weight`` = concat of the parts' ``weight.T``; ``name.bias`` = their biases, zeros if missing."""
    weights = [tensors[f"{base}{p}.weight"] for p in parts]
    out = {f"{name}.weight": np.ascontiguousarray(np.concatenate([w.T for w in weights], axis=1))}
    biases = [tensors.get(f"{base}{p}.bias") for p in parts]
    if any(b is not None for b in biases):
        filled = [b if b is not None else np.zeros(w.shape[0], w.dtype) for b, w in zip(biases, weights)]
        out[f"{name}.bias"] = np.concatenate(filled)
    return out


def whisper_reference(
    tensors: dict[str, np.ndarray], *, cross_kv: bool = False, logits: bool = False
) -> dict[str, np.ndarray]:
    """fastfuse's default fused tensors of a Whisper checkpoint (Hugging Face or openai names),
    built with numpy from the key names, independently of fastfuse's rules."""
    hf = any(".layers." in key for key in tensors)
    prefix = "model." if any(key.startswith("model.") for key in tensors) else ""
    if hf:
        blocks = {"enc": f"{prefix}encoder.layers.{{}}.", "dec": f"{prefix}decoder.layers.{{}}."}
        qkv, kv, self_attn, cross = ["q_proj", "k_proj", "v_proj"], ["k_proj", "v_proj"], "self_attn.", "encoder_attn."
        embedding = tensors.get("proj_out.weight", tensors.get(f"{prefix}decoder.embed_tokens.weight"))
    else:
        blocks = {"enc": "encoder.blocks.{}.", "dec": "decoder.blocks.{}."}
        qkv, kv, self_attn, cross = ["query", "key", "value"], ["key", "value"], "attn.", "cross_attn."
        embedding = tensors.get("decoder.token_embedding.weight")
    fused: dict[str, np.ndarray] = {}
    for side, block in blocks.items():
        i = 0
        while f"{block.format(i)}{self_attn}{qkv[0]}.weight" in tensors:
            fused |= _fused_group(tensors, block.format(i) + self_attn, qkv, f"fused.{side}.{i}.self_attn.qkv")
            if side == "dec" and cross_kv:
                fused |= _fused_group(tensors, block.format(i) + cross, kv, f"fused.dec.{i}.encoder_attn.kv")
            i += 1
    if logits and embedding is not None:
        fused["fused.dec.logits.weight"] = np.ascontiguousarray(embedding.T)
    return fused
