"""Checkpoints on disk: resolve a file, an index or a folder; read and cross-check headers.

Knows paths and headers (through ``st_format``), not fusion: the sink in ``files`` and the
public ``plan`` use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import st_format
from ._typing import PathLike
from .errors import FuseError, MalformedFileError
from .plan import FuseOptions

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint", "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class _Meta:
    """Shape and dtype of a tensor known from a header only (what planning needs)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk: its shard files, each tensor's header entry and shard."""

    path: Path
    index: Path | None
    headers: tuple[st_format.Header, ...]
    location: dict[str, tuple[int, st_format.TensorInfo]]  # key -> (shard number, header entry)

    @property
    def metadata(self) -> dict[str, str]:
        """The first shard's ``__metadata__`` (shards of one checkpoint share it)."""
        return dict(self.headers[0].metadata or {})

    def metas(self) -> dict[str, _Meta]:
        return {key: _Meta(info.shape, st_format.dtype_of(info.dtype)) for key, (_, info) in self.location.items()}

    def with_config(self, options: FuseOptions) -> FuseOptions:
        """``options`` with head counts from a ``config.json`` beside the checkpoint, if needed and found.

        Only read when ``tp > 1`` and a head count was not given: ``num_attention_heads`` (or
        Whisper's ``encoder_attention_heads``) and ``num_key_value_heads``.
        """
        config_path = self.path.parent / "config.json"
        if options.tp == 1 or (options.heads and options.kv_heads) or not config_path.is_file():
            return options
        try:
            config = json.loads(config_path.read_text())
            heads = config.get("num_attention_heads") or config.get("encoder_attention_heads")
            kv_heads = config.get("num_key_value_heads") or heads
        except (OSError, ValueError, AttributeError) as exc:
            raise MalformedFileError(f"{config_path}: not a readable JSON config ({exc})") from None
        return replace(options, heads=options.heads or heads, kv_heads=options.kv_heads or kv_heads)

    def arrays(self) -> dict[str, np.ndarray]:
        """Read-only zero-copy views of every tensor, in shard then header order."""
        arrays: dict[str, np.ndarray] = {}
        for header in self.headers:
            arrays.update(st_format.map_tensors(header))
        return arrays


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Resolve ``path`` (a file, an index, or a folder holding either) and read every header.

    Raises MalformedFileError for a bad file or index, a key held by two shards, or an index
    naming a key its shard does not hold; FuseError for a path that is not a checkpoint.
    """
    path = Path(path)
    if os.path.isdir(path):  # unlike Path.is_dir, never raises (an unreadable path fails below, named)
        candidates = [path / INDEX_NAME, path / SINGLE_NAME]
        found = [c for c in candidates if c.exists()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1 and not (found and found[0].name in (INDEX_NAME, SINGLE_NAME)):
            raise FuseError(
                f"{path}: expected {INDEX_NAME}, {SINGLE_NAME} or exactly one .safetensors file in the folder, "
                f"found {len(found)}"
            )
        path = found[0]
    if path.name.endswith(".json"):
        weight_map = st_format.read_index(path)
        shards = list(dict.fromkeys(weight_map.values()))
        headers = tuple(st_format.read_header(shard) for shard in shards)
        index: Path | None = path
    else:
        weight_map = None
        headers = (st_format.read_header(path),)
        index = None
    location: dict[str, tuple[int, st_format.TensorInfo]] = {}
    for number, header in enumerate(headers):
        for key, info in header.tensors.items():
            if key in location:
                other = headers[location[key][0]].path
                raise MalformedFileError(f"tensor {key!r} is in two shards: {other} and {header.path}")
            location[key] = (number, info)
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in location or os.path.abspath(headers[location[key][0]].path) != os.path.abspath(shard):
                raise MalformedFileError(f"{index}: weight_map names {key!r} in {shard}, which does not hold it")
    return Checkpoint(path, index, headers, location)
