"""fastfuse's recipe in a file it wrote, and what it is for: ``verify`` (and ``inverse.unfuse``).

Every fused file records in its ``__metadata__`` which sources (and rows of them) each fused
tensor holds, the layout and the target (``fastfuse.*`` keys), so that it can be checked and
taken apart with nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._typing import PathLike, TensorLike
from .checkpoint import open_checkpoint
from .core import execute
from .errors import MalformedFileError, MissingTensorError
from .plan import FusedTensor, Plan

__all__ = ["META_PREFIX", "TP_INDEX_NAME", "describe", "recorded_plan", "tensor_parallel_ranks", "verify"]

META_PREFIX = "fastfuse."
TP_INDEX_NAME = "tensor_parallel.json"


def describe(fusion: Plan, metas: Mapping[str, TensorLike], rank: int | None) -> dict[str, str]:
    """fastfuse's own ``__metadata__`` entries: enough for ``verify`` and ``unfuse`` to work alone."""
    from . import __version__

    recipe = {
        t.key: {
            "sources": list(t.sources),
            "rows": list(t.rows),
            "starts": list(t.row_starts()),
            "transposed": t.transposed,
            "source_dtype": metas[next(s for s in t.sources if s is not None)].dtype.name,
        }
        for t in fusion.fused
    }
    described = {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}layout": fusion.layout,
        f"{META_PREFIX}target": fusion.target,
        f"{META_PREFIX}scheme": fusion.scheme,
        f"{META_PREFIX}groups": json.dumps(fusion.layers, separators=(",", ":")),
        f"{META_PREFIX}fused": json.dumps(recipe, separators=(",", ":")),
    }
    if rank is not None:
        described.update({f"{META_PREFIX}tp": str(fusion.tp), f"{META_PREFIX}rank": str(rank)})
    return described


def recorded_plan(
    metadata: Mapping[str, str], metas: Mapping[str, TensorLike], path: object
) -> tuple[Plan, dict[str, str]]:
    """Rebuild the plan a fastfuse-written file records; also the source dtype of each fused key.

    MalformedFileError if the file carries no recipe (it was not written by ``fastfuse fuse``)
    or a broken one.
    """
    if f"{META_PREFIX}fused" not in metadata:
        raise MalformedFileError(
            f"{path} was not written by fastfuse fuse (no {META_PREFIX}fused metadata); "
            "fuse it first or pass the fused file"
        )
    layout = metadata.get(f"{META_PREFIX}layout", "in_out")
    try:
        recipe = json.loads(metadata[f"{META_PREFIX}fused"])
        fused = []
        for key, entry in recipe.items():
            meta = metas[key]
            kind = "weight" if len(meta.shape) == 2 else "bias"
            fused.append(
                FusedTensor(
                    key,
                    "recorded",
                    None,
                    kind,
                    tuple(entry["sources"]),
                    tuple(int(n) for n in entry["rows"]),
                    tuple(meta.shape),
                    meta.dtype,
                    tuple(int(n) for n in entry["starts"]),
                    bool(entry["transposed"]),
                    layout,
                )
            )
        dtypes = {key: str(entry["source_dtype"]) for key, entry in recipe.items()}
        tp = int(metadata.get(f"{META_PREFIX}tp", "1"))
    except KeyError as exc:
        raise MalformedFileError(f"{path}: its fastfuse recipe names {exc}, which the file does not hold") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise MalformedFileError(f"{path}: its fastfuse recipe ({META_PREFIX}fused) is broken: {exc}") from None
    target = metadata.get(f"{META_PREFIX}target", "fastfuse")
    scheme = metadata.get(f"{META_PREFIX}scheme", "recorded")
    fusion = Plan(scheme, "", None, {}, tuple(fused), layout=layout, tp=tp, target=target)
    return fusion, dtypes


def tensor_parallel_ranks(folder: Path) -> list[Path] | None:
    """The rank files a tensor-parallel output folder lists (None if ``folder`` is not one).

    MalformedFileError for an unreadable ``tensor_parallel.json`` or a rank that is not a plain
    file name in the folder.
    """
    index = folder / TP_INDEX_NAME
    if not folder.is_dir() or not index.is_file():
        return None
    try:
        ranks = json.loads(index.read_text())["ranks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MalformedFileError(f"{index}: not a tensor-parallel index with a list of ranks ({exc})") from None
    if not isinstance(ranks, list) or not ranks:
        raise MalformedFileError(f"{index}: 'ranks' is {ranks!r}, expected a list of rank file names")
    for name in ranks:
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise MalformedFileError(f"{index}: rank {name!r} is not a plain file name in the folder")
    return [folder / name for name in ranks]


def verify(path: PathLike, *, source: PathLike | None = None) -> list[str]:
    """Recompute every fused tensor of a fastfuse-written file from its originals.

    ``path``: a file, an index or folder of shards, or a tensor-parallel folder (every rank is
    checked). The originals come from the file itself, or from ``source`` (the checkpoint it
    was fused from: needed when the originals were dropped, e.g. ``target="vllm"``). Returns
    the keys whose bytes differ (``rank-k-of-n.safetensors:key`` for ranks; empty: all
    bit-exact). Raises MalformedFileError if the file carries no fastfuse recipe,
    MissingTensorError if an original is in neither file.
    """
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
