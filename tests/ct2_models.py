"""Tiny Whisper model folders for the CTranslate2 tests, built offline (no download).

``make_tiny`` writes a random-initialised ``WhisperForConditionalGeneration`` with
``save_pretrained`` (weights perturbed so no two tensors are equal unless ``perturb=False``),
a byte-level BPE tokenizer shaped like openai's (special tokens, languages, optionally the
timestamp tokens), a generation config and a feature extractor config. ``save_openai_pt``
writes the same weights as an openai-whisper ``.pt`` (renamed by openai-whisper's own names,
independently of fastfuse's tables). ``convert`` runs CTranslate2's converter with its command
line's semantics, in process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openai_names import openai_name

LANGS = ("en", "de", "fr", "es")
NUM_TIMESTAMPS = 16
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("a", "t"))
SPECIALS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    *(f"<|{lang}|>" for lang in LANGS),
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
COPIED = ["tokenizer.json", "preprocessor_config.json"]


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode characters, in its order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _tokenizer(timestamps: bool) -> Any:
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=list(MERGES))
    extra = [AddedToken(t, special=True, normalized=False) for t in SPECIALS[1:]]
    tokenizer.add_special_tokens({"extra_special_tokens": extra})
    if timestamps:
        tokenizer.add_tokens([AddedToken("<|%.2f|>" % (i * 0.02), normalized=False) for i in range(NUM_TIMESTAMPS)])
    return tokenizer


def make_tiny(
    folder: Path,
    *,
    perturb: bool = True,
    timestamps: bool = False,
    generation_config: bool = True,
    tied: bool = True,
    dtype: str = "float32",
    d_model: int = 64,
    layers: int = 2,
    decoder_layers: int | None = None,
    **save: Any,
) -> Path:
    """A tiny HF Whisper folder (d ``d_model`` 64, ``layers`` 2 encoder and ``decoder_layers``
    (default: as many) decoder layers, 4 heads); ``save`` goes to ``save_pretrained``."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = _tokenizer(timestamps)
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in SPECIALS}
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(vocab) + (0 if timestamps else NUM_TIMESTAMPS),
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers if decoder_layers is None else decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=[1, 2, 7],
        begin_suppress_tokens=[vocab["Ġ"], eot],
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "embed_positions" not in name:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
            if not tied:
                model.proj_out.weight.copy_(torch.randn(model.proj_out.weight.shape, generator=generator))
    model = model.to(getattr(torch, dtype))
    if generation_config:
        model.generation_config = GenerationConfig(
            decoder_start_token_id=ids["<|startoftranscript|>"],
            eos_token_id=eot,
            pad_token_id=eot,
            alignment_heads=[[1, 0], [1, 2], [0, 3]],
            lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGS},
            suppress_tokens=[1, 2, 7, 11, 13],
            begin_suppress_tokens=[vocab["Ġ"], eot],
        )
    model.save_pretrained(folder, **save)
    if not generation_config:
        (folder / "generation_config.json").unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def as_torch_bin(folder: Path, out: Path, shards: int = 1) -> Path:
    """``folder`` with its weights as ``torch.save`` files (transformers 5 saves only safetensors):
    ``pytorch_model.bin``, or ``shards`` files with ``pytorch_model.bin.index.json``."""
    import json

    import torch
    from safetensors.torch import load_file

    out.mkdir()
    for path in folder.iterdir():
        if path.name != "model.safetensors":
            (out / path.name).write_bytes(path.read_bytes())
    weights = load_file(folder / "model.safetensors")
    if shards == 1:
        torch.save(weights, out / "pytorch_model.bin")
        return out
    names = sorted(weights)
    weight_map = {}
    for n in range(shards):
        file = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: weights[k] for k in names[n::shards]}
        torch.save(part, out / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in weights.values())}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return out


def save_openai_pt(hf_folder: Path, path: Path) -> Path:
    """The weights of ``hf_folder`` as openai-whisper's ``torch.save({"dims", "model_state_dict"})``."""
    import torch
    from safetensors.torch import load_file
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(hf_folder)
    state = {}
    for key, value in load_file(hf_folder / "model.safetensors").items():
        if key == "proj_out.weight":
            continue
        state[openai_name(key)] = value
    dims = {
        "n_mels": config.num_mel_bins,
        "n_vocab": config.vocab_size,
        "n_audio_ctx": config.max_source_positions,
        "n_audio_state": config.d_model,
        "n_audio_head": config.encoder_attention_heads,
        "n_audio_layer": config.encoder_layers,
        "n_text_ctx": config.max_target_positions,
        "n_text_state": config.d_model,
        "n_text_head": config.decoder_attention_heads,
        "n_text_layer": config.decoder_layers,
    }
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path


def convert(hf_folder: Path, out: Path, quantization: str | None) -> Path:
    """CTranslate2's converter, as ``ct2-transformers-converter`` runs it (float16 loading for
    ``float16`` and ``int8_float16``), with ``--copy_files tokenizer.json preprocessor_config.json``."""
    import ctranslate2

    converter = ctranslate2.converters.TransformersConverter(
        str(hf_folder), copy_files=COPIED, load_as_float16=quantization in ("float16", "int8_float16")
    )
    converter.convert(str(out), quantization=quantization, force=True)
    return out
