"""Benchmark peers: other tools that produce fused Whisper weights, run on the same checkpoint.

CTranslate2's ``ct2-transformers-converter`` is what most Whisper users run today to get fused
attention weights (faster-whisper's models are made with it). It reads a Hugging Face model
*folder* (``config.json``, ``model.safetensors``, the tokenizer), not a bare safetensors file,
so :func:`whisper_model_dir` builds one locally, with no download: the published architecture
numbers of a Whisper size, random float16 weights with exactly the key names and shapes
``save_pretrained`` writes, a synthetic byte-level BPE tokenizer with Whisper's id layout
(special, language and timestamp tokens), and the generation/preprocessor configs.

``python bench/peers.py [--size tiny|large-v3]`` runs the converter once and ``fastfuse fuse``
once on the same ``model.safetensors`` (page cache warmed), each under the bench ``peak_rss``.

Like ``cases``, this module imports only the standard library and numpy at the top;
transformers, torch and ctranslate2 are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

CONVERTER = "ct2-transformers-converter"
# What faster-whisper's published models were converted with (its README and model cards):
# ct2-transformers-converter --model openai/whisper-large-v3 --output_dir faster-whisper-large-v3 \
#     --copy_files tokenizer.json preprocessor_config.json --quantization float16
# faster-whisper reads tokenizer.json (else it downloads one) and preprocessor_config.json
# (feature_size 128 for v3) from the converted folder, so users copy both.
COPY_FILES = ("tokenizer.json", "preprocessor_config.json")

# Published Whisper configs: d_model, encoder layers, decoder layers, heads, vocabulary, mel bins
# (ffn = 4 * d_model, head size 64, 1500 audio and 448 text positions for every size).
WHISPER_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (384, 4, 4, 6, 51865, 80),
    "base": (512, 6, 6, 8, 51865, 80),
    "small": (768, 12, 12, 12, 51865, 80),
    "medium": (1024, 24, 24, 16, 51865, 80),
    "large-v2": (1280, 32, 32, 20, 51865, 80),
    "large-v3": (1280, 32, 32, 20, 51866, 128),
    "large-v3-turbo": (1280, 32, 4, 20, 51866, 128),
    "distil-large-v3": (1280, 32, 2, 20, 51866, 128),
}
# Published generation_config.json alignment heads (the same table CTranslate2's converter keeps).
_ALIGNMENT_HEADS = {
    "tiny": [[2, 2], [3, 0], [3, 2], [3, 3], [3, 4], [3, 5]],
    "large-v3": [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]],
}
# Non-speech symbols Whisper suppresses (ids in the real BPE vocabulary; here only config data).
_SUPPRESS_SYMBOLS = [
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359, 503, 522, 542, 873,
    893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268, 3536, 3846, 3961, 4183, 4667, 6585, 6647,
    7273, 9061, 9383, 10428, 10929, 11938, 12033, 12331, 12562, 13793, 14157, 14635, 15265, 15618, 16553, 16604,
    18362, 18956, 20075, 21675, 22520, 26130, 26161, 26435, 28279, 29464, 31650, 32302, 32470, 36865, 42863, 47425,
    49870, 50254,
]  # fmt: skip
_BPE_TOKENS = 50257  # multilingual Whisper: 256 byte tokens + 50000 merges + "", then <|endoftext|> = 50257
_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>
_SEED = 0
# Written last into a finished folder; a folder with another stamp (an older generator) is rebuilt.
_STAMP = ".fastfuse-bench"
_FORMAT = "2"


def ctranslate2_available() -> bool:
    """ctranslate2 is importable and this interpreter's scripts folder has ``ct2-transformers-converter``."""
    return importlib.util.find_spec("ctranslate2") is not None and _converter().is_file()


def _converter() -> Path:
    return Path(sysconfig.get_path("scripts")) / CONVERTER


def ctranslate2_argv(model_dir: Path, output_dir: Path, quantization: str = "float16") -> list[str]:
    """The converter command faster-whisper users run, with this interpreter's (the venv's) script."""
    return [
        str(_converter()),
        "--model",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--copy_files",
        *COPY_FILES,
        "--quantization",
        quantization,
        "--force",
    ]


# ---------------------------------------------------------------------------------------------
# A Hugging Face Whisper folder, generated locally.


