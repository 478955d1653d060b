"""The tree on disk. Nothing else in mirrorgen writes under ``root``.

- Every file is written to a temporary file in its final directory (under a temporary name, or
  with no name: :class:`OpenTemp`), made durable, then put under its final name, so a partly
  written file is never visible under its final name (SPEC §4).
- Every path comes through :meth:`Store.resolve`, which refuses anything that would land outside
  the mirror's directory (``..``, absolute paths, backslashes, NUL, hidden state names).
- The :class:`Manifest` remembers each file that was verified against upstream's hash (size,
  hash, mtime), so a re-run trusts an unchanged file without hashing it again. Entries are appended
  to a journal as they are verified, so a run killed half-way loses none of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import re
import resource
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal, overload

import msgspec
import orjson
import zstandard

from .errors import LockedError, UnsafePath, naming
from .fdio import write_all

__all__ = ["Store", "Manifest", "Entry", "OpenTemp", "Temp", "STATE_DIR", "TEMP_PREFIX", "fsync_path",
           "hash_file", "unnamed_temps", "close_written", "discard_temp"]

STATE_DIR: Final = ".mirrorgen"
TEMP_PREFIX: Final = ".mirrorgen-tmp-"
# Small files per group commit (one filesystem sync, then the renames or links).
COMMIT_GROUP: Final = 4096
_MAX_PATH: Final = 1024
_MAX_PART: Final = 255
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f]")


class Entry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One verified file; stored as ``[size, sha256, md5, mtime_ns]`` in manifest.json."""

    size: int
    sha256: str | None
    md5: str | None
    mtime_ns: int


class _ManifestFile(msgspec.Struct):
    version: int = 1
    files: dict[str, Entry] = {}


_MANIFEST_DECODER: Final = msgspec.json.Decoder(_ManifestFile)
_MANIFEST_ENCODER: Final = msgspec.json.Encoder()


