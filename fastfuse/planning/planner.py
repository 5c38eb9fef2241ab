"""Planning: key names, shapes and dtypes in; a validated :class:`Plan` out, or a FuseError.

The planner is a pure function of names and metadata (anything with ``.shape`` and ``.dtype``):
it never touches array data, so it runs on a file's header alone and is testable without
arrays. Layer counts and ``d`` come from the keys and shapes, never from a table.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fastfuse.aliases import TensorLike
from fastfuse.dtypes import check_movable, result_dtype
from fastfuse.errors import (
    DtypeMismatchError,
    FuseError,
    KeyConflictError,
    MissingTensorError,
    ShapeMismatchError,
)
from fastfuse.planning import rules
from fastfuse.planning.key_patterns import detect, layer_count, present
from fastfuse.planning.options import LAYOUTS, FuseOptions
from fastfuse.planning.tensor_parallel import split_rows

__all__ = ["LAYOUTS", "FuseOptions", "FusedTensor", "Plan", "make_plan"]  # options re-exported for callers


@dataclass(frozen=True, kw_only=True)
class FusedTensor:
    """One tensor the plan writes: rows ``starts[j]:starts[j]+rows[j]`` of ``sources[j]``, concatenated.

    ``sources[j]`` is ``None`` for zeros (a missing bias). Weights: sources ``[o_j, in]``
    (``[in, o_j]`` if ``transposed``) -> ``(in, sum(rows))``, or ``(sum(rows), in)`` in the
    ``out_in`` layout. Biases: ``(sum(rows),)``. ``rank``: the tensor-parallel rank it is for.
    """

    key: str
    group: str
    layer: int | None
    kind: str
    sources: tuple[str | None, ...]
    rows: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    starts: tuple[int, ...] = ()
    transposed: bool = False
    layout: str = "in_out"
    rank: int | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def row_starts(self) -> tuple[int, ...]:
        return self.starts or (0,) * len(self.sources)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What fusing a checkpoint will do; computing nothing.

    Attributes:
        scheme: detected or chosen scheme name; ``prefix``: its key prefix (``"model."``).
        d: the model's input width (``None`` if nothing was planned).
        layers: layer count per planned group name.
        fused: every output tensor, in a deterministic order (group, layer, rank, weight, bias).
        dropped: source keys left out of the result (empty when originals are kept).
        layout: ``"in_out"`` or ``"out_in"``; ``tp``: tensor-parallel ranks.
        already_fused: the checkpoint stores fused tensors (convert them with ``convert=True``),
            or is a file fastfuse wrote (a plan rebuilt from its recipe).
        opt_in: options of opt-in groups the checkpoint holds that were not asked for
            (``"cross_kv"``, ``"logits"``, ``"convert"``).
    """

    scheme: str
    prefix: str
    d: int | None
    layers: dict[str, int]
    fused: tuple[FusedTensor, ...]
    dropped: frozenset[str] = field(default_factory=frozenset)
    layout: str = "in_out"
    tp: int = 1
    already_fused: bool = False
    target: str = "fastfuse"
    opt_in: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of all fused tensors."""
        return sum(t.nbytes for t in self.fused)

    def for_rank(self, rank: int | None) -> Plan:
        """The part of the plan one tensor-parallel rank writes."""
        return replace(self, fused=tuple(t for t in self.fused if t.rank == rank))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (used by ``fastfuse inspect --json``)."""
        dtypes = sorted({t.dtype.name for t in self.fused})
        return {
            "scheme": self.scheme,
            "prefix": self.prefix,
            "d": self.d,
            "layers": dict(self.layers),
            "layout": self.layout,
            "target": self.target,
            "tp": self.tp,
            "already_fused": self.already_fused,
            "opt_in": list(self.opt_in),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "fused_bytes": self.nbytes,
            "dropped": sorted(self.dropped),
            "fused": [
                {
                    "key": t.key,
                    "group": t.group,
                    "rank": t.rank,
                    "shape": list(t.shape),
                    "dtype": t.dtype.name,
                    "sources": list(t.sources),
                }
                for t in self.fused
            ],
        }


