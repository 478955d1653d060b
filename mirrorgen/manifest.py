"""What was verified, per mirror (:class:`Manifest`): each file checked against upstream's hash,
with its size, hash and mtime, so a re-run trusts an unchanged file without hashing it again.
Entries are appended to a journal as they are verified, so a run killed half-way loses none of
them."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import msgspec
import orjson

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Manifest", "Entry", "hash_file"]


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
