"""Model folders: the files beside a checkpoint's weights (config, tokenizer) that make a loadable model.

``fastfuse fuse SRC_FOLDER DST_FOLDER`` writes the fused weights into ``DST_FOLDER`` and copies
these beside them, so that ``DST_FOLDER`` loads as the source folder did (``from_pretrained``,
``vllm serve``). Only a folder given as the source is read for them: a file's folder may be
anything (``~/Downloads``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError
from fastfuse.formats.checkpoint import CHECKPOINT_SUFFIXES, TP_INDEX_NAME
from fastfuse.sinks.atomic import write_bytes_atomic

__all__ = ["check_side_files", "copy_side_files", "new_folder", "side_files"]


def side_files(src: PathLike) -> list[Path]:
    """The files of the source folder ``src`` that are not weights: every regular, non-hidden file
    (symbolic links followed, as in a Hugging Face cache snapshot) but checkpoint files
    (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``), their ``*.index.json`` and
    ``tensor_parallel.json``; sorted by name. Empty when ``src`` is not a folder.

    >>> side_files("no-such-folder")
    []
    """
    folder = Path(src)
    if not os.path.isdir(folder):
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and not path.name.endswith((*CHECKPOINT_SUFFIXES, ".index.json"))
        and path.name != TP_INDEX_NAME
    )


def check_side_files(files: Sequence[Path], dst: Path, *, overwrite: bool) -> None:
    """Refuse, before anything is written, to copy ``files`` into ``dst`` over files already there
    (unless ``overwrite``), or into the folder they come from."""
    if not files or not dst.exists():
        return
    if os.path.samefile(files[0].parent, dst):
        raise FuseError(f"destination {dst} is the source folder; write to a new folder")
    for path in files:
        if (dst / path.name).exists() and not overwrite:
            raise FuseError(
                f"{dst / path.name}: exists (a model folder gets {path.name} from {path.parent}); "
                "pass --force (overwrite_destination=True) to replace it"
            )


def copy_side_files(files: Sequence[Path], dst: Path, *, overwrite: bool) -> list[Path]:
    """Copy ``files`` into the folder ``dst``, each atomically; returns the copies' paths."""
    copies = []
    for path in files:
        write_bytes_atomic(dst / path.name, path.read_bytes(), overwrite=overwrite)
        copies.append(dst / path.name)
    return copies


@contextmanager
def new_folder(folder: Path | None) -> Iterator[None]:
    """Create ``folder`` (its parent must exist) for the writes in the block, and remove it again
    if the block fails and it was new; ``None``: nothing to create."""
    if folder is None:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise FuseError(f"{folder}: a model folder's destination, and {folder} is a file")
    if not folder.parent.is_dir():
        raise FuseError(f"{folder}: destination folder {folder.parent} does not exist")
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            folder.rmdir()
        raise