def make_plan(tensors: Mapping[str, TensorLike], options: FuseOptions) -> Plan:
    """Validate ``tensors`` against a scheme and list what to fuse (see ``fastfuse.plan``)."""
    chosen, prefix = detect(tensors, options.scheme)
    names = options.names or {}
    unknown = set(names) - {g.name for g in chosen.groups}
    if unknown:
        raise FuseError(
            f"names: unknown group(s) {sorted(unknown)}; {chosen.name} has {[g.name for g in chosen.groups]}"
        )
    builder = _Builder(tensors, prefix, options)
    target = rules.TARGETS[options.target]
    layers: dict[str, int] = {}
    opt_in: list[str] = []
    for rule in chosen.groups:
        if rule.option is not None and not getattr(options, rule.option):
            if present(tensors, rule, prefix) and not (rule.option == "logits" and options.layout == "out_in"):
                opt_in.append(rule.option)
            continue
        template = names.get(rule.name) or target.names.get(chosen.name, {}).get(rule.name)
        if template is None:
            whisper = " (vLLM loads Whisper in Hugging Face naming: convert_openai_to_hf.py in transformers)"
            convert = (
                ""
                if chosen.name in target.names
                else f"the target supports {sorted(target.names)} checkpoints: convert it to one of those"
                + (whisper if chosen.name == "openai-whisper" else "")
                + "; or "
            )
            raise FuseError(
                f"target={target.name!r} has no name for group {rule.name!r} of {chosen.name} checkpoints; "
                f"{convert}use target='fastfuse', or in Python pass names={{{rule.name!r}: ...}}"
            )
        if rule.per_layer:
            count = layer_count(tensors, rule, prefix, required=rule.option is not None)
            if count:
                layers[rule.name] = count
                for i in range(count):
                    builder.add_group(rule, i, template)
        else:
            layers[rule.name] = 1
            builder.add_group(rule, None, template)
    fused = tuple(builder.fused)
    if options.tp > 1 and not fused:
        hint = " (it is stored already fused, and fused parts cannot be split)" if chosen.already_fused else ""
        raise FuseError(f"tp={options.tp}: nothing to split in this {chosen.name} checkpoint{hint}")
    _check_outputs(fused, tensors, options.overwrite)
    dropped = frozenset() if options.keep_originals else frozenset(builder.droppable)
    return Plan(
        scheme=chosen.name,
        prefix=prefix,
        d=builder.d,
        layers=layers,
        fused=fused,
        dropped=dropped,
        layout=str(options.layout),
        tp=options.tp,
        already_fused=chosen.already_fused,
        target=options.target,
        opt_in=tuple(dict.fromkeys(opt_in)),
    )


class _Builder:
    """Accumulates validated FusedTensors; holds the model-wide ``d`` and where it came from."""

    def __init__(self, tensors: Mapping[str, TensorLike], prefix: str, options: FuseOptions) -> None:
        self.tensors, self.prefix, self.options = tensors, prefix, options
        self.d: int | None = None
        self.d_key = ""
        self.fused: list[FusedTensor] = []
        self.droppable: list[str] = []

    def add_group(self, rule: rules.GroupRule, layer: int | None, template: str) -> None:
        found = [self._find(rule, layer, part) for part in rule.parts]
        weights = [weight for weight, _ in found]
        biases = [bias for _, bias in found]
        shapes = [self._weight_shape(rule, key) for key in weights]
        present = [key for key in [*weights, *biases] if key is not None]
        target = self._target_dtype(present)
        rows = tuple(shape[0] for shape in shapes)
        for bias, weight, n in zip(biases, weights, rows):
            if bias is not None and tuple(self._meta(bias).shape) != (n,):
                raise ShapeMismatchError(
                    f"{bias!r}: expected shape [{n}] (the rows of {weight!r}), found {list(self._meta(bias).shape)}"
                )
        fields_ = {"i": layer} if layer is not None else {}
        name = functools.partial(template.format, prefix=self.prefix, **fields_)
        d = shapes[0][1]
        layout, transposed = str(self.options.layout), rule.transposed
        for rank in self.options.ranks():
            starts, counts = self._split(rule, weights, rows, rank)
            total = sum(counts)
            shape = (d, total) if layout == "in_out" else (total, d)
            for kind, sources, kind_shape in (("weight", weights, shape), ("bias", biases, (total,))):
                if kind == "bias" and all(b is None for b in biases):
                    continue
                self.fused.append(
                    FusedTensor(
                        key=name(kind=kind),
                        group=rule.name,
                        layer=layer,
                        kind=kind,
                        sources=tuple(sources),
                        rows=counts,
                        shape=kind_shape,
                        dtype=target,
                        starts=starts,
                        transposed=transposed and kind == "weight",
                        layout=layout,
                        rank=rank,
                    )
                )
        if rule.drop_sources:
            self.droppable.extend(present)

    def _split(
        self, rule: rules.GroupRule, weights: list[str], rows: tuple[int, ...], rank: int | None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Row ranges (starts, counts) of each part that ``rank`` owns; all rows without TP."""
        if rank is None:
            return (0,) * len(rows), rows
        return split_rows(rule, weights, rows, rank, self.options)

    def _find(self, rule: rules.GroupRule, layer: int | None, part: str) -> tuple[str, str | None]:
        """The part's weight key (first template present) and its bias key, if present."""
        for template in rule.sources:
            key = template.format(prefix=self.prefix, i=layer, part=part, kind="weight")
            if key in self.tensors:
                bias = template.format(prefix=self.prefix, i=layer, part=part, kind="bias")
                return key, (bias if bias in self.tensors else None)
        where = f" layer {layer}" if layer is not None else ""
        raise MissingTensorError(f"missing tensor {key!r} of group {rule.name}{where}")

    def _meta(self, key: str) -> TensorLike:
        """The tensor at ``key``, checked to carry a numpy ``shape`` and ``dtype``."""
        value = self.tensors[key]
        if not isinstance(getattr(value, "dtype", None), np.dtype) or not isinstance(
            getattr(value, "shape", None), tuple
        ):
            raise FuseError(
                f"{key!r}: expected a numpy array, found {type(value).__name__}; convert it first (e.g. t.numpy())"
            )
        return value

    def _weight_shape(self, rule: rules.GroupRule, key: str) -> tuple[int, int]:
        """``[rows, in]`` of a part, checked against the model's ``d`` (``[d, d]`` if square)."""
        stored = tuple(int(n) for n in self._meta(key).shape)
        if len(stored) != 2:
            layout = "[in, out]" if rule.transposed else "[out, in]"
            raise ShapeMismatchError(f"{key!r}: expected 2 dimensions {layout}, found shape {list(stored)}")
        rows, width = (stored[1], stored[0]) if rule.transposed else stored
        if self.d is None:
            self.d, self.d_key = width, key
        expected = (
            f"[{self.d}, {self.d}]" if rule.square else ("[{0}, *]" if rule.transposed else "[*, {0}]").format(self.d)
        )
        if width != self.d or (rule.square and rows != self.d):
            raise ShapeMismatchError(
                f"{key!r}: expected {expected} (d of the model, from {self.d_key!r}), found {list(stored)}"
            )
        return rows, width

    def _target_dtype(self, keys: Iterable[str]) -> np.dtype[Any]:
        keys = list(keys)
        dtypes = [self._meta(k).dtype for k in keys]
        for key, dt in zip(keys, dtypes):
            check_movable(dt, repr(key))
        if self.options.dtype is None and any(dt != dtypes[0] for dt in dtypes):
            found = ", ".join(f"{k!r} is {dt.name}" for k, dt in zip(keys, dtypes))
            raise DtypeMismatchError(f"parts of one group must share a dtype: {found}; pass dtype= to convert")
        return {result_dtype(dt, self.options.dtype) for dt in dtypes}.pop()


def _check_outputs(fused: tuple[FusedTensor, ...], tensors: Mapping[str, TensorLike], overwrite: bool) -> None:
    seen: set[tuple[str, int | None]] = set()
    for t in fused:
        if (t.key, t.rank) in seen:
            raise KeyConflictError(f"two fused tensors would be called {t.key!r}; check names= (use {{i}} per layer)")
        seen.add((t.key, t.rank))
        if t.key in tensors and not overwrite:
            raise KeyConflictError(
                f"the input already holds {t.key!r}, a key fastfuse would write; pass overwrite=True "
                "(--overwrite) to replace it, or fuse the original checkpoint"
            )
