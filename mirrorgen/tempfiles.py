"""Staged files: written under a temporary name in their final directory, or with no name at all
(:class:`OpenTemp`), until :meth:`mirrorgen.store.Store.publish_temps` makes them durable and
puts them under their final names. A partly written file is never visible under its final name
(SPEC §4), and what a killed run leaves behind is recognisable by its name: ``TEMP_PREFIX``,
then the run's tag (:data:`RUN_TAG`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import re
import resource
import secrets
import threading
from pathlib import Path
from typing import Any, Final

from .direct import drop_direct, is_direct, libc, open_direct_or_not

__all__ = ["TEMP_PREFIX", "NAME_MAX", "RUN_TAG", "OpenTemp", "Temp", "ANONYMOUS", "temp_name", "worker_prefix",
           "is_run_tag", "close_written", "discard_temp", "unnamed_temps", "sync_filesystem",
           "fsync_path"]

TEMP_PREFIX: Final = ".mirrorgen-tmp-"
NAME_MAX: Final = 255  # the longest file name (a path component) most filesystems take
RUN_TAG: Final = secrets.token_hex(4)
_TEMP_TAG_RE: Final = re.compile(r"[0-9a-f]{8}")
_TEMP_COUNTER: Final = itertools.count()


def temp_name(final: Path | str) -> Path:
    parent, name = os.path.split(final)
    return Path(parent, f"{TEMP_PREFIX}{RUN_TAG}{next(_TEMP_COUNTER):x}-{name}"[:NAME_MAX])


def worker_prefix() -> str:
    """A new name prefix for temporary files made outside this process's staging (by worker
    processes), unique to this call: every file under it is the caller's, and one left behind
    starts with TEMP_PREFIX and this run's tag, as ``sync --clean`` and the next run look for."""
    return f"{TEMP_PREFIX}{RUN_TAG}{next(_TEMP_COUNTER):x}w-"


def is_run_tag(tag: str) -> bool:
    """Whether ``tag`` (read from a run's state) has the shape of a :data:`RUN_TAG`."""
    return _TEMP_TAG_RE.fullmatch(tag) is not None


class OpenTemp:
    """A staged file with no name yet: an ``O_TMPFILE`` in its final directory, held open until
    :meth:`mirrorgen.store.Store.publish_temps` links it under its final name.

    Publishing it is one directory operation (a link) where a named temporary file costs two (a
    create, then a rename): for thousands of small files (shards, small packages) the file
    system's directory work is most of the cost. A run killed before publishing leaves nothing
    behind, not even a temporary name. Each holds a file descriptor until published or
    discarded, so a process holds at most ``_AnonymousFiles.limit`` of them; past that, and
    where the filesystem cannot (O_TMPFILE, /proc), files get temporary names."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __repr__(self) -> str:
        return f"OpenTemp(fd={self.fd})"

    def link(self, final: Path | str) -> None:
        """Give the file its final name, replacing a file there at once (never a moment with
        no file under that name)."""
        try:
            _held_calls().link(self.fd, final)
            return
        except FileExistsError:
            pass
        while True:
            tmp = temp_name(final)
            try:
                os.link(str(self.fd), tmp, src_dir_fd=ANONYMOUS.proc_fd())
                break
            except FileExistsError:
                continue
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_bytes(self) -> bytes:
        """What was written (tests, and callers that check a staged file)."""
        if is_direct(self.fd):  # a direct read would need aligned buffers: read through the cache
            drop_direct(self.fd)
        out, offset = bytearray(), 0
        while chunk := os.pread(self.fd, 1 << 20, offset):
            out += chunk
            offset += len(chunk)
        return bytes(out)

    def close(self) -> None:
        """Drop the file (if it was not linked) and its descriptor; again: nothing."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                _held_calls().close(fd)
            finally:
                ANONYMOUS.release()


Temp = Path | OpenTemp  # a staged file: a named temporary file, or an OpenTemp


def close_written(tmp: Temp, fd: int) -> None:
    """Done writing through ``fd`` (from :meth:`mirrorgen.store.Store.open_temp`): close it, unless ``tmp`` keeps
    it (an OpenTemp holds its descriptor until it is published or discarded)."""
    if not isinstance(tmp, OpenTemp):
        os.close(fd)


def discard_temp(tmp: Temp | None) -> None:
    """A staged file that will not be published: removed (None, or one published already: nothing)."""
    if isinstance(tmp, OpenTemp):
        tmp.close()
    elif tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def unnamed_temps() -> int:
    """How many :class:`OpenTemp` files this process holds (staged, neither published nor
    discarded): what a directory listing cannot show."""
    return ANONYMOUS.held


