"""What an active run fetches, and fetching it: the files the manifest cannot vouch for, each
downloaded (or, if a killed run left it on disk, hashed) and verified, then published by group
commit and recorded in the manifest."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MirrorConfig
from .errors import MirrorError, UnsafePath
from .manifest import Entry, Manifest, hash_file
from .progress import Progress
from .store import Store
from .transport import FetchRequest, GroupCommit, Staged, Transport

if TYPE_CHECKING:
    from .sync import RunResult

__all__ = ["Todo", "plan", "fetch_all"]

# A file to fetch: (record, relpath, path on disk, what upstream says the file is).
Todo = tuple[Any, str, str, Any]


def plan(mirror: MirrorConfig, store: Store, channel: Any, manifest: Manifest, kept: list[Any],
         result: RunResult) -> list[Todo]:
    """The files to fetch: every kept file the manifest cannot vouch for (active mode), as
    (record, relpath, path on disk, what upstream says the file is: ``channel.expected``)."""
    todo: list[Todo] = []
    if mirror.mode != "active":
        return todo  # passive mirrors publish indexes only: no package file to check or fetch
    for record in kept:
        relpath = channel.relpath(record)
        try:
            path = store.resolve_str(mirror.name, relpath)
        except UnsafePath as exc:
            result.failed[relpath] = str(exc)
            continue
        facts = channel.expected(record)
        if facts.problem is not None:  # a hash or size upstream gives that cannot be checked
            result.failed[relpath] = facts.problem
            continue
        # A hash upstream gives is always checked (mirrorgen.sink.Hasher); what
        # verify_checksums: false allows is a file it gives none for, checked by size alone.
        if not facts.sha256 and not facts.md5 and (mirror.verify_checksums or facts.size is None):
            result.failed[relpath] = ("upstream publishes no sha256 or md5 for this file" if facts.size is not None
                                      else "upstream publishes no sha256, md5 or size for this file")
            continue
        if manifest.trusted(relpath, path, facts.size, facts.sha256, facts.md5):
            result.reused += 1
        else:
            todo.append((record, relpath, path, facts))
    return todo


async def fetch_all(mirror: MirrorConfig, store: Store, channel: Any, transport: Transport,
                    manifest: Manifest, todo: list[Todo], result: RunResult,
                    progress: Progress) -> None:
    """Fetch and verify every file of ``todo``, publishing them by group commit: a verified file
    waits under its temporary name until a batch of them is made durable by one filesystem sync
    and renamed; only then is it recorded in the manifest (see :class:`GroupCommit`)."""
    progress.start(len(todo), sum((facts.size or 0) for _, _, _, facts in todo))
    # Which of them are on disk already, from one listing per directory off the loop: a stat per
    # file on the loop would wait for the directory lock the download threads' creates hold.
    on_disk = await asyncio.to_thread(_names_on_disk, {os.path.dirname(path) for _, _, path, _ in todo})

    def published(batch: list[tuple[Any, Staged]]) -> None:
        manifest.add_many((relpath, staged.entry) for (relpath, _), staged in batch)
        for (_, rehashed), staged in batch:
            if rehashed:
                result.rehashed += 1
            else:
                result.downloaded += 1
                result.bytes_downloaded += staged.bytes_downloaded

    def failed(relpath: str, why: str) -> None:
        result.failed[relpath] = why
        progress.log(f"{mirror.name}: failed: {relpath}: {why}")
        progress.advance(0)

    requests: list[FetchRequest] = []
    found: list[FetchRequest] = []
    for record, relpath, path, facts in todo:  # facts usable and enough: _plan refused the rest
        request = FetchRequest(relpath, channel.file_url(record), path, facts.size, facts.sha256, facts.md5)
        # On disk but not in the manifest (a run killed before it recorded the file): hashed
        # instead of fetched again.
        (found if os.path.split(path) in on_disk else requests).append(request)

    try:
        async with GroupCommit(store, published) as commits:
            for request in found:
                entry = await asyncio.to_thread(_hash_existing, request.final, request.size,
                                                request.sha256, request.md5)
                if entry is None:
                    requests.append(request)
                    continue
                commits.add((request.key, True), Staged(None, request.final, entry, 0))
                progress.advance(entry.size)
            # aclosing: leaving the loop by an exception stops the download threads there and then.
            async with contextlib.aclosing(transport.fetch_many(requests, store)) as outcomes:
                async for request, outcome in outcomes:
                    if isinstance(outcome, MirrorError):
                        failed(request.key, str(outcome))
                        continue
                    commits.add((request.key, False), outcome)
                    progress.advance(outcome.bytes_downloaded)
    finally:
        progress.close()


def _names_on_disk(dirs: set[str]) -> set[tuple[str, str]]:
    """``(directory, name)`` of every entry in ``dirs`` (missing directories have none)."""
    out: set[tuple[str, str]] = set()
    for directory in dirs:
        try:
            with os.scandir(directory) as entries:
                out.update((directory, entry.name) for entry in entries)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return out


def _hash_existing(path: Path | str, size: int | None, sha256: str | None, md5: str | None) -> Entry | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if size is not None and st.st_size != size:
        return None
    got_sha, got_md5 = hash_file(path)
    if sha256 and got_sha != sha256.lower():
        return None
    if not sha256 and md5 and got_md5 != md5.lower():
        return None
    return Entry(st.st_size, got_sha, md5.lower() if md5 else got_md5, st.st_mtime_ns)
