"""Writing files all or nothing: a temporary in the destination folder, published by one rename.

Knows files and folders, not formats: ``safetensors_file.layout`` makes a safetensors prefix, and the
sink fills the data section through :meth:`AtomicWriter.view` (a writable memory map) and
:meth:`AtomicWriter.copy_from` (file to file, never through Python buffers).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fastfuse.aliases import DTypeLike, PathLike
from fastfuse.errors import FuseError, FuseFileNotFoundError, FusePermissionError, MalformedFileError
from fastfuse.formats.stored import open_regular
from fastfuse.sinks.writeback import Writeback

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AtomicWriter", "CopyRange", "copy_file_bytes", "write_bytes_atomic"]

_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)  # tests set 0 to exercise the named fallback
_CHUNK = 16 << 20  # largest preadv when copy_file_range is unavailable
_COPY_CHUNK = 64 << 20  # a parallel copy's unit of work, and of early write-back
_COPY_THREADS = 2
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python < 3.13 lacks the name
_TEMP_MARK = ".fastfuse-"  # hidden temporaries are ".{name}.fastfuse-{random}.tmp"


class CopyRange(NamedTuple):
    """``length`` bytes at ``offset`` of the file ``source``, to data byte ``start``."""

    source: str
    offset: int
    start: int
    length: int


class AtomicWriter:
    """Write ``prefix`` (from :func:`layout`) + a ``data_size``-byte data section to ``dst``,
    all or nothing.

    The constructor checks the destination (folder exists and is writable, ``dst`` is not a
    directory and, unless ``overwrite``, does not exist) and creates nothing. ``__enter__``
    creates an unnamed O_TMPFILE in the destination folder (else a hidden
    ``.{name}.fastfuse-XXXXXXXX.tmp``), reserves its space (disk full is a FuseError now, not
    a SIGBUS later; where the file system cannot reserve, its free space is checked), writes
    the prefix and maps the data section; fill it with :meth:`view`, :meth:`copy` and
    :meth:`copy_from`, and call :meth:`written` for bytes written through views, so the disk
    starts writing them while the rest is computed. A clean exit fsyncs (once: every byte is
    written to disk once) and publishes the file with one rename (without ``overwrite``: one
    link, which also refuses a ``dst`` created meanwhile), then fsyncs the folder. An exception
    (KeyboardInterrupt too) removes the temporary and leaves ``dst`` untouched; so does SIGKILL
    with O_TMPFILE. A named temporary left by a killed process is locked while in use, and the
    next writer to the same destination removes it. Views are invalid after exit: one still
    held keeps the map alive, and writing through it would change the published file.
    """

    def __init__(self, dst: PathLike, prefix: bytes, data_size: int, *, overwrite: bool = False) -> None:
        if data_size < 0:
            raise ValueError(f"data_size must be >= 0, got {data_size}")
        self.dst, self.prefix, self.data_size = os.fspath(dst), bytes(prefix), data_size
        self.overwrite, self.folder = overwrite, os.path.dirname(os.path.abspath(self.dst))
        self._name = os.path.basename(self.dst)
        self._fd = self._dir = -1  # the temporary file, the destination folder
        self._tmp = ""  # name in the folder of the named temporary, or of the O_TMPFILE's link
        self._mm: mmap.mmap | None = None
        self._data: np.ndarray[Any, np.dtype[np.uint8]] = np.empty(0, np.uint8)
        self._cancelled = threading.Event()
        self._writeback: Writeback | None = None
        self._check()

    def _check(self) -> None:
        dst, folder = self.dst, self.folder
        if not os.path.isdir(folder):
            if os.path.exists(folder):
                raise FuseError(f"{dst}: destination folder {folder} is not a folder")
            raise FuseFileNotFoundError(f"{dst}: destination folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FusePermissionError(f"{dst}: destination folder {folder} is not writable")
        if not self._name or os.path.isdir(dst):
            raise FuseError(f"{dst}: is a directory; expected a file name")
        if os.path.lexists(dst) and not self.overwrite:
            raise FuseError(f"{dst}: exists; pass --force (overwrite_destination=True) to replace it")

    def _new_temp(self, fd: int = -1) -> int:
        """Take a fresh hidden name in the folder: link it to ``fd``, or create a file there."""
        self._tmp = f".{self._name}{_TEMP_MARK}{os.urandom(4).hex()}.tmp"
        if fd >= 0:  # a dir fd makes os.link use linkat(AT_SYMLINK_FOLLOW); bare link() fails
            os.link(f"/proc/self/fd/{fd}", self._tmp, dst_dir_fd=self._dir, follow_symlinks=True)
            return fd
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(self._tmp, flags, 0o644, dir_fd=self._dir)

    def _remove_stale_temporaries(self) -> None:
        """Remove hidden temporaries of this destination that no live writer holds locked."""
        start = f".{self._name}{_TEMP_MARK}"
        for name in os.listdir(self._dir):
            if not (name.startswith(start) and name.endswith(".tmp")) or name == self._tmp:
                continue
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._dir)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: skip it
                os.unlink(name, dir_fd=self._dir)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _reserve(self, total: int) -> None:
        """Allocate the file's blocks now; where that is unsupported, check the free space."""
        try:
            os.posix_fallocate(self._fd, 0, total)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        st = os.fstatvfs(self._fd)
        if st.f_bavail * st.f_frsize < total:
            raise OSError(errno.ENOSPC, f"{st.f_bavail * st.f_frsize} bytes free")

    def __enter__(self) -> Self:
        self._check()
        total = len(self.prefix) + self.data_size
        try:
            self._dir = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not _O_TMPFILE or not os.path.isdir("/proc/self/fd"):
                    raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
                flags = _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
                self._fd = os.open(".", flags, 0o644, dir_fd=self._dir)
            except OSError:  # not supported here: a named temporary instead
                self._fd = self._new_temp()
                self._remove_stale_temporaries()
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "in use", for _remove_stale_temporaries
            self._writeback = Writeback(self._fd)
            os.ftruncate(self._fd, total)
            self._reserve(total)
            done = 0
            while done < len(self.prefix):
                done += os.pwrite(self._fd, self.prefix[done:], done)
            if self.data_size:
                self._mm = mmap.mmap(self._fd, total, access=mmap.ACCESS_WRITE)
                self._data = np.frombuffer(self._mm, np.uint8)[len(self.prefix) :]
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise FuseError(
                    f"{self.folder}: not enough space for {self.dst}: it needs {total} bytes ({e.strerror})"
                ) from None
            if isinstance(e, OSError):
                raise FuseError(f"{self.dst}: cannot create a temporary file in {self.folder}: {e.strerror}") from None
            raise
        return self

    def view(self, start: int, end: int, dtype: DTypeLike, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        """Writable zero-copy view of data bytes ``[start, end)`` as ``dtype`` and ``shape``."""
        dt = np.dtype(dtype)
        if self._fd < 0 or not 0 <= start <= end <= self.data_size or math.prod(shape) * dt.itemsize != end - start:
            raise ValueError(
                f"view [{start}, {end}) as {dt} {shape} does not fit the open data section of {self.data_size} bytes"
            )
        self._populate(len(self.prefix) + start, len(self.prefix) + end)
        return self._data[start:end].view(dt).reshape(shape)

    def _populate(self, start: int, end: int) -> None:
        """Fault in map bytes ``[start, end)`` for writing in one system call (Linux >= 5.14).

        A kernel writing into a fresh shared file map otherwise takes one page fault per 4 KB,
        serialised across its threads: for large-v3's 630 MB of fused tensors, 0.14 s of
        populating instead of 0.14-0.39 s of faults (``bench/report.py``, file group, on a 2-core
        VM). Older kernels refuse the advice; that is fine.
        """
        if self._mm is None or end <= start:
            return
        page = start - start % mmap.PAGESIZE
        with contextlib.suppress(OSError):
            self._mm.madvise(_MADV_POPULATE_WRITE, page, end - page)

    def written(self, start: int, end: int) -> None:
        """Data bytes ``[start, end)`` are final: have them written to disk soon (Linux: queued for
        this writer's write-back thread, never blocking the caller), so the final fsync waits
        for less. Harmless to skip; a no-op where unsupported."""
        if self._writeback is not None and end > start:
            self._writeback.add(len(self.prefix) + start, end - start)

    def copy(self, ranges: Sequence[CopyRange], done: Callable[[int], None] | None = None) -> None:
        """Copy every range, file to file, in chunks spread over two threads, each chunk sent to
        disk as soon as it is copied. ``done(nbytes)`` is called from this thread as chunks finish.

        Copying is the kernel's work (``copy_file_range`` releases the GIL), so two threads keep
        both the page-cache copy and the disk busy.
        """
        sources: dict[str, int] = {}
        try:
            for path in dict.fromkeys(r.source for r in ranges):
                sources[path] = open_regular(path)[0]
            chunks = [
                (sources[r.source], r.offset + at, r.start + at, min(_COPY_CHUNK, r.length - at))
                for r in ranges
                for at in range(0, r.length, _COPY_CHUNK)
            ]

            def copy_chunk(chunk: tuple[int, int, int, int]) -> int:
                if self._cancelled.is_set():
                    raise FuseError(f"{self.dst}: copy cancelled")
                fd, offset, start, length = chunk
                self.copy_from(fd, offset, start, length)
                self.written(start, start + length)
                return length

            pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="fastfuse-copy")
            try:
                for length in pool.map(copy_chunk, chunks):
                    if done is not None:
                        done(length)
            finally:  # on an error or Ctrl-C, chunks not started yet are dropped
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for fd in sources.values():
                os.close(fd)

    def cancel(self) -> None:
        """Make a :meth:`copy` running in another thread stop after the chunks it is copying
        (a Ctrl-C then takes effect at once, not after the whole copy); it raises FuseError."""
        self._cancelled.set()

    def copy_from(self, src: int | PathLike, src_offset: int, start: int, length: int) -> None:
        """Copy ``length`` bytes at ``src_offset`` of ``src`` (fd or path) to data byte ``start``
        file to file: copy_file_range, else preadv straight into the map (no buffer)."""
        if self._fd < 0 or min(src_offset, start, length) < 0 or start + length > self.data_size:
            raise ValueError(
                f"copy of {length} bytes to data byte {start} does not fit the open "
                f"data section of {self.data_size} bytes"
            )
        if not isinstance(src, int):
            fd = open_regular(src)[0]
            try:
                self.copy_from(fd, src_offset, start, length)
            finally:
                os.close(fd)
            return
        at = len(self.prefix) + start

        def into_map(begin: int, stop: int) -> memoryview:
            assert self._mm is not None  # length > 0, so there is a mapped data section
            with memoryview(self._mm) as whole:
                return whole[begin:stop]

        copy_file_bytes(src, src_offset, self._fd, at, length, self.dst, into=into_map)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is not None:
                return
            if self._mm is not None and not sys.platform.startswith("linux"):
                self._mm.flush()  # on Linux, fsync writes pages dirtied through the map too
            self._release_map()
            self._stop_writeback()
            os.fsync(self._fd)
            if self.overwrite:
                if not self._tmp:
                    self._new_temp(self._fd)
                os.replace(self._tmp, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
                self._tmp = ""
            else:  # a named temporary, now a second name, is unlinked by _abort below
                source = self._tmp or f"/proc/self/fd/{self._fd}"
                os.link(source, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir, follow_symlinks=True)
            with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
                os.fsync(self._dir)
        except FileExistsError:
            raise FuseError(f"{self.dst}: exists; pass --force (overwrite_destination=True) to replace it") from None
        except OSError as e:
            raise FuseError(f"{self.dst}: could not write the file: {e.strerror}") from None
        finally:
            self._abort()

    def _release_map(self) -> None:
        self._data = np.empty(0, np.uint8)
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # views still held: it closes when they die
                mm.close()

    def _stop_writeback(self) -> None:
        writeback, self._writeback = self._writeback, None
        if writeback is not None:
            writeback.close()

    def _abort(self) -> None:
        """Stop the write-back, unmap, remove the named temporary (if any) and close both descriptors."""
        self._stop_writeback()
        self._release_map()
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir)
            self._tmp = ""
        for fd in (self._fd, self._dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dir = -1


def copy_file_bytes(
    src: int,
    src_offset: int,
    dst: int,
    dst_offset: int,
    length: int,
    name: str,
    *,
    into: Callable[[int, int], memoryview] | None = None,
) -> None:
    """Copy ``length`` bytes at ``src_offset`` of the open file ``src`` to ``dst_offset`` of ``dst``,
    file to file (``copy_file_range``: no user-space buffer). Where the kernel cannot copy between
    these files: ``preadv`` into ``into(begin, end)`` (a writable map of ``dst``'s bytes
    ``[begin, end)``), or without one through a buffer of at most 16 MB and ``pwrite``.

    Raises FuseError naming ``name`` (the destination) for an I/O error, MalformedFileError if
    the source ends early.
    """
    done, fast = 0, hasattr(os, "copy_file_range")
    buffer = None
    while done < length:
        try:
            if fast:
                n = os.copy_file_range(src, dst, length - done, src_offset + done, dst_offset + done)
            else:
                stop = dst_offset + min(length, done + _CHUNK)
                if into is None:
                    buffer = buffer or memoryview(bytearray(min(length, _CHUNK)))
                    n = os.preadv(src, [buffer[: stop - dst_offset - done]], src_offset + done)
                    written = 0
                    while written < n:
                        written += os.pwrite(dst, buffer[written:n], dst_offset + done + written)
                else:
                    with into(dst_offset + done, stop) as part:
                        n = os.preadv(src, [part], src_offset + done)
        except OSError as e:
            if fast and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                fast = False  # not between these files: copy through a map or a buffer instead
                continue
            raise FuseError(
                f"{name}: copying {length} bytes from byte {src_offset} of the source failed: {e.strerror}"
            ) from None
        if n == 0:
            raise MalformedFileError(
                f"source ended at byte {src_offset + done} while copying {length} bytes from byte {src_offset} into {name}"
            )
        done += n


def write_bytes_atomic(dst: PathLike, data: bytes, *, overwrite: bool = False) -> None:
    """Write a small file (e.g. a sharded index) with the guarantees of :class:`AtomicWriter`."""
    with AtomicWriter(dst, data, 0, overwrite=overwrite):
        pass
