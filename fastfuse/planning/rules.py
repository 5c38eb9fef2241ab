"""Fusion rules as data: which source keys form which group, and the fused key names.

Rules never see bytes or shapes beyond what they declare. A new model family is a new
:class:`Scheme` entry in :data:`SCHEMES`, not a new code path.

Templates use ``{prefix}`` (one of the scheme's prefixes), ``{i}`` (layer index), ``{part}``
(a part name) and ``{kind}`` (``weight`` or ``bias``). A :class:`Target` is a preset of fused
names and layout for an engine (:data:`TARGETS`), also data.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CT2_QUANTIZATIONS", "SCHEMES", "TARGETS", "GroupRule", "Scheme", "Target", "scheme_by_name"]


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
        option: ``None`` if on by default, else the option that turns it on (``"cross_kv"``,
            ``"logits"``, ``"convert"`` for checkpoints that are already fused).
        square: every part is ``[d, d]`` with the model's one ``d`` (Whisper attention); all
            other parts need only share the model's input width ``d``.
        drop_sources: ``keep_originals=False`` may drop the sources (not for embeddings, which
            the model still needs for its token lookup).
        alternatives: templates tried after ``source`` when it is absent (non-layer groups),
            e.g. the embedding when no untied ``proj_out.weight`` was saved.
        transposed: sources are stored ``[in, out]`` (GPT-2's Conv1D), not ``[out, in]``.
        split: how each part divides among tensor-parallel ranks: ``"heads"`` (by attention
            heads), ``"kv_heads"`` (by key/value heads, replicated when there are fewer than
            ranks) or ``"rows"`` (evenly). Empty: the group cannot be split.
    """

    name: str
    source: str
    parts: tuple[str, ...]
    fused: str
    per_layer: bool = True
    option: str | None = None
    square: bool = False
    drop_sources: bool = True
    alternatives: tuple[str, ...] = ()
    transposed: bool = False
    split: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        """Templates tried in order for each part's weight."""
        return (self.source, *self.alternatives)


@dataclass(frozen=True)
class Scheme:
    """A naming convention: the prefixes it may carry and its groups.

    ``already_fused``: the checkpoint stores fused tensors (Phi-3, GPT-2); its groups only
    convert layouts, on request (``convert=True``).
    """

    name: str
    description: str
    groups: tuple[GroupRule, ...]
    prefixes: tuple[str, ...] = ("",)
    already_fused: bool = False


_HF_ATTN = "{prefix}%s.layers.{i}.%s.{part}_proj.{kind}"
_OPENAI_ATTN = "%s.blocks.{i}.%s.{part}.{kind}"
_QKV_SPLIT = ("heads", "kv_heads", "kv_heads")
_KV_SPLIT = ("kv_heads", "kv_heads")


def _whisper(
    name: str,
    description: str,
    source: str,
    parts: tuple[str, ...],
    kv: tuple[str, ...],
    logits: tuple[str, ...],
    prefixes: tuple[str, ...],
    sides: tuple[str, str, str],
) -> Scheme:
    """The four Whisper groups in one naming; ``sides`` names encoder self, decoder self, cross blocks."""
    encoder, decoder, cross = sides
    return Scheme(
        name=name,
        description=description,
        prefixes=prefixes,
        groups=(
            GroupRule(
                "encoder_qkv",
                source % ("encoder", encoder),
                parts,
                "fused.enc.{i}.self_attn.qkv.{kind}",
                square=True,
                split=_QKV_SPLIT,
            ),
            GroupRule(
                "decoder_qkv",
                source % ("decoder", decoder),
                parts,
                "fused.dec.{i}.self_attn.qkv.{kind}",
                square=True,
                split=_QKV_SPLIT,
            ),
            GroupRule(
                "cross_kv",
                source % ("decoder", cross),
                kv,
                "fused.dec.{i}.encoder_attn.kv.{kind}",
                option="cross_kv",
                square=True,
                split=_KV_SPLIT,
            ),
            GroupRule(
                "logits",
                logits[0],
                ("",),
                "fused.dec.logits.{kind}",
                per_layer=False,
                option="logits",
                drop_sources=False,
                alternatives=logits[1:],
                split=("rows",),
            ),
        ),
    )


HF_WHISPER = _whisper(
    "hf-whisper",
    "Hugging Face transformers Whisper (WhisperForConditionalGeneration / WhisperModel)",
    _HF_ATTN,
    ("q", "k", "v"),
    ("k", "v"),
    ("proj_out.{kind}", "{prefix}decoder.embed_tokens.{kind}"),
    ("model.", ""),
    ("self_attn", "self_attn", "encoder_attn"),
)

OPENAI_WHISPER = _whisper(
    "openai-whisper",
    "openai-whisper state dict (whisper.model.Whisper)",
    _OPENAI_ATTN,
    ("query", "key", "value"),
    ("key", "value"),
    ("decoder.token_embedding.{kind}",),
    ("",),
    ("attn", "attn", "cross_attn"),
)

