"""``verify``: recompute every fused tensor of a fastfuse-written file from its originals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import MissingTensorError
from fastfuse.formats.checkpoint import open_checkpoint, tensor_parallel_ranks
from fastfuse.fusion import execute
from fastfuse.planning.recipe import recorded_plan

__all__ = ["verify"]


def verify(path: PathLike, *, source: PathLike | None = None) -> list[str]:
    """Recompute every fused tensor of a fastfuse-written file from its originals.

    Args:
        path: a file, an index or folder of shards, or a tensor-parallel folder (every rank
            is checked), or a CTranslate2 model folder (every variable is checked: needs ``source``).
        source: the checkpoint it was fused from, where the originals come from when the
            file dropped them (e.g. ``target="vllm"``); default: the file itself.

    Returns:
        The keys whose bytes differ (``rank-k-of-n.safetensors:key`` for ranks); empty when
        every fused tensor is bit-exact.

    Raises:
        MalformedFileError: the file carries no fastfuse recipe (or a broken one).
        MissingTensorError: an original is in neither file.

    Example:
        >>> import tempfile, numpy as np, fastfuse
        >>> from safetensors.numpy import save_file
        >>> sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(4, dtype=np.float16) for p in "qkv"}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_file(sd, f"{folder}/model.safetensors")
        ...     _ = fastfuse.fuse_file(f"{folder}/model.safetensors", f"{folder}/fused.safetensors")
        ...     fastfuse.verify(f"{folder}/fused.safetensors")
        []
    """
    if Path(path, "model.bin").is_file():  # a CTranslate2 model folder (target="ctranslate2")
        from fastfuse.sinks.ctranslate2_folder import verify_ctranslate2

        return verify_ctranslate2(Path(path), source)
    ranks = tensor_parallel_ranks(Path(path))
    if ranks is not None:
        return [f"{rank.name}:{key}" for rank in ranks for key in verify(rank, source=source)]
    checkpoint = open_checkpoint(path)
    fusion, _ = recorded_plan(checkpoint.metadata, checkpoint.metas(), checkpoint.path)
    arrays = checkpoint.arrays()
    originals = open_checkpoint(source).arrays() if source is not None else {}
    inputs: dict[str, np.ndarray] = {}
    for t in fusion.fused:
        for key in t.sources:
            if key is None or key in inputs:
                continue
            found = originals.get(key, arrays.get(key))
            if found is None:
                hint = "" if source is not None else "; pass the original checkpoint as source= (--source)"
                raise MissingTensorError(
                    f"cannot verify {t.key!r}: its source {key!r} is not in the file (fused with originals dropped?){hint}"
                )
            inputs[key] = found
    recomputed = execute(fusion, inputs)
    return [key for key, value in recomputed.items() if not _same_bits(value, arrays[key])]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))