def hash_file(path: Path | str, *, md5: bool = True) -> tuple[str, str | None]:
    """sha256 (and md5) of a file already on disk, read once: for files a crash left unrecorded
    and for ``verify``. Downloads hash while they stream instead (mirrorgen.sink)."""
    h_sha = hashlib.sha256()
    h_md5 = hashlib.md5(usedforsecurity=False) if md5 else None
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h_sha.update(chunk)
            if h_md5 is not None:
                h_md5.update(chunk)
    return h_sha.hexdigest(), (h_md5.hexdigest() if h_md5 is not None else None)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- paths -----------------------------------------------------------------------------------

    def mirror_dir(self, mirror: str) -> Path:
        return self.root / mirror

    def state_dir(self, mirror: str | None = None) -> Path:
        base = self.root / STATE_DIR
        return base / mirror if mirror else base

    def resolve(self, mirror: str, relpath: str) -> Path:
        """The absolute path of ``relpath`` inside the mirror; UnsafePath for anything else."""
        return Path(self.resolve_str(mirror, relpath))

    def resolve_str(self, mirror: str, relpath: str) -> str:
        """:meth:`resolve`, as a string: called once per package file on every run (100,000s),
        so the checks are a few string operations and one regex, and no Path is built."""
        if not relpath or len(relpath) > _MAX_PATH:
            raise UnsafePath(relpath[:80], "empty or too long")
        if "\\" in relpath or relpath.startswith("/") or ":" in relpath.split("/", 1)[0]:
            raise UnsafePath(relpath, "not a relative path")
        if _CONTROL_RE.search(relpath):
            raise UnsafePath(relpath, "control character")
        for part in relpath.split("/"):
            if part in ("", ".", "..") or len(part) > _MAX_PART:
                raise UnsafePath(relpath, f"bad path component {part!r}")
            if part.startswith(TEMP_PREFIX) or part == STATE_DIR:
                raise UnsafePath(relpath, "reserved name")
        return f"{self.root}/{mirror}/{relpath}"

    # -- atomic writes ---------------------------------------------------------------------------

    def write_atomic(self, final: Path, data: bytes | Iterable[bytes]) -> None:
        """``final`` replaced at once: :meth:`stage`, then :meth:`publish_staged`."""
        self.publish_staged([self.stage(final, data)])

    def write_with_zst(self, final: Path, chunks: Iterable[bytes], size: int, *, level: int = 3) -> None:
        """``final`` and ``final.zst``, published at once: :meth:`stage_with_zst`, then
        :meth:`publish_temps` (the .zst is renamed into place first, the plain file last)."""
        self.publish_staged(self.stage_with_zst(final, chunks, size, level=level))

    def write_batch(self, items: Iterable[tuple[Path, bytes]], *, group: int = COMMIT_GROUP) -> int:
        """Many small files at once (new CEP-16 shards): staged (:meth:`stage_batch`) and
        published by group commits (:meth:`publish_temps`) of ``group`` files each: the guarantee
        of :meth:`write_atomic`, at one filesystem sync per group instead of two fsyncs per file
        (a cold conda-forge subdir has about 30,000 shards). Each group is committed on a second
        thread while the next is written. The files must not depend on each other's order: when
        this raises, some groups may be published and the rest are not (no temporary file is
        left behind)."""
        it = iter(items)

        def groups() -> Iterator[list[tuple[Temp, Path]]]:
            while temps := self.stage_batch(itertools.islice(it, group)):
                yield temps
                if len(temps) < group:
                    return

        return self.publish_groups(groups())

    def publish_groups(self, groups: Iterable[Sequence[tuple[Temp | None, Path]]]) -> int:
        """Groups of staged files, each published by one :meth:`publish_temps` on a second
        thread while the next group is drawn: how many were published. If this raises, the
        groups published stay so and the rest are removed; a group being drawn when ``groups``
        raises is that iterator's to remove."""
        written = 0
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mirrorgen-commit") as pool:
            commits: list[tuple[concurrent.futures.Future[None], Sequence[tuple[Temp | None, Path]]]] = []
            try:
                for temps in groups:
                    commits.append((pool.submit(self.publish_temps, temps), temps))
                for commit, temps in commits:
                    commit.result()
                    written += len(temps)
            except BaseException:
                for commit, temps in commits:
                    with contextlib.suppress(BaseException):
                        commit.result()
                    self.discard_temps(temps)
                raise
        return written

    # -- staging: written under temporary names now, published by publish_temps later ------------
    #
    # A staged file is complete under its temporary name but neither synced nor renamed: the
    # caller hands the (tmp, final) pairs to publish_temps, which does both in order, or to
    # discard_temps. Staging lets a run write the files of one batch on several threads at once
    # and still publish them in the order the tree needs (shards before the index naming them).

    def stage(self, final: Path, data: bytes | Iterable[bytes]) -> tuple[Path, Path]:
        """``data`` written to a new temporary file next to ``final``: ``(tmp, final)``."""
        tmp, fd = self.open_temp(final)
        try:
            with open(fd, "wb", closefd=True) as fh:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    fh.write(data)
                else:
                    for chunk in data:
                        fh.write(chunk)
        except BaseException as exc:
            self.discard_temps([(tmp, final)])
            raise naming(exc, final)
        return tmp, final

    def stage_with_zst(self, final: Path, chunks: Iterable[bytes], size: int, *,
                       level: int = 3) -> list[tuple[Path, Path]]:
        """``final`` and ``final.zst`` (level 3, as conda-index writes) staged from one pass over
        ``chunks``: each chunk is written and fed to the compressor (whose own threads compress
        while we go on), so the document is never whole in memory. ``size`` goes into the zstd
        frame header; it must be exact. Returned in publication order: the .zst first."""
        zfinal = final.with_name(final.name + ".zst")
        temps: list[tuple[Path, Path]] = []
        try:
            tmp, fd = self.open_temp(final)
            temps.append((tmp, final))
            with open(fd, "wb") as fh:
                ztmp, zfd = self.open_temp(zfinal, parent_exists=True)
                temps.insert(0, (ztmp, zfinal))
                # threads=-1: zstd's worker threads on every core, outside the GIL, each given
                # 1 MiB at a time (zstd's default is 8 MiB at level 3: some 40 MB more at peak).
                compressor = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters
                                                      .from_level(level, threads=-1, job_size=1 << 20))
                with open(zfd, "wb") as zfh:
                    written = 0
                    with compressor.stream_writer(zfh, size=size, closefd=False) as writer:
                        for chunk in chunks:
                            fh.write(chunk)
                            writer.write(chunk)
                            written += len(chunk)
                        if written != size:
                            raise RuntimeError(f"{final.name}: rendered {written} bytes, announced {size}")
        except BaseException as exc:
            self.discard_temps(temps)
            raise naming(exc, temps[-1][1] if temps else final)
        return temps

    def stage_batch(self, items: Iterable[tuple[Path, bytes]]) -> list[tuple[Temp, Path]]:
        """Each of ``items`` staged (raw file descriptors, one write each, :class:`OpenTemp`
        files where possible: small files by the thousand). If one fails, those staged so far
        are removed and the error is raised."""
        temps: list[tuple[Temp, Path]] = []
        parents: set[Path] = set()
        try:
            for final, data in items:
                tmp, fd = self.open_temp(final, parent_exists=final.parent in parents, anonymous=True)
                parents.add(final.parent)
                temps.append((tmp, final))
                try:
                    write_all(fd, data)
                finally:
                    close_written(tmp, fd)
        except BaseException as exc:
            self.discard_temps(temps)
            raise naming(exc, temps[-1][1]) if temps else exc
        return temps

    def publish_staged(self, temps: Sequence[tuple[Temp, Path]]) -> None:
        """:meth:`publish_temps`, or, if that fails, :meth:`discard_temps` (nothing left behind)."""
        try:
            self.publish_temps(temps)
        except BaseException:
            self.discard_temps(temps)
            raise

    def temp_prefix(self) -> str:
        """A new name prefix for temporary files made outside this object (by worker
        processes), unique to this call: every file under it is the caller's, and one left
        behind starts with TEMP_PREFIX, as ``sync --clean`` looks for (sync.stray_files)."""
        return f"{TEMP_PREFIX}{_TEMP_RUN}{next(_TEMP_COUNTER):x}w-"

    @staticmethod
    def temp_tag() -> str:
        """This process's tag in the names of the temporary files it makes (after TEMP_PREFIX):
        recorded when a run starts, so that the next run can remove what this one left if it
        is killed (:meth:`discard_run_temps`)."""
        return _TEMP_RUN

    def discard_run_temps(self, mirror: str, tag: str) -> None:
        """Remove the temporary files that the run whose :meth:`temp_tag` was ``tag`` left in the
        mirror's tree and state directory (the run was killed: nothing else would). Files of
        any other process (a proxy storing a download there) have another tag."""
        if not _TEMP_TAG_RE.fullmatch(tag):
            return
        prefix = TEMP_PREFIX + tag
        for top in (self.mirror_dir(mirror), self.state_dir(mirror)):
            for directory, _, files in os.walk(top):
                for name in files:
                    if name.startswith(prefix):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(directory, name))

    @staticmethod
    def discard_prefixed(directory: Path, prefix: str) -> None:
        """Remove every file in ``directory`` whose name starts with ``prefix``."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory):
                if name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(directory / name)

    @staticmethod
    def discard_temps(temps: Iterable[tuple[Temp | None, Path | str]]) -> None:
        """Remove staged files that will not be published (those published already are gone)."""
        for tmp, _ in temps:
            discard_temp(tmp)

    def write_state(self, mirror: str | None, name: str, document: Any, *, indent: bool = True) -> None:
        path = self.state_dir(mirror) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
        self.write_atomic(path, orjson.dumps(document, option=option))

    def read_state(self, mirror: str | None, name: str) -> Any:
        path = self.state_dir(mirror) / name
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError:
            return None

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # -- group commit (downloads) ----------------------------------------------------------------

    @overload
    def open_temp(self, final: Path | str, *, parent_exists: bool = False,
                  anonymous: Literal[False] = False, direct: bool = False) -> tuple[Path, int]: ...
    @overload
    def open_temp(self, final: Path | str, *, parent_exists: bool = False,
                  anonymous: bool, direct: bool = False) -> tuple[Temp, int]: ...

    def open_temp(self, final: Path | str, *, parent_exists: bool = False,
                  anonymous: bool = False, direct: bool = False) -> tuple[Temp, int]:
        """A new temporary file next to ``final``, and a raw file descriptor for writes from a
        worker thread. ``parent_exists``: the caller has seen the directory already (one system
        call instead of three; made again if it is gone).

        ``anonymous``: an :class:`OpenTemp` (a file with no name, held open) where the filesystem
        allows it and the process has file descriptors to spare; the caller must not close the
        descriptor then (publishing or discarding the temp does). Otherwise, and always without
        ``anonymous``: a named file (``TEMP_PREFIX``, a per-process tag and counter, then the
        final name), which the caller closes. Either way it goes to :meth:`publish_temps` or
        :meth:`discard_temps`.

        ``direct``: opened with ``O_DIRECT`` where the directory's filesystem takes it
        (:func:`is_direct` says); the caller then writes through :func:`write_direct`."""
        # The directory as a string: pathlib's parent, hash and str cost more than the rest of a
        # small file's staging, once per file, for thousands of files.
        parent = os.path.dirname(final)
        if not parent_exists:
            os.makedirs(parent, exist_ok=True)
        extra = _O_DIRECT if direct and parent not in _NO_DIRECT else 0
        if anonymous and (fd := _ANONYMOUS.open(parent, extra)) >= 0:
            return OpenTemp(fd), fd
        while True:
            # Unique per process by the counter (no urandom call per file); O_EXCL settles the rest.
            tmp = _temp_name(final)
            try:
                return tmp, _open_direct_or_not(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                                extra, parent)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if not parent_exists:
                    raise
                os.makedirs(parent, exist_ok=True)
                parent_exists = False

    def publish_temps(self, items: Sequence[tuple[Temp | None, Path | str]]) -> None:
        """Group commit of staged files (``(temp, final)`` pairs): one filesystem sync makes
        every one of them durable, then each is put under its final name (a named temp renamed,
        an :class:`OpenTemp` linked), then each directory touched is fsynced once. Only when this
        returns is a file both complete and durable under its final name; a process killed
        before leaves it under its temporary name, or nowhere.

        ``temp`` None: a file already under its final name (found on disk, re-hashed): it gets
        the same sync and directory fsync, so whatever is recorded afterwards is durable too.
        Several filesystems (a subdirectory mounted elsewhere) get one sync each. A batch of a
        few files (downloads trickling in) gets an fsync per file instead: a filesystem sync
        would also wait for every other writer's dirty pages."""
        if not items:
            return
        parents = {os.path.dirname(final) for _, final in items}
        if len(items) <= _FSYNC_FILES_MAX:
            for tmp, final in items:
                if isinstance(tmp, OpenTemp):
                    os.fsync(tmp.fd)
                else:
                    fsync_path(tmp if tmp is not None else final)
        else:
            devices: dict[int, str] = {}
            for parent in parents:
                devices.setdefault(os.stat(parent).st_dev, parent)
            for parent in devices.values():
                _sync_filesystem(parent)
        for tmp, final in items:
            if isinstance(tmp, OpenTemp):
                tmp.link(final)
                tmp.close()
            elif tmp is not None:
                os.replace(tmp, final)
        for parent in parents:
            fsync_path(parent, directory=True)

    # -- locking ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, mirror: str, *, write: bool = True) -> Iterator[None]:
        """One run per mirror at a time, across processes (flock is released if we die).

        ``write=False`` (a dry run) creates nothing: it takes an existing lock file, or none
        when no run ever made one, and leaves the holder's pid in it alone."""
        path = self.state_dir(mirror) / "lock"
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if write else 0), 0o644)
        except FileNotFoundError:
            if write:
                raise
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise LockedError(mirror, holder) from None
            if write:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            yield
        finally:
            os.close(fd)


