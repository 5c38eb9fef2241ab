"""Fusion rules as data: which source keys form which group, and the fused key names.

Rules never see bytes or shapes beyond what they declare. A new model family is a new
:class:`Scheme` entry in :data:`SCHEMES`, not a new code path.

Templates use ``{prefix}`` (one of the scheme's prefixes), ``{i}`` (layer index), ``{part}``
(a part name) and ``{kind}`` (``weight`` or ``bias``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupRule", "Scheme", "SCHEMES", "scheme_by_name"]


@dataclass(frozen=True)
class GroupRule:
    """One fusion group: parts ``[o_j, in]`` -> ``[in, sum(o_j)]`` (+ biases -> ``[sum(o_j)]``).

    Attributes:
        name: option name, e.g. ``"encoder_qkv"``; used by ``names=`` overrides.
        source: template of a part's key, with ``{prefix}``, ``{i}`` if ``per_layer``,
            ``{part}`` and ``{kind}``.
        parts: the ``{part}`` values, in fused order (q, k, v).
        fused: template of the fused key, with ``{i}`` if ``per_layer`` and ``{kind}``.
        per_layer: the group repeats for layers ``0..n-1`` found in the keys.
        option: ``None`` if on by default, else the keyword that turns it on
            (``"cross_kv"``, ``"logits"``).
        square: every part is ``[d, d]`` with the model's one ``d`` (Whisper attention).
        drop_sources: ``keep_originals=False`` may drop the sources (not for embeddings, which
            the model still needs for its token lookup).
        alternatives: extra templates tried in order when ``source`` is absent (non-layer
            groups only), e.g. an untied ``proj_out.weight`` before the embedding.
    """

    name: str
    source: str
    parts: tuple[str, ...]
    fused: str
    per_layer: bool = True
    option: str | None = None
    square: bool = True
    drop_sources: bool = True
    alternatives: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        """Templates tried in order for each part's weight."""
        return (*self.alternatives, self.source)


@dataclass(frozen=True)
class Scheme:
    """A naming convention: prefixes it may carry, and its groups (the first one detects it)."""

    name: str
    description: str
    groups: tuple[GroupRule, ...]
    prefixes: tuple[str, ...] = ("",)


_HF_ATTN = "{prefix}%s.layers.{i}.%s.{part}_proj.{kind}"
_OPENAI_ATTN = "%s.blocks.{i}.%s.{part}.{kind}"

HF_WHISPER = Scheme(
    name="hf-whisper",
    description="Hugging Face transformers Whisper (WhisperForConditionalGeneration / WhisperModel)",
    prefixes=("model.", ""),
    groups=(
        GroupRule("encoder_qkv", _HF_ATTN % ("encoder", "self_attn"), ("q", "k", "v"), "fused.enc.{i}.self_attn.qkv.{kind}"),
        GroupRule("decoder_qkv", _HF_ATTN % ("decoder", "self_attn"), ("q", "k", "v"), "fused.dec.{i}.self_attn.qkv.{kind}"),
        GroupRule(
            "cross_kv", _HF_ATTN % ("decoder", "encoder_attn"), ("k", "v"), "fused.dec.{i}.encoder_attn.kv.{kind}",
            option="cross_kv",
        ),
        GroupRule(
            "logits", "{prefix}decoder.embed_tokens.{kind}", ("",), "fused.dec.logits.{kind}",
            per_layer=False, option="logits", square=False, drop_sources=False,
            alternatives=("proj_out.{kind}",),
        ),
    ),
)

OPENAI_WHISPER = Scheme(
    name="openai-whisper",
    description="openai-whisper state dict (whisper.model.Whisper)",
    groups=(
        GroupRule("encoder_qkv", _OPENAI_ATTN % ("encoder", "attn"), ("query", "key", "value"), "fused.enc.{i}.self_attn.qkv.{kind}"),
        GroupRule("decoder_qkv", _OPENAI_ATTN % ("decoder", "attn"), ("query", "key", "value"), "fused.dec.{i}.self_attn.qkv.{kind}"),
        GroupRule(
            "cross_kv", _OPENAI_ATTN % ("decoder", "cross_attn"), ("key", "value"), "fused.dec.{i}.encoder_attn.kv.{kind}",
            option="cross_kv",
        ),
        GroupRule(
            "logits", "decoder.token_embedding.{kind}", ("",), "fused.dec.logits.{kind}",
            per_layer=False, option="logits", square=False, drop_sources=False,
        ),
    ),
)

SCHEMES: tuple[Scheme, ...] = (HF_WHISPER, OPENAI_WHISPER)


def scheme_by_name(name: str) -> Scheme:
    """The scheme called ``name``; KeyError lists the known names."""
    for scheme in SCHEMES:
        if scheme.name == name:
            return scheme
    raise KeyError(name)
