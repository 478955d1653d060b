"""One download's temporary file: bytes written as they arrive, hashed on the way, the size
and upstream's hash checked before the file is handed over (:class:`mirrorgen.groupcommit.Staged`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Final

from .errors import ChecksumMismatch, SizeMismatch, UpstreamError, naming
from .fdio import write_all
from .groupcommit import Staged
from .direct import DIRECT_ALIGN, is_direct, start_writeback, write_direct
from .manifest import Entry
from .store import Store
from .tempfiles import Temp, close_written, discard_temp
from .urls import redact

__all__ = ["Sink", "Hasher", "copy_local", "BUFFER", "DIRECT_MIN"]

# What a download thread receives, hashes and writes at once: hashing and writing release the GIL
# for the whole of it, so the Python between them costs nothing next to the work.
BUFFER: Final = 1 << 20
# Files of at least this size (by the index) are written with O_DIRECT, a whole BUFFER at a time
# (see mirrorgen.direct); smaller ones, a write per packet received, through the
# page cache: a direct write waits for the disk, and under four blocks there is little to skip.
# At 256 KiB, files of 16-256 KiB (6% of benchmark 4's gigabyte) still cost 0.2 s of system
# time filling new page-cache pages; at 16 KiB the run's median fell from 1.43 s to 1.29 s
# (64 KiB: 1.41 s against 1.32 s for 16 KiB; 4 KiB: no change), runs interleaved.
DIRECT_MIN: Final = 16 << 10


def copy_local(url: str, path: Path, final: Path | str, store: Store, size: int | None,
               sha256: str | None, md5: str | None) -> Staged:
    try:
        src = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise UpstreamError(redact(url), "no such file") from None
    except OSError as exc:
        raise UpstreamError(redact(url), str(exc)) from None
    sink = Sink(store, final, Hasher(sha256, md5))
    buf = memoryview(bytearray(BUFFER))
    with src:
        try:
            sink.open()
            got = 0
            while n := src.readinto(buf):
                got += n
                if size is not None and got > size:
                    raise SizeMismatch(redact(url), size, got)
                sink.write(buf[:n])
            if size is not None and got != size:
                raise SizeMismatch(redact(url), size, got)
            return sink.finish(url, got)
        except BaseException as exc:
            raise sink.abort(exc)


class Sink:
    """One download's temporary file and hashes (used from one thread)."""

    def __init__(self, store: Store, final: Path | str, hasher: Hasher,
                 dirs: set[str] | None = None) -> None:
        self.store, self.final, self.hasher, self.dirs = store, final, hasher, dirs
        self.tmp: Temp | None = None
        self.fd = -1
        self.direct = False
        self.written = 0

    def open(self, direct: bool = False) -> None:
        """Create the temporary file; ``dirs``: directories known to exist, shared by the calls of
        one thread, so that a directory is made (and checked) once, not once per file.
        ``direct``: with O_DIRECT if the filesystem takes it (``self.direct`` says), written
        through :meth:`write_direct` then."""
        parent = os.path.dirname(self.final)
        known = self.dirs is not None and parent in self.dirs
        self.tmp, self.fd = self.store.open_temp(self.final, parent_exists=known, anonymous=True,
                                                 direct=direct, parent=parent)
        self.direct = direct and is_direct(self.fd)
        if self.dirs is not None and not known:
            self.dirs.add(parent)

    def write(self, data: memoryview) -> None:
        self.hasher.update(data)
        self.written += len(data)
        write_all(self.fd, data)

    def write_direct(self, buf: memoryview, n: int, *, last: bool) -> None:
        """The first ``n`` bytes of ``buf`` (page-aligned, ``n`` a multiple of DIRECT_ALIGN
        unless ``last``) to a direct file: see :func:`mirrorgen.direct.write_direct`."""
        assert last or n % DIRECT_ALIGN == 0
        self.hasher.update(buf[:n])
        if not write_direct(self.fd, buf, n, self.written, last=last):
            self.direct = False
        self.written += n

    def finish(self, url: str, got: int) -> Staged:
        """Check the hashes, close the file, and hand it over as verified (``url``, as asked
        for: an error names it redacted)."""
        digests = self.hasher.check(url)
        if not self.direct:
            start_writeback(self.fd, got)
        st = os.fstat(self.fd)
        if st.st_size != got:  # never expected: what was written is not what was received
            raise SizeMismatch(redact(url), got, st.st_size)
        assert self.tmp is not None
        close_written(self.tmp, self.fd)
        self.fd = -1
        staged = Staged(self.tmp, self.final, Entry(st.st_size, digests[0], digests[1], st.st_mtime_ns), got)
        self.tmp = None  # the caller owns it now
        return staged

    def abort(self, exc: BaseException) -> BaseException:
        """Remove the temporary file after ``exc``; what to raise: ``exc``, naming the file if
        it was a write that failed (a full disk)."""
        if self.fd >= 0 and self.tmp is not None:
            with contextlib.suppress(OSError):
                close_written(self.tmp, self.fd)
        self.fd = -1
        with contextlib.suppress(OSError):
            discard_temp(self.tmp)
        self.tmp = None
        return naming(exc, self.final)


class Hasher:
    """sha256 always (what we record); md5 too when it is all upstream published. Whatever hash
    upstream gave is checked, always: ``verify_checksums: false`` only lets a file that has none
    be mirrored (see mirrorgen.sync), it never publishes one that fails the hash it has."""

    def __init__(self, sha256: str | None, md5: str | None) -> None:
        self.want_sha256 = sha256.lower() if sha256 else None
        self.want_md5 = md5.lower() if md5 else None
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if (md5 and not sha256) else None

    def update(self, chunk: bytes | memoryview) -> None:
        self.sha256.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)

    def check(self, url: str) -> tuple[str, str | None]:
        got_sha = self.sha256.hexdigest()
        got_md5 = self.md5.hexdigest() if self.md5 is not None else None
        if self.want_sha256 and got_sha != self.want_sha256:
            raise ChecksumMismatch(redact(url), "sha256", self.want_sha256, got_sha)
        if self.md5 is not None and got_md5 != self.want_md5:
            raise ChecksumMismatch(redact(url), "md5", self.want_md5 or "", got_md5 or "")
        return got_sha, (got_md5 or self.want_md5)
