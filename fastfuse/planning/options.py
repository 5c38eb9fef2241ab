"""Every fusion option in one validated object (see ``fastfuse.plan`` for their meaning)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from fastfuse.aliases import DTypeLike
from fastfuse.errors import FuseError
from fastfuse.planning import rules

__all__ = ["LAYOUTS", "FuseOptions"]

LAYOUTS = ("in_out", "out_in")  # [in, sum(out)] for x @ W (ours); [sum(out), in] for F.linear (vLLM, CTranslate2)


@dataclass(frozen=True)
class FuseOptions:
    """Every fusion option, validated once (see ``fastfuse.plan`` for their meaning)."""

    cross_kv: bool = False
    logits: bool = False
    convert: bool = False
    keep_originals: bool | None = None  # None: as the target says
    dtype: DTypeLike | None = None
    scheme: str = "auto"
    names: Mapping[str, str] | None = None
    overwrite: bool = False
    layout: str | None = None  # None: the target's
    tp: int = 1
    rank: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    target: str = "fastfuse"

    def __post_init__(self) -> None:
        if self.target not in rules.TARGETS:
            raise FuseError(f"target {self.target!r}: expected one of {list(rules.TARGETS)}")
        preset = rules.TARGETS[self.target]
        if self.layout is None:
            object.__setattr__(self, "layout", preset.layout)
        if self.keep_originals is None:
            object.__setattr__(self, "keep_originals", not preset.drop_sources)
        if self.layout not in LAYOUTS:
            raise FuseError(f"layout {self.layout!r}: expected one of {list(LAYOUTS)}")
        if self.target != "fastfuse" and self.layout != preset.layout:
            raise FuseError(f"target {self.target!r} writes layout {preset.layout!r}; drop layout={self.layout!r}")
        if self.logits and self.layout == "out_in":
            chosen = f"target={self.target!r}" if self.target != "fastfuse" else "layout='out_in'"
            raise FuseError(
                f"logits=True with {chosen}: the token embedding [vocab, d] already is the logits matrix in "
                "the [out, in] layout it writes, so fastfuse would write a copy of it; drop logits=True"
            )
        if not isinstance(self.tp, int) or self.tp < 1:
            raise FuseError(f"tp={self.tp!r}: expected a positive number of tensor-parallel ranks")
        if self.rank is not None and not 0 <= self.rank < self.tp:
            raise FuseError(f"rank={self.rank!r}: expected 0 <= rank < tp={self.tp}")
        for name in ("heads", "kv_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FuseError(f"{name}={value!r}: expected a positive head count")

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> FuseOptions:
        """Options from keyword arguments; unknown names are a FuseError listing the known ones."""
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise FuseError(f"unknown option(s) {sorted(unknown)}; expected some of {[f.name for f in fields(cls)]}")
        return cls(**options)

    def with_head_counts(self, read: Callable[[], tuple[int | None, int | None]]) -> FuseOptions:
        """These options with head counts filled from ``read()`` (a checkpoint's ``config.json``),
        called only when splitting attention needs them (``tp > 1``) and one was not given."""
        if self.tp == 1 or (self.heads and self.kv_heads):
            return self
        heads, kv_heads = read()
        return replace(self, heads=self.heads or heads, kv_heads=self.kv_heads or kv_heads)

    def ranks(self) -> tuple[int | None, ...]:
        """The ranks to plan: all of them, one, or ``(None,)`` without tensor parallelism."""
        if self.tp == 1:
            return (None,)
        return (self.rank,) if self.rank is not None else tuple(range(self.tp))
