"""Group commit: verified downloads published in batches, one filesystem sync for a batch
instead of two fsyncs per file (see :meth:`mirrorgen.store.Store.publish_temps`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .manifest import Entry
from .store import Store
from .tempfiles import Temp, discard_temp

__all__ = ["Staged", "GroupCommit"]


@dataclass(frozen=True, slots=True)
class Staged:
    """A verified file, staged next to ``final`` (``tmp``: a temporary name or an OpenTemp, see
    :meth:`Store.open_temp`), not yet durable; ``tmp`` None for a file found (and re-hashed)
    under its final name."""
    tmp: Temp | None
    final: Path | str
    entry: Entry
    bytes_downloaded: int

    def discard(self) -> None:
        discard_temp(self.tmp)


class GroupCommit:
    """Publishes verified downloads in batches (group commit) instead of one fsync per file and
    one per rename: :meth:`add` a :class:`Staged` file; a batch goes when ``max_files`` are
    waiting, or ``max_delay`` seconds after its first one, or at the end. A batch is
    :meth:`Store.publish_temps` (one filesystem sync, the links or renames, one fsync per
    directory), and only after that ``on_published`` is called with the batch's ``(key, staged)``
    pairs, the caller records them (a manifest entry never names a file that is not durable under
    its final name).

    Leaving the ``async with`` normally publishes what is waiting; leaving it with an exception
    removes the temporary files of what was not published (a killed process leaves its unnamed
    ones to the kernel, its named ones to ``clean``: never under a final name, never recorded)."""

    def __init__(self, store: Store, on_published: Callable[[list[tuple[Any, Staged]]], None], *,
                 max_files: int = 4096, max_delay: float = 1.0) -> None:
        self.store, self.on_published = store, on_published
        self.max_files, self.max_delay = max_files, max_delay
        self._pending: list[tuple[Any, Staged]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._first = 0.0
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def __aenter__(self) -> GroupCommit:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._task is not None
        self._closing = True
        if et is None:
            self._wake.set()
            await self._task  # the last batch; its errors are the run's errors
            return
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        pending, self._pending = self._pending, []
        for _, staged in pending:
            staged.discard()

    def add(self, key: Any, staged: Staged) -> None:
        assert self._task is not None, "use `async with GroupCommit(...)`"
        if self._task.done():  # the committer failed (the disk): stop the run now, not at its end
            staged.discard()
            error = None if self._task.cancelled() else self._task.exception()
            raise error or RuntimeError("group commit stopped")
        if not self._pending:
            self._first = time.monotonic()
        self._pending.append((key, staged))
        if len(self._pending) == 1 or len(self._pending) >= self.max_files:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Let the batch fill: until max_files wait, or max_delay after its first file.
            while not self._closing and len(self._pending) < self.max_files:
                left = self._first + self.max_delay - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            batch, self._pending = self._pending, []
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[Any, Staged]]) -> None:
        work = asyncio.ensure_future(
            asyncio.to_thread(self.store.publish_temps, [(s.tmp, s.final) for _, s in batch]))
        try:
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                # The run is stopping: the batch in flight (a sync and renames) is finished and
                # recorded all the same, so the next run neither fetches nor re-hashes it.
                await work
                self._published(batch)
                raise
        except BaseException:
            if work.done():  # else: cancelled twice; the thread may still rename, leave them be
                for _, staged in batch:
                    staged.discard()  # those renamed already are gone from here: re-hashed later
            raise
        self._published(batch)

    def _published(self, batch: list[tuple[Any, Staged]]) -> None:
        self.batches += 1
        self.on_published(batch)