_LIBC: Any = None
_TEMP_RUN: Final = secrets.token_hex(4)
_TEMP_TAG_RE: Final = re.compile(r"[0-9a-f]{8}")
_TEMP_COUNTER: Final = itertools.count()
_FSYNC_FILES_MAX: Final = 4  # publish_temps: up to this many files, fsync each; more, sync the fs


def _temp_name(final: Path | str) -> Path:
    parent, name = os.path.split(final)
    return Path(parent, f"{TEMP_PREFIX}{_TEMP_RUN}{next(_TEMP_COUNTER):x}-{name}"[:_MAX_PART])


class OpenTemp:
    """A staged file with no name yet: an ``O_TMPFILE`` in its final directory, held open until
    :meth:`Store.publish_temps` links it under its final name.

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
            tmp = _temp_name(final)
            try:
                os.link(str(self.fd), tmp, src_dir_fd=_ANONYMOUS.proc_fd())
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
                _ANONYMOUS.release()


Temp = Path | OpenTemp  # a staged file: a named temporary file, or an OpenTemp


def close_written(tmp: Temp, fd: int) -> None:
    """Done writing through ``fd`` (from :meth:`Store.open_temp`): close it, unless ``tmp`` keeps
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
    return _ANONYMOUS.held


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
                return _open_direct_or_not(parent, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, extra, parent)
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
        probe = _temp_name(Path(parent, "probe"))
        try:
            os.link(str(fd), probe, src_dir_fd=self.proc_fd())
            os.unlink(probe)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
