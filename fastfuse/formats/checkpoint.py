"""Checkpoints on disk: resolve a file, an index or a folder, and read every shard with its reader.

Knows paths, which reader understands which bytes (``safetensors_file`` for safetensors,
``torch_zip`` for ``torch.save`` archives) and what a checkpoint says of its model beside its
tensors (the head counts of a ``config.json`` or of openai-whisper's ``dims``); not fusion:
everything downstream sees one :class:`Checkpoint` of
:class:`~fastfuse.formats.stored.StoredTensor` entries, whatever the format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError, MalformedFileError
from fastfuse.formats import safetensors_file
from fastfuse.formats.stored import StoredFile, StoredTensor, map_arrays, open_regular

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint", "open_checkpoint", "read_file"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TORCH_SINGLE_NAME = "pytorch_model.bin"
# A folder is read through the first of these it holds (Hugging Face's names, safetensors first).
STANDARD_NAMES = (INDEX_NAME, SINGLE_NAME, TORCH_INDEX_NAME, TORCH_SINGLE_NAME)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk: its files (shards), and each tensor's file and entry."""

    path: Path
    index: Path | None
    files: tuple[StoredFile, ...]
    location: dict[str, tuple[int, StoredTensor]]  # key -> (file number, entry)

    @property
    def metadata(self) -> dict[str, str]:
        """The first file's metadata (shards of one checkpoint share it)."""
        return dict(self.files[0].metadata)

    @property
    def format(self) -> str:
        return self.files[0].format

    @property
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f.file_size for f in self.files)

    def metas(self) -> dict[str, StoredTensor]:
        """Key -> entry (shape and dtype: what planning needs), in file then file order."""
        return {key: entry for key, (_, entry) in self.location.items()}

    def head_counts(self) -> tuple[int | None, int | None]:
        """``(heads, kv_heads)`` from a ``config.json`` beside the checkpoint; ``(None, None)`` without one.

        ``num_attention_heads`` (or Whisper's ``encoder_attention_heads``) and
        ``num_key_value_heads`` (default: ``heads``). Without a config, an openai-whisper file's
        ``dims`` (``n_audio_head``, when ``n_text_head`` agrees: one count splits both sides).
        MalformedFileError for an unreadable config.
        """
        config_path = self.path.parent / "config.json"
        if not config_path.is_file():
            return self._dims_head_counts()
        try:
            config = json.loads(config_path.read_text())
            heads = config.get("num_attention_heads") or config.get("encoder_attention_heads")
            kv_heads = config.get("num_key_value_heads") or heads
        except (OSError, ValueError, AttributeError) as exc:
            raise MalformedFileError(f"{config_path}: not a readable JSON config ({exc})") from None
        return heads, kv_heads

    def _dims_head_counts(self) -> tuple[int | None, int | None]:
        """``(heads, heads)`` from openai-whisper's ``dims`` metadata (see :meth:`head_counts`)."""
        try:
            dims = json.loads(self.metadata.get("dims", "{}"))
            heads = dims.get("n_audio_head")
        except (ValueError, AttributeError):
            return None, None
        if not isinstance(heads, int) or dims.get("n_text_head", heads) != heads:
            return None, None
        return heads, heads

    def arrays(self, *, writeable: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        """Zero-copy views of every tensor over copy-on-write maps (see ``stored.map_arrays``)."""
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        for stored in self.files:
            arrays.update(map_arrays(stored, writeable=writeable))
        return arrays

    def in_file_order(self, keys: Iterable[str]) -> list[str]:
        """``keys`` sorted by where their bytes are: file, then offset (so neighbours can be one copy)."""
        return sorted(keys, key=lambda key: (self.location[key][0], self.location[key][1].offset))

    def check_integrity(self) -> None:
        """Check the checksums a format keeps (a torch zip's CRC-32 of every member), reading
        every byte; MalformedFileError naming the first that differs. Safetensors keeps none."""
        for stored in self.files:
            if stored.format == "torch":
                from fastfuse.formats import torch_zip

                torch_zip.verify_crcs(stored.path)

    def byte_range(self, key: str) -> tuple[str, int] | None:
        """(file path, offset) where ``key``'s bytes lie as one C-ordered run, else None."""
        number, entry = self.location[key]
        return (self.files[number].path, entry.offset) if entry.contiguous else None


def read_file(path: PathLike) -> StoredFile:
    """Read one checkpoint file with the reader its first bytes call for.

    Raises MalformedFileError naming the file (also for a file of neither format),
    FuseFileNotFoundError / FusePermissionError for a missing or unreadable path.
    """
    fd, _ = open_regular(path)
    try:
        head = os.pread(fd, 16, 0)
    finally:
        os.close(fd)
    from fastfuse.formats import torch_zip

    if torch_zip.claims(head):
        return torch_zip.read_torch(path)
    if len(head) < 9 or safetensors_file.claims(head):
        return safetensors_file.read_safetensors(path)
    raise MalformedFileError(
        f"{path}: not a safetensors or PyTorch checkpoint (it starts with {head[:8]!r}; safetensors starts "
        "with an 8-byte header length and '{', a torch.save archive with 'PK')"
    )


def _in_folder(folder: Path) -> Path:
    """The checkpoint a folder holds: a standard name, else its only checkpoint file."""
    for name in STANDARD_NAMES:
        if (folder / name).exists():
            return folder / name
    if (folder / TP_INDEX_NAME).is_file():
        raise FuseError(
            f"{folder}: a tensor-parallel folder ({TP_INDEX_NAME}); pass one of its rank files, or load it "
            "with rank=; inspect, verify and unfuse take the folder"
        )
    found = sorted(p for p in folder.iterdir() if p.name.endswith(CHECKPOINT_SUFFIXES) and not p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        raise FuseError(
            f"{folder}: no checkpoint in the folder (expected {', '.join(STANDARD_NAMES)} "
            f"or one file ending in {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    raise FuseError(f"{folder}: holds {len(found)} checkpoint files ({names}); pass the one to read")


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Resolve ``path`` (a file, an index, or a folder holding either) and read every file.

    Raises MalformedFileError for a bad file or index, a key held by two shards, or an index
    naming a key its shard does not hold; FuseError for a folder that holds no checkpoint or
    several; FuseFileNotFoundError / FusePermissionError for missing or unreadable paths.
    """
    path = Path(path)
    if os.path.isdir(path):  # unlike Path.is_dir, never raises (an unreadable path fails below, named)
        path = _in_folder(path)
    if path.name.endswith(".json"):
        weight_map = safetensors_file.read_index(path)
        shards = list(dict.fromkeys(weight_map.values()))
        files = tuple(read_file(shard) for shard in shards)
        index: Path | None = path
    else:
        weight_map = None
        files = (read_file(path),)
        index = None
    location: dict[str, tuple[int, StoredTensor]] = {}
    for number, stored in enumerate(files):
        for key, entry in stored.tensors.items():
            if key in location:
                other = files[location[key][0]].path
                raise MalformedFileError(f"tensor {key!r} is in two shards: {other} and {stored.path}")
            location[key] = (number, entry)
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in location or os.path.abspath(files[location[key][0]].path) != os.path.abspath(shard):
                raise MalformedFileError(f"{index}: weight_map names {key!r} in {shard}, which does not hold it")
        if len({f.format for f in files}) > 1:
            raise MalformedFileError(f"{index}: its shards mix safetensors and torch files")
    return Checkpoint(path, index, files, location)


TP_INDEX_NAME = "tensor_parallel.json"  # a tensor-parallel folder's index of rank files


def tensor_parallel_ranks(folder: Path) -> list[Path] | None:
    """The rank files a tensor-parallel output folder lists (None if ``folder`` is not one).

    MalformedFileError for an unreadable ``tensor_parallel.json`` or a rank that is not a plain
    file name in the folder.
    """
    index = folder / TP_INDEX_NAME
    if not folder.is_dir() or not index.is_file():
        return None
    try:
        ranks = json.loads(index.read_text())["ranks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MalformedFileError(f"{index}: not a tensor-parallel index with a list of ranks ({exc})") from None
    if not isinstance(ranks, list) or not ranks:
        raise MalformedFileError(f"{index}: 'ranks' is {ranks!r}, expected a list of rank file names")
    for name in ranks:
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise MalformedFileError(f"{index}: rank {name!r} is not a plain file name in the folder")
    return [folder / name for name in ranks]
