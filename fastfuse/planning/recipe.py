"""fastfuse's recipe in a file it wrote: the schema of its ``fastfuse.*`` metadata, both ways.

Every fused file records in its ``__metadata__`` which sources (and rows of them) each fused
tensor holds, the layout and the target (``fastfuse.*`` keys), so that it can be checked and
taken apart with nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace

from fastfuse.aliases import TensorLike
from fastfuse.errors import MalformedFileError
from fastfuse.planning.planner import FusedTensor, Plan

__all__ = ["META_PREFIX", "describe", "recorded_plan"]

META_PREFIX = "fastfuse."


def describe(fusion: Plan, metas: Mapping[str, TensorLike], rank: int | None) -> dict[str, str]:
    """fastfuse's own ``__metadata__`` entries: enough for ``verify`` and ``unfuse`` to work alone."""
    from fastfuse.version import __version__

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
    """Rebuild the plan a fastfuse-written file records (``already_fused`` set, ``dropped``: the
    sources the file does not hold; the prefix is not recorded); also the source dtype of each fused key.

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
                    key=key,
                    group="recorded",
                    layer=None,
                    kind=kind,
                    sources=tuple(entry["sources"]),
                    rows=tuple(int(n) for n in entry["rows"]),
                    shape=tuple(meta.shape),
                    dtype=meta.dtype,
                    starts=tuple(int(n) for n in entry["starts"]),
                    transposed=bool(entry["transposed"]),
                    layout=layout,
                )
            )
        dtypes = {key: str(entry["source_dtype"]) for key, entry in recipe.items()}
        tp = int(metadata.get(f"{META_PREFIX}tp", "1"))
        rank = int(metadata[f"{META_PREFIX}rank"]) if f"{META_PREFIX}rank" in metadata else None
        layers = {str(name): int(n) for name, n in json.loads(metadata.get(f"{META_PREFIX}groups", "{}")).items()}
    except KeyError as exc:
        raise MalformedFileError(f"{path}: its fastfuse recipe names {exc}, which the file does not hold") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise MalformedFileError(f"{path}: its fastfuse recipe ({META_PREFIX}fused) is broken: {exc}") from None
    target = metadata.get(f"{META_PREFIX}target", "fastfuse")
    scheme = metadata.get(f"{META_PREFIX}scheme", "recorded")
    weights = [t for t in fused if t.kind == "weight"]
    d = (weights[0].shape[0] if layout == "in_out" else weights[0].shape[1]) if weights else None
    dropped = frozenset(s for t in fused for s in t.sources if s is not None and s not in metas)
    fused = [replace(t, rank=rank) for t in fused]
    fusion = Plan(
        scheme=scheme,
        prefix="",
        d=d,
        layers=layers,
        fused=tuple(fused),
        dropped=dropped,
        layout=layout,
        tp=tp,
        already_fused=True,
        target=target,
    )
    return fusion, dtypes