_ANONYMOUS: Final = _AnonymousFiles()


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
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.PyDLL(None, use_errno=True)
            linkat, close = libc.linkat, libc.close
            linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            linkat.restype = ctypes.c_int
            close.argtypes = [ctypes.c_int]
            close.restype = ctypes.c_int
            self._linkat, self._close = linkat, close

    def link(self, fd: int, final: Path | str) -> None:
        """``os.link(str(fd), final, src_dir_fd=/proc/self/fd)``: an open file given a name."""
        proc = _ANONYMOUS.proc_fd()
        if self._linkat is None:
            os.link(str(fd), final, src_dir_fd=proc)
            return
        name = os.fsencode(final)
        if self._linkat(proc, b"%d" % fd, _AT_FDCWD, name, _AT_SYMLINK_FOLLOW) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(name))

    def close(self, fd: int) -> None:
        if self._close is None:
            os.close(fd)
        elif self._close(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_AT_FDCWD: Final = -100
_AT_SYMLINK_FOLLOW: Final = 0x400
_HELD: _HeldCalls | None = None


def _held_calls() -> _HeldCalls:
    global _HELD
    if _HELD is None:
        _HELD = _HeldCalls()
    return _HELD


def _libc() -> Any:
    """libc through ctypes, for the Linux calls the standard library lacks (syncfs,
    sync_file_range); False where there is none. A ctypes call releases the GIL."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC


def _sync_filesystem(path: Path | str) -> None:
    """syncfs(2) on the filesystem holding ``path``: flush every dirty page there in one call.
    Elsewhere: os.sync()."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


# -- direct writes (downloads of 16 KiB or more) ---------------------------------------------------
#
# A download of at least mirrorgen.sink's DIRECT_MIN (16 KiB) is written with O_DIRECT:
# from the download thread's buffer to the disk, not copied into the page cache first. The run
# must make every file durable before publishing it anyway, so the page cache only held the
# bytes until the group commit's sync wrote them; and on
# a virtual machine, filling a gigabyte of new page-cache pages cost up to 3 s of system time
# (the host backs each new page on first touch), where direct writes took 0.04 s of CPU and
# 0.65 s of wall time for the same gigabyte, already on disk (measured on the benchmark machine;
# buffered: 0.5-1.5 s, then 0.6 s more for the sync).
#
# Direct writes must start at an aligned address, offset and length: the download buffer is an
# anonymous mapping (page-aligned), every write but a file's last is the whole buffer, and the
# last block of a file, if partial, is written through the page cache. A filesystem that
# refuses O_DIRECT (EINVAL: tmpfs on older kernels, some FUSE) gets buffered writes, remembered
# per directory.

DIRECT_ALIGN: Final = 4096
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)
_NO_DIRECT: set[str] = set()  # directories whose filesystem refused O_DIRECT


