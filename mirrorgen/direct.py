"""Downloads written to disk directly (O_DIRECT), and early writeback for those that are not.

A download of at least mirrorgen.sink's DIRECT_MIN (16 KiB) is written with O_DIRECT: from the
download thread's buffer to the disk, not copied into the page cache first. The run must make
every file durable before publishing it anyway, so the page cache only held the bytes until the
group commit's sync wrote them; and on a virtual machine, filling a gigabyte of new page-cache
pages cost up to 3 s of system time (the host backs each new page on first touch), where direct
writes took 0.04 s of CPU and 0.65 s of wall time for the same gigabyte, already on disk
(measured on the benchmark machine; buffered: 0.5-1.5 s, then 0.6 s more for the sync).

Direct writes must start at an aligned address, offset and length: the download buffer is an
anonymous mapping (page-aligned), every write but a file's last is the whole buffer, and the last
block of a file, if partial, is written through the page cache. A filesystem that refuses
O_DIRECT (EINVAL: tmpfs on older kernels, some FUSE) gets buffered writes, remembered per
directory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path
from typing import Any, Final

from .fdio import write_all

__all__ = ["DIRECT_ALIGN", "O_DIRECT", "NO_DIRECT", "open_direct_or_not", "write_direct", "drop_direct",
           "is_direct", "start_writeback", "libc"]

DIRECT_ALIGN: Final = 4096
O_DIRECT: Final = getattr(os, "O_DIRECT", 0)
NO_DIRECT: set[str] = set()  # directories whose filesystem refused O_DIRECT


def open_direct_or_not(path: Path | str, flags: int, extra: int, parent: str) -> int:
    """``os.open(path, flags | extra)``, ``extra`` being O_DIRECT or 0; if the filesystem refuses
    O_DIRECT, opened without it, and ``parent`` remembered in NO_DIRECT so it is not asked again."""
    if extra:
        try:
            return os.open(path, flags | extra, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            NO_DIRECT.add(parent)
    return os.open(path, flags, 0o644)


def write_direct(fd: int, buf: memoryview, n: int, offset: int, *, last: bool) -> bool:
    """The first ``n`` bytes of ``buf`` written at ``offset``, the end of ``fd`` (a file opened
    with ``direct`` by :meth:`mirrorgen.store.Store.open_temp`). ``buf`` is page-aligned and ``n`` a multiple of
    DIRECT_ALIGN, unless ``last``: the file's final bytes, whose whole blocks go direct and the
    rest (under a block) through the page cache, where the group commit's sync finds it. False if
    the filesystem refused the direct write: the bytes went in by a plain write, and the file is
    not direct any more.

    (The tail used to be written padded to a whole block and the file truncated after it. The
    truncate then zeroed the rest of that block, which only the disk held: a read from the disk,
    waited for, per file.)"""
    whole = n - n % DIRECT_ALIGN if last else n
    try:
        write_all(fd, buf[:whole])
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        drop_direct(fd)
        done = os.lseek(fd, 0, os.SEEK_CUR) - offset  # what went in before the refusal
        write_all(fd, buf[done:n])
        return False
    if whole != n:
        drop_direct(fd)
        write_all(fd, buf[whole:n])
    return True


def drop_direct(fd: int) -> None:
    """Writes and reads on ``fd`` go through the page cache from now on."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)


def is_direct(fd: int) -> bool:
    """Whether ``fd`` was opened with O_DIRECT (the filesystem may have refused it)."""
    return bool(O_DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


_SYNC_FILE_RANGE_WRITE: Final = 2
_WRITEBACK_MIN: Final = 256 << 10
_sync_file_range: Any = None


def start_writeback(fd: int, size: int) -> None:
    """Ask the kernel to start writing a finished file of ``size`` bytes to disk now, without
    waiting (sync_file_range with SYNC_FILE_RANGE_WRITE; it promises nothing about durability,
    the group commit's sync still does that). Left alone, the kernel starts writing dirty pages
    back only past dirty_background_ratio (10% of memory): a gigabyte of downloads sat dirty
    until the commit's sync, which then waited for all of it at once, with the network idle.
    Files under 256 KiB are left to the sync. Only files written through the page cache need
    this: downloads where the filesystem refuses O_DIRECT, or whose size the index does not give
    (a direct download is on disk already). Where the call is missing, nothing happens."""
    global _sync_file_range
    if size < _WRITEBACK_MIN:
        return
    if _sync_file_range is None:
        call = getattr(libc(), "sync_file_range", None)
        if call is not None:
            call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range = call or False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure is the sync's to report


_LIBC: Any = None


def libc() -> Any:
    """libc through ctypes, for the Linux calls the standard library lacks (syncfs,
    sync_file_range); False where there is none. A ctypes call releases the GIL."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC
