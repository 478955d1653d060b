"""``mirrorgen verify``: re-hash every file the published index lists; report missing, corrupt
and stray files. Unlike a sync, this trusts nothing: every byte is read again."""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import MirrorConfig
from .errors import LockedError
from .manifest import Entry, Manifest, hash_file
from .store import Store
from .sync import channel_for

__all__ = ["VerifyResult", "verify_mirror"]


@dataclass
class VerifyResult:
    mirror: str
    checked: int = 0
    ok: int = 0
    missing: list[str] = field(default_factory=list)       # active: listed but not on disk
    not_fetched: int = 0                                    # passive: not yet requested by anyone
    corrupt: dict[str, str] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.missing or self.corrupt)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def _check(path: Path, record: dict[str, Any], recorded: Entry | None) -> str | None:
    """What is wrong with the file at ``path`` by the index's ``record``, or None. A file the
    index gives no hash for (mirrored with ``verify_checksums: false``, checked by its size) is
    held to the sha256 this mirror recorded when it took the file in (``recorded``)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    want_size = record.get("size")
    if isinstance(want_size, int) and size != want_size:
        return f"size {size}, index says {want_size}"
    sha256, md5 = record.get("sha256"), record.get("md5")
    sha256 = sha256 if isinstance(sha256, str) and sha256 else None
    md5 = md5 if isinstance(md5, str) and md5 else None
    got_sha, got_md5 = hash_file(path, md5=sha256 is None and md5 is not None)
    if sha256 is not None:
        if got_sha != sha256.lower():
            return f"sha256 {got_sha}, index says {sha256}"
    elif md5 is not None:
        if got_md5 != md5.lower():
            return f"md5 {got_md5}, index says {md5}"
    elif recorded is None or recorded.sha256 is None:
        return "the index gives no hash to check against, and none was recorded when it was mirrored"
    elif got_sha != recorded.sha256:
        return f"sha256 {got_sha}, recorded as {recorded.sha256} when it was mirrored (the index gives none)"
    return None


async def verify_mirror(mirror: MirrorConfig, store: Store) -> VerifyResult:
    channel = channel_for(mirror)
    base = store.mirror_dir(mirror.name)
    listed = channel.published_files(base)
    result = VerifyResult(mirror.name)
    recorded = Manifest(store, mirror.name).load().entries
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 2, 2)) as pool:
        futures = {}
        for relpath, record in listed.items():
            path = base / relpath
            if mirror.mode == "passive" and not path.exists():
                result.not_fetched += 1
                continue
            futures[relpath] = loop.run_in_executor(pool, _check, path, record, recorded.get(relpath))
        # The index files too: a client trusts them as much as the packages (a shard is named
        # by its own sha256; a .zst must be its repodata.json).
        index_futures = {relpath: loop.run_in_executor(pool, check)
                         for relpath, check in channel.index_checks(base)}
        for relpath, future in (*futures.items(), *index_futures.items()):
            problem = await future
            result.checked += 1
            if problem is None:
                result.ok += 1
            elif problem == "missing":
                result.missing.append(relpath)
            else:
                result.corrupt[relpath] = problem
    result.stray = _strays(base, set(listed) | set(index_futures))
    if any(relpath in index_futures for relpath in (*result.missing, *result.corrupt)):
        _forget_index_cache(mirror, store)
    return result


def _forget_index_cache(mirror: MirrorConfig, store: Store) -> None:
    """A damaged index file is repaired by the next sync only if it does not trust what it
    published last (it reuses a shard whose records did not change, and skips a subdir whose
    files look untouched): drop that cache, so the next sync writes every index file again.
    It is state, not the tree; while a sync runs (it holds the lock), it is left alone."""
    with contextlib.suppress(LockedError, OSError), store.lock(mirror.name):
        store.remove(store.state_dir(mirror.name) / "index-cache.json")


def _strays(base: Path, known: set[str]) -> list[str]:
    """Every file in the mirror's tree that neither the index lists nor is an index file (a
    clean removes only the kinds mirrorgen writes: see :func:`mirrorgen.sync.stray_files`)."""
    if not base.is_dir():
        return []
    out = []
    for directory, _, names in os.walk(base):
        for name in names:
            relpath = os.path.relpath(os.path.join(directory, name), base).replace(os.sep, "/")
            if relpath not in known:
                out.append(relpath)
    return sorted(out)