def _open_direct_or_not(path: Path | str, flags: int, extra: int, parent: str) -> int:
    if extra:
        try:
            return os.open(path, flags | extra, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _NO_DIRECT.add(parent)
    return os.open(path, flags, 0o644)


def write_direct(fd: int, buf: memoryview, n: int, offset: int, *, last: bool) -> bool:
    """The first ``n`` bytes of ``buf`` written at ``offset``, the end of ``fd`` (a file opened
    with ``direct`` by :meth:`Store.open_temp`). ``buf`` is page-aligned and ``n`` a multiple of
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
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def is_direct(fd: int) -> bool:
    """Whether ``fd`` was opened with O_DIRECT (the filesystem may have refused it)."""
    return bool(_O_DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT)


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
        call = getattr(_libc(), "sync_file_range", None)
        if call is not None:
            call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range = call or False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure is the sync's to report


def fsync_path(path: Path | str, *, directory: bool = False) -> None:
    """fsync a file (or a directory) by its name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """What was verified, per mirror: relpath -> Entry. A base file plus an append-only journal."""

    def __init__(self, store: Store, mirror: str) -> None:
        self.store, self.mirror = store, mirror
        self.dir = store.state_dir(mirror)
        self.entries: dict[str, Entry] = {}
        self._journal: IO[bytes] | None = None
        self._dirty = False  # anything added or removed since manifest.json was written

    def load(self) -> Manifest:
        # One msgspec call decodes 100,000s of entries straight into Entry structs.
        try:
            self.entries = _MANIFEST_DECODER.decode((self.dir / "manifest.json").read_bytes()).files
        except FileNotFoundError:
            self.entries = {}
        except msgspec.DecodeError:
            self.entries = {}  # unreadable: every file is hashed again, none is trusted blindly
            self._dirty = True
        journal = self.dir / "manifest.journal"
        if journal.exists():
            for line in journal.read_bytes().splitlines():
                try:
                    op, path, *rest = orjson.loads(line)
                    entry = Entry(*rest) if op == "+" else None
                except (orjson.JSONDecodeError, ValueError, TypeError):
                    continue  # a line cut short by a crash: that file is simply checked again
                if entry is not None:
                    self.entries[path] = entry
                else:
                    self.entries.pop(path, None)
                self._dirty = True
        return self

    def trusted(self, relpath: str, path: str | Path, size: int | None, sha256: str | None,
                md5: str | None) -> bool:
        """True if the file on disk is the one we verified, and matches what the index says now."""
        entry = self.entries.get(relpath)
        if entry is None:
            return False
        if sha256 and entry.sha256 and sha256.lower() != entry.sha256:
            return False
        if not sha256 and md5 and entry.md5 and md5.lower() != entry.md5:
            return False
        if size is not None and size != entry.size:
            return False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns

    def add_many(self, items: Iterable[tuple[str, Entry]]) -> None:
        """Record verified files (a group commit's worth): one journal write for all of them."""
        lines = []
        for relpath, entry in items:
            self.entries[relpath] = entry
            lines.append(orjson.dumps(["+", relpath, entry.size, entry.sha256, entry.md5, entry.mtime_ns]))
        if lines:
            self._dirty = True
            self._append(lines)

    def discard(self, relpath: str) -> None:
        if self.entries.pop(relpath, None) is not None:
            self._dirty = True
            self._append([orjson.dumps(["-", relpath])])

    def _append(self, lines: list[bytes]) -> None:
        if self._journal is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._journal = open(self.dir / "manifest.journal", "ab")
        # Flushed per call: a killed process keeps what the OS already has (a line cut short by
        # the kill is skipped on load, and its file hashed again).
        lines.append(b"")
        self._journal.write(b"\n".join(lines))
        self._journal.flush()

    def save(self) -> None:
        """Fold the journal into manifest.json (atomically), then empty the journal. A run that
        verified nothing new leaves both as they are."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if not self._dirty:
            return
        doc = _ManifestFile(files=dict(sorted(self.entries.items())))
        self.store.write_atomic(self.dir / "manifest.json", _MANIFEST_ENCODER.encode(doc))
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "manifest.journal").unlink()
        self._dirty = False

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