def whisper_model_dir(size: str, cache: Path) -> Path:
    """``cache/hf-whisper-{size}/``: a Hugging Face Whisper folder with random float16 weights.

    Built once, in a temporary folder renamed into place (a killed run leaves no half cache;
    leftovers of dead runs are removed), and rebuilt when its ``.fastfuse-bench`` stamp is not
    this generator's format. Holds config.json, generation_config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json and preprocessor_config.json.
    """
    if size not in WHISPER_CONFIGS:
        raise ValueError(f"unknown size {size!r}; expected one of {list(WHISPER_CONFIGS)}")
    final = cache / f"hf-whisper-{size}"
    if _stamp(final) == _FORMAT:
        return final
    cache.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(cache, final.name)
    temp = cache / f".{final.name}.partial-{os.getpid()}"
    stale = cache / f".{final.name}.stale-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        config, ids = _write_configs(size, temp)
        _write_tokenizer(size, temp, ids)
        _write_weights(config, temp / "model.safetensors")
        (temp / _STAMP).write_text(_FORMAT)
        if final.is_dir():  # written by an older generator: move it aside first
            final.rename(stale)
        try:
            temp.rename(final)
        except OSError:  # another process finished first: keep its folder
            if _stamp(final) != _FORMAT:
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _stamp(folder: Path) -> str | None:
    try:
        return (folder / _STAMP).read_text()
    except OSError:
        return None


def _remove_dead_partials(cache: Path, name: str) -> None:
    for partial in [*cache.glob(f".{name}.partial-*"), *cache.glob(f".{name}.stale-*")]:
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(partial, ignore_errors=True)


