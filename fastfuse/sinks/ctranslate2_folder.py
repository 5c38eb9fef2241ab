"""A CTranslate2 model folder described (what ``fastfuse inspect CT2_DIR`` prints) and verified
against a fresh conversion of its source (``fastfuse verify CT2_DIR --source``).

Reads ``model.bin`` (``formats.ctranslate2_bin``: names, dtypes and shapes; the data stays
mapped, unread except the rank-0 scalars), ``config.json`` and ``vocabulary.json``, wherever they
were written from (fastfuse or CTranslate2's converter).

Example:
    >>> quantization_of({"encoder/conv1/weight": "int8", "encoder/layer_norm/gamma": "float16"})
    'int8_float16'
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError, MalformedFileError, MissingTensorError
from fastfuse.formats.ctranslate2_bin import ModelBin, read_model_bin
from fastfuse.planning.options import FuseOptions
from fastfuse.sinks.ctranslate2_writer import fuse_ctranslate2

__all__ = ["MODEL_BIN", "describe_ctranslate2", "is_ctranslate2_folder", "quantization_of", "verify_ctranslate2"]

MODEL_BIN = "model.bin"
# The variables CTranslate2 keeps fused (what fastfuse fuses): self-attention q|k|v, cross-attention k|v.
_FUSED = {
    "self-attention q|k|v": re.compile(r"(encoder|decoder)/layer_\d+/self_attention/linear_0/(weight|bias)"),
    "cross-attention k|v": re.compile(r"decoder/layer_\d+/attention/linear_1/(weight|bias)"),
}
_SCALARS = ("encoder/num_heads", "decoder/num_heads")
_CONFIG_LISTS = ("alignment_heads", "lang_ids", "suppress_ids", "suppress_ids_begin")


def is_ctranslate2_folder(path: Path) -> bool:
    """A folder holding a ``model.bin`` (and no checkpoint fastfuse reads: those are described as such)."""
    return path.is_dir() and (path / MODEL_BIN).is_file()


def quantization_of(dtypes: Mapping[str, str]) -> str:
    """The converter's ``--quantization`` that gives these variable dtypes (name -> dtype): the
    dtype of the weights, ``int8_{other}`` where weights are int8 and layer norms are not."""
    weight = next((d for n, d in dtypes.items() if n.endswith("/weight")), None)
    if weight is None:
        raise FuseError("model.bin: no variable named */weight; expected a CTranslate2 model")
    other = next((d for n, d in dtypes.items() if n.endswith("/gamma")), weight)
    return f"int8_{other}" if weight == "int8" else weight


def describe_ctranslate2(folder: Path) -> dict[str, Any]:
    """What ``folder`` (a CTranslate2 model directory) holds, as JSON-ready values.

    Keys: ``folder``, ``format`` (``"ctranslate2"``), ``spec``, ``revision``, ``variables``
    (count), ``data_bytes``, ``dtypes`` (dtype -> count), ``quantization``, ``fused`` (kind ->
    names), ``fused_shapes`` (kind -> the first weight's shape), ``aliases`` (alias -> target), ``layers`` (encoder/decoder counts), ``d_model``,
    ``heads``, ``mels``, ``vocabulary`` (size or None), ``config`` (each list of config.json:
    its length; other keys as they are, or None without one) and ``files``.

    Raises:
        MalformedFileError: model.bin, config.json or vocabulary.json that cannot be read (it
            names the file and what is wrong).
    """
    model = read_model_bin(folder / MODEL_BIN)
    dtypes = {name: dtype for name, (dtype, _, _) in model.variables.items()}
    shapes = {name: shape for name, (_, shape, _) in model.variables.items()}
    fused = {kind: sorted(n for n in shapes if pattern.fullmatch(n)) for kind, pattern in _FUSED.items()}
    layers = {
        part: len({m.group(1) for n in shapes if (m := re.match(rf"{part}/layer_(\d+)/", n))})
        for part in ("encoder", "decoder")
    }
    heads = {name.split("/")[0]: _scalar(model.variables[name]) for name in _SCALARS if name in model.variables}
    conv = shapes.get("encoder/conv1/weight")
    return {
        "folder": str(folder),
        "format": "ctranslate2",
        "spec": model.spec,
        "revision": model.revision,
        "variables": len(model.variables),
        "data_bytes": sum(len(data) for _, _, data in model.variables.values()),
        "dtypes": dict(sorted(Counter(dtypes.values()).items())),
        "quantization": quantization_of(dtypes),
        "fused": {kind: names for kind, names in fused.items() if names},
        "fused_shapes": {kind: list(shapes[_weight(names)]) for kind, names in fused.items() if names},
        "aliases": dict(sorted(model.aliases.items())),
        "layers": layers,
        "d_model": conv[0] if conv else None,
        "heads": heads,
        "mels": conv[1] if conv and len(conv) == 3 else None,
        "vocabulary": _vocabulary_size(folder),
        "config": _config(folder),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
    }


def _weight(names: list[str]) -> str:
    return next((n for n in names if n.endswith("/weight")), names[0])


def _scalar(variable: tuple[str, tuple[int, ...], memoryview]) -> int:
    dtype, _, data = variable
    return int(np.frombuffer(data, dtype)[0])


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MalformedFileError(f"{path}: not readable as JSON ({e}); expected CTranslate2's {path.name}") from None


def _vocabulary_size(folder: Path) -> int | None:
    tokens = _json(folder / "vocabulary.json")
    if tokens is not None and not isinstance(tokens, list):
        raise MalformedFileError(f"{folder / 'vocabulary.json'}: a {type(tokens).__name__}; expected a list of tokens")
    return None if tokens is None else len(tokens)


def _config(folder: Path) -> dict[str, Any] | None:
    config = _json(folder / "config.json")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise MalformedFileError(f"{folder / 'config.json'}: a {type(config).__name__}; expected an object")
    return {k: len(v) if k in _CONFIG_LISTS and isinstance(v, list) else v for k, v in sorted(config.items())}


def verify_ctranslate2(folder: Path, source: PathLike | None) -> list[str]:
    """The variables (and aliases) of ``folder``'s model.bin that differ from a fresh conversion of ``source``.

    The quantization is read from the file (the dtypes of a weight and of a layer norm); the
    fresh model.bin is written to a temporary folder beside ``folder`` and compared name by name.
    """
    if source is None:
        raise MissingTensorError(
            f"cannot verify {folder}: a CTranslate2 model keeps no originals; pass the checkpoint it was "
            "converted from as source= (--source)"
        )
    written = read_model_bin(folder / "model.bin")
    quantization = quantization_of({name: dtype for name, (dtype, _, _) in written.variables.items()})
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.verify.") as temp:
        fresh = Path(temp) / "model"
        fuse_ctranslate2(source, fresh, FuseOptions(target="ctranslate2", quantization=quantization))
        expected = read_model_bin(fresh / "model.bin")
        names = sorted(set(written.variables) | set(expected.variables) | set(written.aliases) | set(expected.aliases))
        return [
            name
            for name in names
            if written.aliases.get(name) != expected.aliases.get(name)
            or _record(written, name) != _record(expected, name)
        ]


def _record(model: ModelBin, name: str) -> tuple[str, tuple[int, ...], bytes] | None:
    found = model.variables.get(name)
    return None if found is None else (found[0], found[1], bytes(found[2]))
