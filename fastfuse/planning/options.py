"""Every fusion option in one validated object: the single source of their names, types, defaults,
allowed values, help and command-line flags (the CLI, ``FuseKwargs`` and ``plan``'s docstring are
derived from it or checked against it by tests/test_options.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fastfuse.aliases import DTypeLike
from fastfuse.dtypes import WIDENINGS
from fastfuse.errors import FuseError
from fastfuse.planning import rules

__all__ = ["LAYOUTS", "WRITE_ONLY", "FuseOptions", "Option", "options"]

LAYOUTS = ("in_out", "out_in")  # [in, sum(out)] for x @ W (ours); [sum(out), in] for F.linear (vLLM, CTranslate2)
WRITE_ONLY = "write"  # an Option.scope: offered by the commands that write files, not by inspect


@dataclass(frozen=True)
class Option:
    """One fusion option as every interface spells it: derived from :class:`FuseOptions`.

    ``flag`` is the command line's spelling (None: Python only); ``choices`` the allowed values
    (None: any value of ``type``); ``scope`` None (every command) or ``WRITE_ONLY``.
    """

    name: str
    type: str
    default: Any
    help: str
    flag: str | None
    choices: tuple[str, ...] | None
    scope: str | None
    flag_help: str | None = None  # the flag's own help where it turns the option off


def _option(
    default: Any,
    help: str,
    *,
    flag: str | None = "",
    choices: Callable[[], tuple[str, ...]] | None = None,
    scope: str | None = None,
    flag_help: str | None = None,
) -> Any:
    """A dataclass field carrying its interfaces. ``flag=""`` spells the name (``--cross-kv``);
    ``choices`` is called when the options are listed (the rules tables are data, read late)."""
    return field(
        default=default,
        metadata={"help": help, "flag": flag, "choices": choices, "scope": scope, "flag_help": flag_help},
    )


@dataclass(frozen=True)
class FuseOptions:
    """Every fusion option, validated once: the one place that defines them (name, type, default,
    allowed values, meaning, command-line flag). ``fastfuse.plan`` documents them for callers."""

    cross_kv: bool = _option(False, "also fuse decoder cross-attention K,V")
    logits: bool = _option(False, "also write the tied logits weight [d, vocab]")
    convert: bool = _option(False, "convert an already fused checkpoint (Phi-3, GPT-2) to --layout")
    keep_originals: bool | None = _option(
        None,
        "keep the fused sources beside the fused tensors (default: as the target says)",
        flag="--drop-originals",
        flag_help="leave out the fused sources",
        scope=WRITE_ONLY,
    )
    dtype: DTypeLike | None = _option(  # noqa: RUF009 - _option is dataclasses.field with metadata
        None, "widen float16/bfloat16 to float32 while fusing", choices=lambda: tuple(sorted({d for _, d in WIDENINGS}))
    )
    scheme: str = _option(
        "auto",
        "naming scheme (default: detect from the keys)",
        choices=lambda: ("auto", *(scheme.name for scheme in rules.SCHEMES)),
    )
    names: Mapping[str, str] | None = _option(
        None, "per-group fused key templates, e.g. {'encoder_qkv': 'enc.{i}.qkv.{kind}'}", flag=None
    )
    overwrite: bool = _option(False, "allow fused keys the input already holds to be replaced", scope=WRITE_ONLY)
    layout: str | None = _option(
        None,
        "in_out: [in, sum(out)] for x @ W (default); out_in: [sum(out), in] for F.linear (vLLM, CTranslate2)",
        choices=lambda: LAYOUTS,
    )
    tp: int = _option(1, "tensor-parallel ranks")
    rank: int | None = _option(None, "the one tensor-parallel rank to build (load, fuse, plan)", flag=None)
    heads: int | None = _option(None, "attention heads, to split for --tp (default: config.json beside SRC)")
    kv_heads: int | None = _option(None, "key/value heads (GQA), to split for --tp")
    target: str = _option(
        "fastfuse",
        "fastfuse: fused.* keys beside the originals (default); vllm: the names and [sum(out), in] layout "
        "vLLM, SGLang and transformers' Phi-3 load as already fused, sources dropped",
        choices=lambda: tuple(rules.TARGETS),
    )
    quantization: str | None = _option(
        None,
        "target ctranslate2: the weights' type, as ct2-transformers-converter's --quantization "
        "(default: the checkpoint's)",
        choices=lambda: rules.CT2_QUANTIZATIONS,
        scope=WRITE_ONLY,
    )
    tokenizer_from: str | None = _option(
        None,
        "target ctranslate2: the Hugging Face folder whose config, tokenizer and preprocessor config "
        "to use (default: the checkpoint's folder; needed for an openai-whisper .pt)",
        scope=WRITE_ONLY,
    )

    def __post_init__(self) -> None:
        if self.target not in rules.TARGETS:
            raise FuseError(f"target {self.target!r}: expected one of {list(rules.TARGETS)}")
        preset = rules.TARGETS[self.target]
        if self.layout is None:
            object.__setattr__(self, "layout", preset.layout)
        if self.keep_originals is None:
            object.__setattr__(self, "keep_originals", not preset.drop_sources)
        for name in preset.enables:
            object.__setattr__(self, name, True)
        for name in ("quantization", "tokenizer_from"):
            if getattr(self, name) is not None and not preset.folder:
                raise FuseError(f"{name}={getattr(self, name)!r} is for target 'ctranslate2', not {self.target!r}")
        if self.quantization is not None and self.quantization not in rules.CT2_QUANTIZATIONS:
            raise FuseError(f"quantization {self.quantization!r}: expected one of {list(rules.CT2_QUANTIZATIONS)}")
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


def options() -> tuple[Option, ...]:
    """Every option of :class:`FuseOptions`, as the interfaces spell it, in declaration order."""
    listed = []
    for f in fields(FuseOptions):
        meta = f.metadata
        flag = meta["flag"]
        listed.append(
            Option(
                name=f.name,
                type=str(f.type),
                default=f.default,
                help=meta["help"],
                flag=("--" + f.name.replace("_", "-")) if flag == "" else flag,
                choices=meta["choices"]() if meta["choices"] else None,
                scope=meta["scope"],
                flag_help=meta["flag_help"],
            )
        )
    return tuple(listed)
