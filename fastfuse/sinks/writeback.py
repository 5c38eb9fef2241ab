"""Early write-back: send finished byte ranges of a file to disk from a thread of their own.

A writer that copies (or computes) a large file into the page cache and fsyncs at the end waits
for the whole file's write-back after its last byte; the disk sat idle while it copied. Asking
for write-back as ranges finish keeps the disk busy from the first range on, so the final fsync
waits for little more than the last range. But ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
blocks while the device queue is full (it did: 15.7 s blocked in 174 calls over a 3 GB fuse,
issue 19), so it must not run in the threads that copy: :class:`Writeback` queues the ranges
and one thread of its own asks for them in order, one sequential stream for the disk.

Linux only (``sync_file_range``); elsewhere every call is a no-op and the fsync does it all.

Example:
    >>> import os, tempfile
    >>> with tempfile.TemporaryFile() as f:
    ...     with Writeback(f.fileno()) as writeback:
    ...         _ = os.pwrite(f.fileno(), b"x" * 4096, 0)
    ...         writeback.add(0, 4096)
    ...     os.fsync(f.fileno())
"""

from __future__ import annotations

import ctypes
import functools
import queue
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Writeback"]

_SYNC_FILE_RANGE_WRITE = 2
_STOP = (-1, -1)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), which Python's ``os`` lacks; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


class Writeback:
    """Start write-back of ranges of the open file ``fd`` in the order :meth:`add` gets them.

    :meth:`add` never blocks; a daemon thread (started on the first range) calls
    ``sync_file_range`` for each. :meth:`close` (or leaving the ``with`` block) drops ranges not
    started yet and waits for the thread, so ``fd`` may be closed after it; it waits for at
    most the one call in progress. Failures are ignored: write-back is advice, the fsync that
    publishes a file is what makes it durable.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._function = _sync_file_range()
        self._ranges: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def add(self, offset: int, length: int) -> None:
        """File bytes ``[offset, offset + length)`` are final: write them to disk soon."""
        if self._function is None or length <= 0 or self._closed.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fastfuse-writeback", daemon=True)
                self._thread.start()
        self._ranges.put((offset, length))

    def _run(self) -> None:
        assert self._function is not None
        while True:
            offset, length = self._ranges.get()
            if (offset, length) == _STOP or self._closed.is_set():
                return
            self._function(self._fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        """Drop what is not started, wait for the call in progress; idempotent."""
        self._closed.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._ranges.put(_STOP)
            thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
