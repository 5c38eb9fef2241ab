"""Sink plumbing shared by the writers: a file written front to back, and work in a thread.

:class:`SequentialFile` writes a new file in order from bytes (``pwrite``) and from byte
ranges of other files (``copy_file_range``: the bytes never pass through user space, so a
pass-through variable costs no anonymous memory and no Python copy), handing what it wrote to
the disk's write-back as it goes (``writeback.Writeback``). :class:`Background` runs a check
(a torch file's CRCs) beside the writing and re-raises its error when joined.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with open(f"{folder}/src", "wb") as f:
    ...         _ = f.write(b"0123456789")
    ...     with SequentialFile(f"{folder}/dst") as out:
    ...         out.write(b"<")
    ...         out.copy(f"{folder}/src", 2, 5)
    ...         out.write(b">")
    ...     Path(folder, "dst").read_bytes()
    b'<23456>'
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from fastfuse.aliases import PathLike
from fastfuse.formats.stored import open_regular
from fastfuse.sinks.atomic import copy_file_bytes
from fastfuse.sinks.writeback import Writeback

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["WRITEBACK_BYTES", "Background", "FileRun", "SequentialFile"]

WRITEBACK_BYTES = 64 << 20  # write-back is asked for in pieces of at least this many bytes


class FileRun(NamedTuple):
    """``length`` bytes at ``offset`` of the file ``path``, copied as they are."""

    path: str
    offset: int
    length: int


class SequentialFile:
    """A new file (``O_EXCL``: never an existing one), written front to back.

    :meth:`write` appends bytes, :meth:`copy` appends a range of another file (file to file;
    sources are opened once and kept open until exit), :meth:`finished` marks a boundary (a
    record's end) where every :data:`WRITEBACK_BYTES` written so far are handed to write-back.
    A clean exit fsyncs the file; any exit stops the write-back and closes every descriptor
    (the caller removes a file left by an error). OSError as raised; a copy's errors as
    :func:`~fastfuse.sinks.atomic.copy_file_bytes` raises them.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.at = 0  # bytes written so far: where the next write goes
        self._handed = 0  # bytes handed to write-back so far
        self._sources: dict[str, int] = {}
        self._writeback = Writeback(self.fd)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.at + done)
        self.at += done

    def copy(self, path: str, offset: int, length: int) -> None:
        if path not in self._sources:
            self._sources[path] = open_regular(path)[0]
        copy_file_bytes(self._sources[path], offset, self.fd, self.at, length, self.path)
        self.at += length

    def finished(self) -> None:
        if self.at - self._handed >= WRITEBACK_BYTES:
            self._writeback.add(self._handed, self.at - self._handed)
            self._handed = self.at

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self._writeback.close()
        try:
            if kind is None:
                os.fsync(self.fd)
        finally:
            for fd in (self.fd, *self._sources.values()):
                os.close(fd)


class Background(threading.Thread):
    """Run ``work`` in a daemon thread (an interrupted caller never waits for it to end);
    :meth:`join` re-raises what it raised."""

    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__(name="fastfuse-check", daemon=True)
        self._work = work
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._work()
        except BaseException as e:  # noqa: BLE001 - handed to join()
            self._error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            raise self._error

    def join_quietly(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` s (None: until done); an error waits for :meth:`join`."""
        super().join(timeout)