class _AnonymousFiles:
    """Where :class:`OpenTemp` files can be made, and how many may be open at once.

    The limit leaves most of the process's file descriptors to everything else: half of the
    soft RLIMIT_NOFILE (raised to the hard limit first, up to 65,536, as servers do), less a
    reserve, at most 16,384. Whether a directory takes ``O_TMPFILE`` files that ``linkat``
    through ``/proc/self/fd`` can name is tried once per directory (not every filesystem
    can, and /proc may not be mounted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0
        self.limit: int | None = None
        self._dirs: dict[str, bool] = {}
        self._proc_fd = -1

    def _init_limit(self) -> int:
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
            if soft != resource.RLIM_INFINITY and soft < want:
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                    soft = want
            if soft == resource.RLIM_INFINITY:
                soft = 65536
        except (ValueError, OSError):
            soft = 1024
        return max(0, min(16384, (soft - 512) // 2))

    def proc_fd(self) -> int:
        if self._proc_fd < 0:
            with self._lock:
                if self._proc_fd < 0:
                    self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._proc_fd

    def open(self, parent: str, extra: int = 0) -> int:
        """An O_TMPFILE descriptor in ``parent`` (``extra``: more flags, O_DIRECT), or -1 (none
        to spare, or not possible there)."""
        if not _O_TMPFILE:
            return -1
        with self._lock:
            if self.limit is None:
                self.limit = self._init_limit()
            if self.held >= self.limit:
                return -1
            self.held += 1
        try:
            usable = self._dirs.get(parent)
            if usable is None:
                usable = self._dirs[parent] = self._probe(parent)
            if usable:
                return open_direct_or_not(parent, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, extra, parent)
        except OSError:
            pass  # the directory went away, or no descriptors left: a named file says why
        self.release()
        return -1

    def release(self) -> None:
        with self._lock:
            self.held -= 1

    def _probe(self, parent: str) -> bool:
        try:
            fd = os.open(parent, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
        except OSError:
            return False  # EOPNOTSUPP, EISDIR (a kernel before 3.11), ...
        probe = temp_name(Path(parent, "probe"))
        try:
            os.link(str(fd), probe, src_dir_fd=self.proc_fd())
            os.unlink(probe)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
ANONYMOUS: Final = _AnonymousFiles()


class _HeldCalls:
    """linkat(2) and close(2) for publishing :class:`OpenTemp` files, called without releasing
    the GIL (through ``ctypes.PyDLL``), where ``os.link`` and ``os.close`` release it.

    A group commit links and closes thousands of small files on one thread while a download
    thread fetches the next ones. Each released GIL was handed to the other thread and taken
    back microseconds later, a futex wake and a context switch per call: measured at 20,000
    files of 250 bytes, 0.85 s of system time and 2.1 s of wall time for the fetch; with the
    GIL kept over these calls (each a few microseconds on a local disk; the interpreter still
    hands the GIL over every switch interval), 0.33 s and 1.4 s. Where ctypes or libc is
    missing, the os functions."""

    def __init__(self) -> None:
        self._linkat: Any = None
        self._close: Any = None
        self._by_fd = True  # linkat(fd, "", ..., AT_EMPTY_PATH) until the kernel refuses it
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.PyDLL(None, use_errno=True)
            linkat, close = libc.linkat, libc.close
            linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            linkat.restype = ctypes.c_int
            close.argtypes = [ctypes.c_int]
            close.restype = ctypes.c_int
            self._linkat, self._close = linkat, close

    def link(self, fd: int, final: Path | str) -> None:
        """``os.link(str(fd), final, src_dir_fd=/proc/self/fd)``: an open file given a name.

        Named by its descriptor itself (``AT_EMPTY_PATH``) where the kernel lets this process
        (Linux 6.10 and later, or CAP_DAC_READ_SEARCH): no lookup in /proc, which makes a dentry
        for each descriptor it is asked for (publishing 9,000 small files: 9.0 to 7.6 us a file).
        The first time that is refused and the /proc way is not, the /proc way from then on."""
        if self._linkat is None:
            os.link(str(fd), final, src_dir_fd=ANONYMOUS.proc_fd())
            return
        name = os.fsencode(final)
        if self._by_fd:
            if self._linkat(fd, b"", _AT_FDCWD, name, _AT_EMPTY_PATH) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(err, os.strerror(err), os.fsdecode(name))
        if self._linkat(ANONYMOUS.proc_fd(), b"%d" % fd, _AT_FDCWD, name, _AT_SYMLINK_FOLLOW) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(name))
        self._by_fd = False  # refused by descriptor, done through /proc

    def close(self, fd: int) -> None:
        if self._close is None:
            os.close(fd)
        elif self._close(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_AT_FDCWD: Final = -100
_AT_SYMLINK_FOLLOW: Final = 0x400
_AT_EMPTY_PATH: Final = 0x1000
_HELD: _HeldCalls | None = None


def _held_calls() -> _HeldCalls:
    global _HELD
    if _HELD is None:
        _HELD = _HeldCalls()
    return _HELD


def sync_filesystem(path: Path | str) -> None:
    """syncfs(2) on the filesystem holding ``path``: flush every dirty page there in one call.
    Elsewhere: os.sync()."""
    syncfs = getattr(libc(), "syncfs", None)
    if syncfs is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


def fsync_path(path: Path | str, *, directory: bool = False) -> None:
    """fsync a file (or a directory) by its name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

