"""Tensor parallelism: which rows of each part a rank owns (a pure function of counts)."""

from __future__ import annotations

from fastfuse.errors import FuseError, ShapeMismatchError
from fastfuse.planning import rules
from fastfuse.planning.options import FuseOptions

__all__ = ["split_rows"]


def split_rows(
    rule: rules.GroupRule, weights: list[str], rows: tuple[int, ...], rank: int, options: FuseOptions
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row ranges (starts, counts) of each part of ``rule`` (keys ``weights``, ``rows`` rows)
    that ``rank`` of ``options.tp`` owns: q by heads, k/v by kv heads, MLP rows evenly.

    Raises FuseError / ShapeMismatchError naming the key when a count is missing or does not divide.
    """
    tp = options.tp
    if not rule.split:
        raise FuseError(f"group {rule.name} cannot be split for tp={tp}: its parts are already fused")
    heads = options.heads
    head_dim = None
    if "heads" in rule.split:
        if heads is None:
            key = weights[rule.split.index("heads")]
            raise FuseError(
                f"tp={tp} needs the attention head count to split {key!r}: pass heads= (and kv_heads= for GQA)"
            )
        q_rows = rows[rule.split.index("heads")]
        if q_rows % heads:
            raise ShapeMismatchError(
                f"{weights[rule.split.index('heads')]!r}: {q_rows} rows do not divide into {heads} heads"
            )
        head_dim = q_rows // heads
    ranges = []
    for kind, key, n in zip(rule.split, weights, rows):
        if kind == "kv_heads":
            units = _kv_heads(key, n, head_dim, options)
        else:  # q rows split by heads: n // head_dim == heads; an even split: every row a unit
            units = n // head_dim if kind == "heads" and head_dim else n
        ranges.append(_rank_rows(kind, key, n, units, rank, tp))
    return tuple(start for start, _ in ranges), tuple(count for _, count in ranges)


def _kv_heads(key: str, rows: int, head_dim: int | None, options: FuseOptions) -> int:
    """Key/value heads of a part: given, or its rows over the q head size (GQA), checked."""
    tp = options.tp
    kv_heads = options.kv_heads
    if kv_heads is None:
        if head_dim is None:
            kv_heads = options.heads  # a group of k, v only (cross-attention): as many heads as q
        elif rows % head_dim == 0:
            kv_heads = rows // head_dim
    if kv_heads is None:
        raise FuseError(f"tp={tp} needs the key/value head count to split {key!r}: pass kv_heads= (or heads=)")
    if head_dim is not None and rows != kv_heads * head_dim:
        raise ShapeMismatchError(
            f"{key!r}: expected {kv_heads} kv heads of {head_dim} rows (the q head size), found {rows} rows"
        )
    if rows % kv_heads:
        raise ShapeMismatchError(f"{key!r}: {rows} rows do not divide into {kv_heads} heads")
    return kv_heads


def _rank_rows(kind: str, key: str, rows: int, units: int, rank: int, tp: int) -> tuple[int, int]:
    """(start, count) of the rows of one part that ``rank`` of ``tp`` owns.

    ``units``: heads (or rows, for an even split) the part's rows divide into. Fewer kv heads
    than ranks: each kv head goes whole to the ``tp // units`` ranks that share it.
    """
    if units >= tp:
        if units % tp:
            unit = "rows" if kind == "rows" else "heads"
            raise ShapeMismatchError(f"{key!r}: {units} {unit} do not divide among tp={tp} ranks")
        return rank * (rows // tp), rows // tp
    if kind != "kv_heads" or tp % units:
        raise ShapeMismatchError(f"{key!r}: {units} heads cannot be shared by tp={tp} ranks")
    size = rows // units
    return (rank * units // tp) * size, size