HF_DECODER = Scheme(
    name="hf-llama",
    description="Hugging Face decoder-only LLMs with separate projections: Llama, Mistral, Gemma, Qwen2 (q/k/v biases)",
    prefixes=("model.", ""),
    groups=(
        GroupRule(
            "qkv",
            "{prefix}layers.{i}.self_attn.{part}_proj.{kind}",
            ("q", "k", "v"),
            "fused.layers.{i}.self_attn.qkv.{kind}",
            split=_QKV_SPLIT,
        ),
        GroupRule(
            "gate_up",
            "{prefix}layers.{i}.mlp.{part}_proj.{kind}",
            ("gate", "up"),
            "fused.layers.{i}.mlp.gate_up.{kind}",
            split=("rows", "rows"),
        ),
    ),
)

HF_PHI3 = Scheme(
    name="hf-phi3",
    description="Hugging Face Phi-3 (qkv_proj and gate_up_proj already fused, stored [out, in])",
    prefixes=("model.", ""),
    already_fused=True,
    groups=(
        GroupRule(
            "qkv",
            "{prefix}layers.{i}.self_attn.qkv_proj.{kind}",
            ("",),
            "fused.layers.{i}.self_attn.qkv.{kind}",
            option="convert",
        ),
        GroupRule(
            "gate_up",
            "{prefix}layers.{i}.mlp.gate_up_proj.{kind}",
            ("",),
            "fused.layers.{i}.mlp.gate_up.{kind}",
            option="convert",
        ),
    ),
)

GPT2 = Scheme(
    name="gpt2",
    description="GPT-2 (c_attn already fused, stored [in, 3*out] by its Conv1D)",
    prefixes=("transformer.", ""),
    already_fused=True,
    groups=(
        GroupRule(
            "qkv",
            "{prefix}h.{i}.attn.c_attn.{kind}",
            ("",),
            "fused.layers.{i}.self_attn.qkv.{kind}",
            option="convert",
            transposed=True,
        ),
    ),
)

SCHEMES: tuple[Scheme, ...] = (HF_WHISPER, OPENAI_WHISPER, HF_DECODER, HF_PHI3, GPT2)


def scheme_by_name(name: str) -> Scheme:
    """The scheme called ``name``; KeyError lists the known names."""
    for scheme in SCHEMES:
        if scheme.name == name:
            return scheme
    raise KeyError(name)


@dataclass(frozen=True)
class Target:
    """Where the fused tensors go: their names per scheme and group, layout, and the originals.

    ``names[scheme][group]`` is a fused key template (``{prefix}``, ``{i}``, ``{kind}``); a
    group absent from a scheme's names cannot be written for this target. ``drop_sources``:
    the engine loads the fused tensor instead of its parts, so the parts are left out.
    ``enables``: the group options the engine's format always needs (CTranslate2 keeps the
    cross-attention K|V fused). ``folder``: the output is a model folder in the engine's own
    format (written by its own sink), not safetensors.
    """

    name: str
    description: str
    layout: str
    drop_sources: bool
    names: dict[str, dict[str, str]]
    enables: tuple[str, ...] = ()
    folder: bool = False


# ct2-transformers-converter's --quantization values (fastfuse.planning.ctranslate2 defines each one).
CT2_QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16")

_VLLM_LLAMA = {
    "qkv": "{prefix}layers.{i}.self_attn.qkv_proj.{kind}",
    "gate_up": "{prefix}layers.{i}.mlp.gate_up_proj.{kind}",
}

TARGETS: dict[str, Target] = {
    "fastfuse": Target(
        "fastfuse",
        "fastfuse's own keys (fused.*) beside the originals, [in, sum(out)] for x @ W",
        layout="in_out",
        drop_sources=False,
        names={scheme.name: {group.name: group.fused for group in scheme.groups} for scheme in SCHEMES},
    ),
    "vllm": Target(
        "vllm",
        "the names vLLM, SGLang and transformers' Phi-3 load as already fused, [sum(out), in], parts dropped",
        layout="out_in",
        drop_sources=True,
        names={
            "hf-llama": _VLLM_LLAMA,
            "hf-whisper": {
                "encoder_qkv": "{prefix}encoder.layers.{i}.self_attn.qkv_proj.{kind}",
                "decoder_qkv": "{prefix}decoder.layers.{i}.self_attn.qkv_proj.{kind}",
                "cross_kv": "{prefix}decoder.layers.{i}.encoder_attn.kv_proj.{kind}",
            },
            # Already in the engines' form: nothing to write.
            "hf-phi3": {},
            "gpt2": {},
        },
    ),
    # The variable names of CTranslate2's WhisperSpec for the fused groups; the rest of its
    # variables are the table in fastfuse.planning.ctranslate2.
    "ctranslate2": Target(
        "ctranslate2",
        "a CTranslate2 Whisper model folder (faster-whisper): model.bin as ct2-transformers-converter writes it",
        layout="out_in",
        drop_sources=True,
        names={
            scheme: {
                "encoder_qkv": "encoder/layer_{i}/self_attention/linear_0/{kind}",
                "decoder_qkv": "decoder/layer_{i}/self_attention/linear_0/{kind}",
                "cross_kv": "decoder/layer_{i}/attention/linear_1/{kind}",
            }
            for scheme in ("hf-whisper", "openai-whisper")
        },
        enables=("cross_kv",),
        folder=True,
    ),
}
