"""The tree on disk. Nothing else in mirrorgen writes under ``root``.

- Every file is written to a temporary file in its final directory (under a temporary name, or
  with no name: :class:`mirrorgen.tempfiles.OpenTemp`), made durable, then put under its final
  name, so a partly written file is never visible under its final name (SPEC §4).
- Every path comes through :meth:`Store.resolve`, which refuses anything that would land outside
  the mirror's directory (``..``, absolute paths, backslashes, NUL, hidden state names).
- What was verified is remembered per mirror by :class:`mirrorgen.manifest.Manifest`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, overload

import orjson
import zstandard

from .direct import NO_DIRECT, O_DIRECT, open_direct_or_not
from .errors import LockedError, UnsafePath, naming
from .fdio import write_all
from .tempfiles import (ANONYMOUS, NAME_MAX, RUN_TAG, TEMP_PREFIX, OpenTemp, Temp, close_written,
                        discard_temp, fsync_path, is_run_tag, sync_filesystem, temp_name, worker_prefix)

__all__ = ["Store", "STATE_DIR", "COMMIT_GROUP"]

STATE_DIR: Final = ".mirrorgen"
# Small files per group commit (one filesystem sync, then the renames or links).
COMMIT_GROUP: Final = 4096
_MAX_PATH: Final = 1024
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f]")
_FSYNC_FILES_MAX: Final = 4  # publish_temps: up to this many files, fsync each; more, sync the fs


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
            if part in ("", ".", "..") or len(part) > NAME_MAX:
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
        return worker_prefix()

    @staticmethod
    def temp_tag() -> str:
        """This process's tag in the names of the temporary files it makes (after TEMP_PREFIX):
        recorded when a run starts, so that the next run can remove what this one left if it
        is killed (:meth:`discard_run_temps`)."""
        return RUN_TAG

    def discard_run_temps(self, mirror: str, tag: str) -> None:
        """Remove the temporary files that the run whose :meth:`temp_tag` was ``tag`` left in the
        mirror's tree and state directory (the run was killed: nothing else would). Files of
        any other process (a proxy storing a download there) have another tag."""
        if not is_run_tag(tag):
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
                  anonymous: Literal[False] = False, direct: bool = False,
                  parent: str | None = None) -> tuple[Path, int]: ...
    @overload
    def open_temp(self, final: Path | str, *, parent_exists: bool = False,
                  anonymous: bool, direct: bool = False, parent: str | None = None) -> tuple[Temp, int]: ...

    def open_temp(self, final: Path | str, *, parent_exists: bool = False,
                  anonymous: bool = False, direct: bool = False,
                  parent: str | None = None) -> tuple[Temp, int]:
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
        (:func:`is_direct` says); the caller then writes through :func:`write_direct`.
        ``parent``: ``final``'s directory, if the caller has it already."""
        # The directory as a string: pathlib's parent, hash and str cost more than the rest of a
        # small file's staging, once per file, for thousands of files.
        if parent is None:
            parent = os.path.dirname(final)
        if not parent_exists:
            os.makedirs(parent, exist_ok=True)
        extra = O_DIRECT if direct and parent not in NO_DIRECT else 0
        if anonymous and (fd := ANONYMOUS.open(parent, extra)) >= 0:
            return OpenTemp(fd), fd
        while True:
            # Unique per process by the counter (no urandom call per file); O_EXCL settles the rest.
            tmp = temp_name(final)
            try:
                return tmp, open_direct_or_not(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
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
                sync_filesystem(parent)
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