def _special_ids(size: str) -> dict[str, Any]:
    """Whisper's multilingual id layout: BPE, <|endoftext|>, <|startoftranscript|>, languages, tasks, timestamps."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = WHISPER_CONFIGS[size][4]
    languages = list(LANGUAGES)[: vocab - _BPE_TOKENS - 2 - 6 - _TIMESTAMPS]  # 99 (v1/v2) or 100 (v3: + yue)
    eot = _BPE_TOKENS
    sot = eot + 1
    tasks = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>"]
    tasks.append("<|nospeech|>" if len(languages) == 100 else "<|nocaptions|>")
    tasks.append("<|notimestamps|>")
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{lang}|>" for lang in languages), *tasks]
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(_TIMESTAMPS)]
    if _BPE_TOKENS + len(specials) + len(timestamps) != vocab:
        raise AssertionError(f"Whisper id layout does not add up to {vocab}")
    ids = {token: eot + i for i, token in enumerate(specials)}
    return {"specials": specials, "timestamps": timestamps, "ids": ids, "languages": languages, "sot": sot}


def _write_configs(size: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

    d, encoder_layers, decoder_layers, heads, vocab, mels = WHISPER_CONFIGS[size]
    layout = _special_ids(size)
    ids = layout["ids"]
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    tasks = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>")
    nospeech = next(t for t in ("<|nospeech|>", "<|nocaptions|>") if t in ids)
    suppress = [*_SUPPRESS_SYMBOLS, sot, *(ids[t] for t in tasks), ids[nospeech]]
    common = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot - 1 if mels == 128 else eot,  # v3 configs pad with 50256
        "decoder_start_token_id": sot,
        "begin_suppress_tokens": [220, eot],
    }
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mels,
        d_model=d,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d,
        decoder_ffn_dim=4 * d,
        max_source_positions=1500,
        max_target_positions=448,
        activation_function="gelu",
        suppress_tokens=suppress,
        dtype="float16",
        architectures=["WhisperForConditionalGeneration"],
        **common,
    )
    config.save_pretrained(folder)
    generation = GenerationConfig(
        **common,
        max_length=448,
        suppress_tokens=suppress,
        is_multilingual=True,
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in layout["languages"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        **({"alignment_heads": _ALIGNMENT_HEADS[size]} if size in _ALIGNMENT_HEADS else {}),
    )
    generation.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=mels).save_pretrained(folder)  # preprocessor_config.json
    return config, layout


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet in vocabulary order (so id 220 is 'Ġ', the space)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _write_tokenizer(size: str, folder: Path, layout: dict[str, Any]) -> None:
    """A WhisperTokenizer with Whisper's ids: 256 byte tokens, 50000 two-byte merges, "" (50256), then specials.

    The multilingual vocabulary's id 50256 is the empty string (GPT-2's English vocabulary has
    <|endoftext|> there); CTranslate2 >= 4.8 tells a multilingual model by that token.
    """
    from transformers import WhisperTokenizer

    alphabet = _byte_tokens()
    merges = [(a, b) for a in alphabet for b in alphabet][: _BPE_TOKENS - 1 - len(alphabet)]
    vocab = {token: i for i, token in enumerate([*alphabet, *(a + b for a, b in merges), ""])}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": layout["specials"][1:]})
    tokenizer.add_tokens(layout["timestamps"])
    expected = WHISPER_CONFIGS[size][4]
    got = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|notimestamps|>", layout["timestamps"][-1]])
    if len(tokenizer) != expected or got != [_BPE_TOKENS, expected - _TIMESTAMPS - 1, expected - 1]:
        raise AssertionError(f"tokenizer layout: {len(tokenizer)} tokens, ids {got}")
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json


def saved_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of what ``WhisperForConditionalGeneration(config).save_pretrained`` writes (tied keys left out)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in tied}


def _write_weights(config: Any, path: Path, chunk: int = 1 << 24) -> None:
    """A float16 safetensors file (safetensors' own layout: keys sorted, header space-padded to 8 bytes).

    Values: N(0, 0.02) like ``init_std``, layer-norm scales 1, generated per tensor in chunks so
    memory stays at one chunk whatever the model size.
    """
    shapes = saved_shapes(config)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        nbytes = 2 * int(np.prod(shapes[key]))
        header[key] = {"dtype": "F16", "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(_SEED)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key in sorted(shapes):
            count = int(np.prod(shapes[key]))
            if key.endswith("layer_norm.weight"):
                f.write(np.ones(count, np.float16).tobytes())
                continue
            for start in range(0, count, chunk):
                values = rng.standard_normal(min(chunk, count - start), dtype=np.float32)
                values *= 0.02
                f.write(values.astype(np.float16).tobytes())
        if f.tell() != 8 + len(raw) + offset:
            raise AssertionError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(raw) + offset}")


# ---------------------------------------------------------------------------------------------
# Running the peers.


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_ctranslate2(output_dir: Path) -> dict[str, Any]:
    """Load a converted folder in CTranslate2 (CPU) and run the encoder and one language detection."""
    import ctranslate2

    model = ctranslate2.models.Whisper(str(output_dir), device="cpu")
    features = np.random.default_rng(1).standard_normal((1, model.n_mels, 3000), dtype=np.float32)
    encoded = model.encode(ctranslate2.StorageView.from_array(features))
    languages = model.detect_language(encoded) if model.is_multilingual else [[]]
    return {
        "n_mels": model.n_mels,
        "is_multilingual": model.is_multilingual,
        "encoder_output": list(encoded.shape),
        "top_language": languages[0][0] if languages[0] else None,
    }


def _bench(name: str) -> Any:
    """A helper of the bench folder (``harness``, or ``file_cases`` where it lives there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for module in ("harness", "file_cases"):
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(found, name):
            return getattr(found, name)
    raise AttributeError(f"no bench helper {name!r}")


def _measure(argv: list[str], source: Path) -> dict[str, float]:
    """``peak_rss(argv)`` on a warm source and a clean page cache, plus the writeback it left.

    ``sync_seconds``: an ``os.sync()`` right after the run, i.e. the output bytes the tool left
    dirty (fastfuse fsyncs its output before the rename; the converter does not).
    """
    _bench("warm_page_cache")(source)
    os.sync()  # nothing dirty from earlier steps is written back during the measured run
    peak = _bench("peak_rss")(argv)
    start = time.perf_counter()
    os.sync()
    return {**peak, "sync_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run ct2-transformers-converter and `fastfuse fuse` on one checkpoint."
    )
    parser.add_argument("--size", default="tiny", choices=list(WHISPER_CONFIGS))
    parser.add_argument("--quantization", default="float16")
    parser.add_argument("--check", action="store_true", help="load the converted folder in CTranslate2 afterwards")
    parser.add_argument("--keep", action="store_true", help="keep both outputs (default: removed at the end)")
    args = parser.parse_args(argv)

    if not ctranslate2_available():
        print(f"ctranslate2 or {CONVERTER} is not installed in {sys.prefix}", file=sys.stderr)
        return 2
    cache = _bench("cache_dir")()
    model_dir = whisper_model_dir(args.size, cache)
    source = model_dir / "model.safetensors"
    out = cache / "peers-output"
    ct2_out, fused = out / f"ct2-{args.size}", out / f"fastfuse-{args.size}.safetensors"
    out.mkdir(exist_ok=True)
    print(f"model    {model_dir} ({folder_bytes(source) / 1e6:.1f} MB model.safetensors)")
    runs = {
        "ct2-transformers-converter": (ctranslate2_argv(model_dir, ct2_out, args.quantization), ct2_out),
        "fastfuse fuse": (_bench("file_argv")("cli", source, fused), fused),
    }
    try:
        for name, (command, output) in runs.items():
            peak = _measure(command, source)
            print(
                f"{name:27} {peak['seconds']:7.2f} s  RssAnon {peak['rss_anon_mb']:8.1f} MB  "
                f"VmHWM {peak['vm_hwm_mb']:8.1f} MB  output {folder_bytes(output) / 1e6:8.1f} MB  "
                f"then sync {peak['sync_seconds']:5.2f} s"
            )
        if args.check:
            print(f"check    ctranslate2.models.Whisper: {check_ctranslate2(ct2_out)}")
    finally:
        if not args.keep:
            shutil.rmtree(ct2_out, ignore_errors=True)
            fused.unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
