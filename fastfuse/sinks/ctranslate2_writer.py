"""The CTranslate2 sink: a Whisper checkpoint into a CTranslate2 model folder, streaming, all or nothing.

Writes what ``ct2-transformers-converter --copy_files tokenizer.json preprocessor_config.json
[--quantization Q]`` writes (its command line's semantics: ``float16`` and ``int8_float16`` load
the model as float16 first): ``model.bin`` byte for byte, ``config.json`` and ``vocabulary.json``
with the same bytes, and copies of ``tokenizer.json`` and ``preprocessor_config.json``.

Two passes over the source maps, in blocks of at most :data:`BLOCK_BYTES` of float32: the first
finds the variables the converter writes as aliases (equal values after the cast to the load
dtype; a cheap fingerprint of each variable's first block, then a full digest and a real
comparison only where fingerprints collide), the second writes each variable, converted or
quantized block by block. The folder is built beside the destination and renamed into place.

``model.bin`` (binary version 6): ``u32 version | str spec | u32 revision | u32 count``, then per
variable ``str name | u8 rank | u32 dims... | u8 type | u32 bytes | data``, then ``u32 count`` and
``str alias | str target`` pairs; ``str`` is ``u16 length+1 | utf-8 | NUL``; little endian.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.dtypes import as_dtype
from fastfuse.errors import FuseError
from fastfuse.formats.checkpoint import open_checkpoint
from fastfuse.formats.hf_folder import HFFolder
from fastfuse.kernels.quantize import Digest, cast, int8_rows, int16_rows, int16_scale
from fastfuse.planning import ctranslate2 as ct2
from fastfuse.planning.planner import FuseOptions, Plan, make_plan
from fastfuse.sinks.destinations import check_destination
from fastfuse.sinks.streams import Background, FileRun, SequentialFile

__all__ = ["BLOCK_BYTES", "COPIED", "TYPE_IDS", "fuse_ctranslate2"]

BLOCK_BYTES = 8 << 20
_FINGERPRINT_BYTES = 64 << 10
BINARY_VERSION = 6
TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
COPIED = ("tokenizer.json", "preprocessor_config.json")
_SEP = {"indent": 2}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Entry:
    """One record of model.bin: a variable (or its int8/int16 scale) and how it is written."""

    variable: ct2.Variable
    dtype: str
    shape: tuple[int, ...]
    scale_of: str | None = None  # the weight this scale belongs to

    @property
    def name(self) -> str:
        return self.variable.name + "_scale" if self.scale_of else self.variable.name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * int(np.dtype(_numpy(self.dtype)).itemsize)


def _numpy(dtype: str) -> Any:
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def fuse_ctranslate2(
    src: PathLike,
    dst: PathLike,
    options: FuseOptions,
    *,
    overwrite_destination: bool = False,
    progress: Progress | None = None,
) -> Plan:
    """Write the CTranslate2 model folder ``dst`` of the Whisper checkpoint ``src``.

    Args:
        src: a Hugging Face Whisper checkpoint (file, index or folder; safetensors or torch),
            or an openai-whisper ``.pt`` with ``options.tokenizer_from``.
        dst: the new folder (``--force`` / ``overwrite_destination`` replaces one).
        options: target ``"ctranslate2"``; ``quantization`` and ``tokenizer_from`` apply.
        progress: ``progress(done, total)`` in bytes of model.bin.

    Returns:
        The plan of the fused variables.

    Raises:
        FuseError naming the missing file and ``--tokenizer-from``, a non-Whisper checkpoint,
        a vocabulary that does not match the embeddings; on any error ``dst`` is unchanged.
    """
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    check_destination((f.path for f in checkpoint.files), destination, folder=True, why="a CTranslate2 model")
    if destination.exists() and not (overwrite_destination and destination.is_dir()):
        raise FuseError(f"{destination}: exists; pass --force (overwrite_destination=True) to replace the folder")
    metas = checkpoint.metas()
    fusion = make_plan(metas, options)
    hf = HFFolder(
        Path(options.tokenizer_from) if options.tokenizer_from else checkpoint.path.parent, "--tokenizer-from"
    )
    config = hf.json("config.json")
    assert config is not None
    if config.get("model_type", "whisper") != "whisper":
        raise FuseError(f"{hf.path / 'config.json'}: model_type {config.get('model_type')!r}, expected 'whisper'")
    variables = ct2.variables(fusion, metas, config)
    vocabulary = ct2.vocabulary(hf.tokens(), int(config.get("vocab_size", 0)))
    embeddings = next(v for v in variables if v.name == "decoder/embeddings/weight")
    if len(vocabulary) != embeddings.shape[0]:
        raise FuseError(
            f"{hf.path / 'config.json'}: vocab_size {len(vocabulary)}, but the embeddings have "
            f"{embeddings.shape[0]} rows; pass the model's own folder with --tokenizer-from"
        )
    texts = {
        "config.json": json.dumps(
            ct2.whisper_config(config, hf.json("generation_config.json", required=False)), indent=2, sort_keys=True
        )
        + "\n",
        "vocabulary.json": json.dumps(vocabulary, indent=2),
    }
    copies = [hf.file(name) for name in COPIED]
    floats = sorted(
        (k.removeprefix(fusion.prefix), m.dtype.name)
        for k, m in metas.items()
        if m.dtype.kind == "f" or m.dtype.name == "bfloat16"
    )
    loaded = ct2.load_dtype(options.quantization, config, floats[0][1] if floats else "float32")
    arrays = checkpoint.arrays()
    runs = {}  # key -> (file, offset, dtype) of the tensors stored as one run of bytes
    for key, meta in metas.items():
        found = checkpoint.byte_range(key)
        if found is not None:
            runs[key] = (*found, meta.dtype.name)
    writer = _ModelWriter(arrays, loaded, options.quantization, runs)
    aliases = writer.find_aliases(variables)
    entries = writer.entries([v for v in variables if v.name not in aliases])
    with _AtomicFolder(destination, overwrite=overwrite_destination) as folder:
        checking = Background(checkpoint.check_integrity)  # a torch file's CRCs, read while model.bin is written
        with SequentialFile(folder / "model.bin") as out:
            writer.write(out, entries, aliases, progress)
        checking.join()
        for name, text in texts.items():
            (folder / name).write_text(text, encoding="utf-8")
        for path in copies:
            shutil.copyfile(path, folder / path.name)
    return fusion


class _ModelWriter:
    """Streams variables from ``arrays`` (the source maps) cast to ``loaded``, then quantized."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray[Any, Any]],
        loaded: str,
        quantization: str | None,
        runs: Mapping[str, tuple[str, int, str]] | None = None,
    ) -> None:
        self.arrays = arrays
        self.loaded = loaded
        self.quantization = quantization
        self.runs = runs or {}  # key -> (file, offset, dtype): tensors whose bytes can be copied file to file

    def blocks(
        self, variable: ct2.Variable, limit: int = BLOCK_BYTES, *, first_only: bool = False
    ) -> Iterator[np.ndarray[Any, Any]]:
        """The variable's rows in the load dtype, ``limit`` bytes of float32 at most per block.

        Blocks start every ``step`` rows whatever the segments, so two variables of one shape
        give blocks of the same rows (digests and comparisons rely on it).
        """
        step = max(1, limit // (4 * max(1, int(np.prod(variable.shape[1:], dtype=np.int64)))))
        rows = min(step, variable.shape[0]) if first_only else variable.shape[0]
        for first in range(0, rows, step):
            yield self._rows(variable, first, min(step, rows - first))

    def _rows(self, variable: ct2.Variable, first: int, count: int) -> np.ndarray[Any, Any]:
        pieces, offset = [], 0
        for segment in variable.segments:
            low, high = max(first, offset), min(first + count, offset + segment.rows)
            if low < high:
                if segment.key is None:
                    pieces.append(np.zeros((high - low, *variable.shape[1:]), as_dtype(self.loaded)))
                else:
                    start = segment.start + low - offset
                    pieces.append(cast(self.arrays[segment.key][start : start + high - low], self.loaded))
            offset += segment.rows
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _digest(self, variable: ct2.Variable, limit: int, only_first: bool) -> tuple[str, bool]:
        digest = Digest()
        for block in self.blocks(variable, limit, first_only=only_first):
            digest.update(block)
        return digest.hexdigest(), digest.has_nan

    def _equal(self, a: ct2.Variable, b: ct2.Variable) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(self.blocks(a), self.blocks(b)))

    def find_aliases(self, variables: list[ct2.Variable]) -> dict[str, str]:
        """alias -> target: each variable equal in values to an earlier one (sorted names) names the first.

        Variables made of the same source rows (a tied projection and the embeddings) are equal
        unless they hold NaN: one of them stands for all in the search by values, which reads
        (a block of) every variable that shares a shape with another.
        """
        same_rows: dict[tuple[ct2.Segment, ...], list[ct2.Variable]] = {}
        for v in sorted(variables, key=lambda v: v.name):
            if v.scalar is None:
                same_rows.setdefault(v.segments, []).append(v)
        aliases = self._equal_values([members[0] for members in same_rows.values()])
        for first, *rest in same_rows.values():
            if rest and not self._has_nan(first):
                aliases.update(dict.fromkeys((v.name for v in rest), aliases.get(first.name, first.name)))
        return aliases

    def _has_nan(self, variable: ct2.Variable) -> bool:
        return any(bool(np.isnan(block).any()) for block in self.blocks(variable))

    def _equal_values(self, variables: list[ct2.Variable]) -> dict[str, str]:
        """:meth:`find_aliases` by values: shapes, then a fingerprint, then a digest, then the values."""
        buckets: dict[tuple[Any, ...], list[ct2.Variable]] = {}
        for v in variables:
            buckets.setdefault((v.shape,), []).append(v)
        for _ in ("fingerprint", "digest"):
            refined: dict[tuple[Any, ...], list[ct2.Variable]] = {}
            for key, members in buckets.items():
                if len(members) < 2:
                    continue
                for v in members:
                    digest, nan = self._digest(v, _FINGERPRINT_BYTES if len(key) == 1 else BLOCK_BYTES, len(key) == 1)
                    if not nan:
                        refined.setdefault((*key, digest), []).append(v)
            buckets = refined
        aliases: dict[str, str] = {}
        for members in buckets.values():
            first, *rest = sorted(members, key=lambda v: v.name)
            aliases.update({v.name: first.name for v in rest if self._equal(first, v)})
        return aliases

    def entries(self, variables: list[ct2.Variable]) -> list[_Entry]:
        """The records of model.bin in order: variables by name, each int8/int16 scale after its weight."""
        records = []
        for v in variables:
            if v.scalar is not None:
                records.append(_Entry(v, v.scalar_dtype, ()))
                continue
            dtype = ct2.output_dtype(self.quantization, self.loaded, quantizable=v.quantizable)
            records.append(_Entry(v, dtype, v.shape))
            if dtype in ("int8", "int16"):
                records.append(_Entry(v, "float32", (v.shape[0],) if dtype == "int8" else (), scale_of=v.name))
        names = [r.name for r in records]
        if names != sorted(names):  # a scale sorts right after its weight: the writer relies on it
            raise AssertionError("model.bin records out of order")
        return records

    def write(
        self, out: SequentialFile, entries: list[_Entry], aliases: dict[str, str], progress: Progress | None
    ) -> None:
        """Header, every record, then the aliases (sorted by alias name)."""
        for entry in entries:
            if entry.nbytes >= 1 << 32:
                raise FuseError(
                    f"{entry.name}: {entry.nbytes} bytes; CTranslate2's model.bin holds < 4 GiB per variable"
                )
        total, done = sum(e.nbytes for e in entries), 0
        out.write(
            struct.pack("<I", BINARY_VERSION)
            + _string(ct2.SPEC_NAME)
            + struct.pack("<II", ct2.SPEC_REVISION, len(entries))
        )
        scales: dict[str, np.ndarray[Any, Any]] = {}
        for entry in entries:
            out.write(_string(entry.name) + struct.pack(f"<B{len(entry.shape)}I", len(entry.shape), *entry.shape))
            out.write(struct.pack("<BI", TYPE_IDS[entry.dtype], entry.nbytes))
            for chunk in self._data(entry, scales):
                if isinstance(chunk, FileRun):
                    out.copy(*chunk)
                else:
                    out.write(chunk)
                done += len(chunk) if isinstance(chunk, memoryview) else chunk.length
                if progress is not None:
                    progress(done, total)
            out.finished()
        out.write(struct.pack("<I", len(aliases)))
        for alias in sorted(aliases):
            out.write(_string(alias) + _string(aliases[alias]))

    def _data(self, entry: _Entry, scales: dict[str, np.ndarray[Any, Any]]) -> Iterator[memoryview | FileRun]:
        v = entry.variable
        if v.scalar is not None:
            yield memoryview(np.array(v.scalar, entry.dtype).tobytes())
        elif entry.scale_of is not None:
            yield _bytes(scales.pop(entry.scale_of))
        elif entry.dtype == "int8":
            parts = []
            for block in self.blocks(v):
                values, scale = int8_rows(block)
                parts.append(scale)
                yield _bytes(values)
            scales[v.name] = np.concatenate(parts)
        elif entry.dtype == "int16":
            amax = max(float(np.amax(np.absolute(block.astype(np.float32)))) for block in self.blocks(v))
            factor = int16_scale(amax)
            scales[v.name] = np.array(factor, np.float32)
            for block in self.blocks(v):
                yield _bytes(int16_rows(block, factor))
        elif entry.dtype == self.loaded and all(self._copied(s, entry.dtype) for s in v.segments):
            yield from self._runs(v)
        else:
            for block in self.blocks(v):
                yield _bytes(cast(block, entry.dtype))

    def _copied(self, segment: ct2.Segment, dtype: str) -> bool:
        """Are the segment's bytes the record's (zeros, or source rows stored in ``dtype`` as one run)?"""
        return segment.key is None or (segment.key in self.runs and self.runs[segment.key][2] == dtype)

    def _runs(self, variable: ct2.Variable) -> Iterator[memoryview | FileRun]:
        """A pass-through variable's bytes: file ranges of the source, zeros for a zero segment."""
        itemsize = int(np.dtype(_numpy(self.loaded)).itemsize)
        row = itemsize * int(np.prod(variable.shape[1:], dtype=np.int64))
        for segment in variable.segments:
            if segment.key is None:
                yield memoryview(bytes(row * segment.rows))
            else:
                path, offset, _ = self.runs[segment.key]
                yield FileRun(path, offset + row * segment.start, row * segment.rows)


def _bytes(array: np.ndarray[Any, Any]) -> memoryview:
    """The array's bytes in C order, without a copy where it is contiguous (a source map's rows)."""
    flat: Any = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return memoryview(flat)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<H", len(data) + 1) + data + b"\0"


class _AtomicFolder:
    """A temporary folder beside ``dst``, renamed to ``dst`` on success (a replaced folder is
    moved aside first and removed after), removed on failure."""

    def __init__(self, dst: Path, *, overwrite: bool) -> None:
        self.dst = dst
        self.overwrite = overwrite
        self.temp = Path(".")

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.temp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", suffix=".tmp", dir=self.dst.parent))
        return self.temp

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        for path in self.temp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if self.dst.exists() and self.overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", suffix=".old", dir=self.dst.parent))
            os.replace(self.dst, old / "folder")
        os.rename(self.temp, self.dst)
        directory = os.open(self.dst.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        if old is not None:
            shutil.rmtree(old)
