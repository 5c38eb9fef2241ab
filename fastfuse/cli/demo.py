"""``fastfuse demo``: a Whisper-shaped checkpoint with real Hugging Face key names, fused.

Also the generator the benchmarks use: random values, the shapes and names of a real
``WhisperForConditionalGeneration`` ``save_pretrained`` file (k_proj has no bias).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastfuse.errors import FuseError

# d, encoder layers, decoder layers, vocabulary (from the published configs).
WHISPER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (384, 4, 4, 51865),
    "base": (512, 6, 6, 51865),
    "small": (768, 12, 12, 51865),
    "medium": (1024, 24, 24, 51865),
    "large-v3": (1280, 32, 32, 51866),
    "large-v3-turbo": (1280, 32, 4, 51866),
    "distil-large-v3": (1280, 32, 2, 51866),
}


def whisper_shapes(size: str, *, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor ``WhisperForConditionalGeneration.save_pretrained`` writes for
    ``size`` (the tied ``proj_out.weight`` is not saved)."""
    d, encoder_layers, decoder_layers, vocab = WHISPER_SIZES[size]
    shapes: dict[str, tuple[int, ...]] = {}
    for side, layers, blocks in (
        ("encoder", encoder_layers, ("self_attn",)),
        ("decoder", decoder_layers, ("self_attn", "encoder_attn")),
    ):
        base = f"{prefix}{side}"
        for i in range(layers):
            for block in blocks:
                for proj in ("q", "k", "v", "out"):
                    shapes[f"{base}.layers.{i}.{block}.{proj}_proj.weight"] = (d, d)
                    if proj != "k":
                        shapes[f"{base}.layers.{i}.{block}.{proj}_proj.bias"] = (d,)
                shapes[f"{base}.layers.{i}.{block}_layer_norm.weight"] = (d,)
                shapes[f"{base}.layers.{i}.{block}_layer_norm.bias"] = (d,)
            shapes[f"{base}.layers.{i}.final_layer_norm.weight"] = (d,)
            shapes[f"{base}.layers.{i}.final_layer_norm.bias"] = (d,)
            shapes[f"{base}.layers.{i}.fc1.weight"] = (4 * d, d)
            shapes[f"{base}.layers.{i}.fc1.bias"] = (4 * d,)
            shapes[f"{base}.layers.{i}.fc2.weight"] = (d, 4 * d)
            shapes[f"{base}.layers.{i}.fc2.bias"] = (d,)
        shapes[f"{base}.layer_norm.weight"] = (d,)
        shapes[f"{base}.layer_norm.bias"] = (d,)
    shapes[f"{prefix}encoder.conv1.weight"] = (d, 128 if d == 1280 else 80, 3)
    shapes[f"{prefix}encoder.conv1.bias"] = (d,)
    shapes[f"{prefix}encoder.conv2.weight"] = (d, d, 3)
    shapes[f"{prefix}encoder.conv2.bias"] = (d,)
    shapes[f"{prefix}encoder.embed_positions.weight"] = (1500, d)
    shapes[f"{prefix}decoder.embed_positions.weight"] = (448, d)
    shapes[f"{prefix}decoder.embed_tokens.weight"] = (vocab, d)
    return shapes


def whisper_checkpoint(
    size: str, dtype: Any = np.float32, *, seed: int = 0, prefix: str = "model."
) -> dict[str, np.ndarray]:
    """Random tensors with the names and shapes of :func:`whisper_shapes`."""
    rng = np.random.default_rng(seed)
    return {
        key: rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        for key, shape in whisper_shapes(size, prefix=prefix).items()
    }


def run(folder: Path | None, size: str = "tiny", *, keep: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write, fuse, verify and use a demo checkpoint, printing each step unless ``quiet``.

    ``folder``: where to write (kept); None: a new temporary folder, removed at the end unless
    ``keep``. Returns what was done (``"ok"``: every check passed). FuseError for an unknown
    ``size`` or a ``folder`` that is a file, before anything is created.
    """
    if size not in WHISPER_SIZES:
        raise FuseError(f"unknown size {size!r}; expected one of {list(WHISPER_SIZES)}")
    if folder is not None and folder.exists() and not folder.is_dir():
        raise FuseError(f"--out {folder}: exists and is not a folder; pass a new or existing folder")
    say = (lambda line: None) if quiet else print
    temporary = folder is None
    folder = Path(tempfile.mkdtemp(prefix="fastfuse-demo-")) if folder is None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        report = _steps(folder, size, say)
    finally:
        if temporary and not keep:
            shutil.rmtree(folder, ignore_errors=True)
    where = "removed" if temporary and not keep else "kept"
    say(f"files    {folder} ({where}{'; --keep to look at them' if where == 'removed' else ''})")
    return {**report, "folder": str(folder), "kept": where == "kept"}


def _steps(folder: Path, size: str, say: Callable[[str], None]) -> dict[str, Any]:
    from safetensors.numpy import save_file

    from fastfuse import fuse_file, load, verify

    source, destination = folder / f"whisper-{size}.safetensors", folder / f"whisper-{size}.fused.safetensors"
    tensors = whisper_checkpoint(size)
    save_file(tensors, str(source), metadata={"format": "pt"})
    say(f"wrote    {source}: {len(tensors)} tensors with Hugging Face Whisper names (random values)")
    start = time.perf_counter()
    fusion = fuse_file(source, destination, overwrite_destination=True, cross_kv=True)
    took = time.perf_counter() - start
    say(
        f"fused    {len(fusion.fused)} tensors ({', '.join(f'{g} x{n}' for g, n in fusion.layers.items())}) "
        f"-> {destination} in {took:.2f} s"
    )
    different = verify(destination)
    say(f"verify   {'ok: bit-exact' if not different else f'MISMATCH in {different}'}")
    loaded = load(source)
    key = "model.encoder.layers.0.self_attn.{}_proj.weight"
    x = np.random.default_rng(1).standard_normal((2, fusion.d or 1), dtype=np.float32)
    expected = np.concatenate([x @ tensors[key.format(p)].T for p in "qkv"], axis=1)
    got = x @ loaded["fused.enc.0.self_attn.qkv.weight"]
    close = bool(np.allclose(got, expected, rtol=1e-5, atol=1e-4))
    say(f"check    x @ fused == concat(x @ Wq.T, x @ Wk.T, x @ Wv.T): {close}")
    return {
        "ok": close and not different,
        "size": size,
        "fused_tensors": len(fusion.fused),
        "fuse_seconds": round(took, 3),
        "verify_different": different,
        "matmul_matches": close,
    }
