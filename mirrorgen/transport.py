"""Getting bytes from upstream: http(s) with retries, or a local directory / file:// URL.

Downloads are verified while they stream: the size is checked as bytes arrive (a file larger than
the index says is cut off at once) and the hash is computed on the fly, so a file is hashed once,
and only a file whose size and hash match reaches its final name.

Every request goes through ``concurrency`` download threads (:class:`Lane`, plain HTTP/1.1 with
kept-alive connections). Index files (a few, parsed in memory) are each one call to a thread
(:meth:`Transport.get`, :meth:`Transport.exists`). Package files (thousands, gigabytes) are each
fetched start to end by one of the threads: the body is received straight into
one reused buffer, hashed and written from there, in calls that release the GIL, so the event loop
never waits for a disk or a hash, and a byte is copied only from the socket and into the page
cache; a large file (``DIRECT_MIN``) not even there: it goes from the buffer to the disk
(O_DIRECT, see mirrorgen.direct). Small files go to one thread, which pipelines their requests
(sends up to 32 ahead on its connection) instead of waiting a round trip for each; large ones
to every thread (see :meth:`Batch.take`). A verified file stays a temporary file (mostly an
unnamed one, see :class:`mirrorgen.tempfiles.OpenTemp`) until :class:`GroupCommit` publishes it with
a batch of others: one filesystem sync for the batch instead of two fsyncs per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from .batch import MAX_BACKOFF, RETRY_STATUS, Batch, FetchRequest, Job, Retry
from .errors import MirrorError, UpstreamError
from .groupcommit import GroupCommit, Staged
from .httpproxy import Routes
from .lanes import Lane
from .manifest import Entry
from .store import Store
from .urls import local_path, redact

# Staged, GroupCommit, FetchRequest and local_path live in their own modules; they are named here
# too, as the parts of the one interface to upstream.
__all__ = ["Transport", "Verified", "Staged", "GroupCommit", "FetchRequest", "local_path"]

# Answers that mean "not there" (Transport.get, and Transport.exists's HEAD probes).
_ABSENT: Final = frozenset({404, 410})
_ABSENT_ON_HEAD: Final = _ABSENT | {401, 403}
# fetch_many takes outcomes from the threads every _POLL seconds, or when a thread wakes it
# (see mirrorgen.lanes, _WAKE_AFTER).
_POLL: Final = 0.02


@dataclass(frozen=True, slots=True)
class Verified:
    entry: Entry
    bytes_downloaded: int


class Transport:
    def __init__(self, *, retries: int = 4, timeout: float = 300.0, concurrency: int = 8,
                 backoff: float = 0.5) -> None:
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.concurrency = concurrency
        self.routes = Routes()  # http_proxy, https_proxy, no_proxy: read once per run
        self._lanes: list[Lane] = []
        self._free: list[Lane] = []
        self._lane_waiters: deque[asyncio.Future[Lane]] = deque()

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        lanes, self._lanes, self._free = self._lanes, [], []
        for lane in lanes:
            lane.stop()
        # Each finishes what it has in hand (an interrupted download removes its temporary file).
        # A thread stuck connecting is not waited for: it is a daemon and holds nothing durable.
        deadline = time.monotonic() + 5.0
        for lane in lanes:
            await asyncio.to_thread(lane.thread.join, max(0.0, deadline - time.monotonic()))

    async def _attempts(self, url: str) -> AsyncIterator[int]:
        """Yield attempt numbers, sleeping with exponential backoff and jitter between them."""
        for attempt in range(self.retries + 1):
            if attempt:
                await self._backoff(attempt)
            yield attempt

    async def _backoff(self, attempt: int) -> None:
        delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def get(self, url: str, *, limit: int = 4 << 30, optional: bool = False) -> bytes | None:
        """The whole body, or None if upstream says the file does not exist (404/410, no file).
        ``optional``: a file a channel may lack, where 401 and 403 also mean "not there" (as S3
        answers for a missing key), as :meth:`exists` takes them. Any other failure, after the
        retries, raises UpstreamError."""
        path = local_path(url)
        if path is not None:
            try:
                return await asyncio.to_thread(path.read_bytes)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                raise UpstreamError(redact(url), str(exc)) from None
        absent = _ABSENT_ON_HEAD if optional else _ABSENT
        status, body = await self._request(url, "GET", limit, absent=absent)
        return None if status in absent else body

    async def exists(self, url: str) -> bool:
        """Whether upstream has ``url``: a HEAD answered 200 (redirects followed). 404 and 410
        say it has not, and so do 401 and 403 (S3 answers 403 for a key that is not there to
        whoever may not list the bucket). Any other answer, or none after the retries, raises
        UpstreamError: "could not tell" taken for "not there" would drop what upstream has (a
        whole subdir from discovery, and with ``--clean`` its files)."""
        status, _ = await self._request(url, "HEAD", 0, absent=_ABSENT_ON_HEAD)
        return status == 200

    async def _request(self, url: str, method: str, limit: int,
                       absent: frozenset[int] = _ABSENT) -> tuple[int, bytes]:
        """One request on a download thread, with retries: 200 and its body, or a status of
        ``absent`` (the file is not there); any other answer raises UpstreamError."""
        last = "no attempt"
        async for _ in self._attempts(url):
            lane = await self._lane()
            job = Job(url, None, None, None, None)
            try:
                status, body = await lane.call(lane.request, job, method, limit)
            except Retry as retry:
                last = retry.reason
                continue
            except asyncio.CancelledError:
                job.cancel()  # the thread lets go of it; the lane takes its next call after
                raise
            finally:
                self._release(lane)
            if status in RETRY_STATUS:
                last = f"HTTP {status}"
                continue
            if status != 200 and status not in absent:
                raise UpstreamError(redact(url), f"HTTP {status}")
            return status, body
        raise UpstreamError(redact(url), f"{last} (after {self.retries + 1} attempts)")

    async def download(self, url: str, final: Path, store: Store, *, size: int | None,
                       sha256: str | None, md5: str | None) -> Verified:
        """Fetch ``url`` into ``final`` (atomically), checking size and hash before publishing.
        One file, published on its own; many go through :meth:`fetch` and :class:`GroupCommit`."""
        staged = await self.fetch(url, final, store, size=size, sha256=sha256, md5=md5)
        try:
            await asyncio.to_thread(store.publish_temps, [(staged.tmp, staged.final)])
        except BaseException:
            staged.discard()
            raise
        return Verified(staged.entry, staged.bytes_downloaded)

    async def fetch(self, url: str, final: Path, store: Store, *, size: int | None,
                    sha256: str | None, md5: str | None) -> Staged:
        """Fetch ``url`` into a temporary file next to ``final``, checking size and hash: the
        result is complete and verified, but neither durable nor under its final name yet (that
        is :meth:`Store.publish_temps`, for many files at once). On failure no file is left.

        Retried with backoff: HTTP 408/429/5xx, refused, reset or cut-short connections, timeouts.
        Not retried: other HTTP errors, a size or hash mismatch (upstream's index and file differ;
        the run reports it)."""
        request = FetchRequest(None, url, final, size, sha256, md5)
        async with contextlib.aclosing(self.fetch_many([request], store)) as outcomes:
            async for _, outcome in outcomes:
                if isinstance(outcome, MirrorError):
                    raise outcome
                return outcome
        raise AssertionError("fetch_many ended without an outcome")

    async def fetch_many(self, requests: Iterable[FetchRequest],
                         store: Store) -> AsyncGenerator[tuple[FetchRequest, Staged | MirrorError], None]:
        """:meth:`fetch` for many files: each request's outcome (a :class:`Staged` file, or the
        MirrorError that ended it) as it comes, in no particular order.

        The download threads take the requests from one queue themselves, and retry with the
        same backoff as :meth:`fetch`, so the event loop sees a file once, when it is done: for
        thousands of small files a round trip through the loop per file was the bottleneck.
        Outcomes are handed over in batches. Leaving the loop early (an error, a cancellation)
        stops every thread at once and removes the temporary files of what was not taken."""
        loop = asyncio.get_running_loop()
        batch = Batch(loop, requests, store, self.retries, self.backoff)
        if not batch.count:
            return
        lanes = [await self._lane() for _ in range(min(max(self.concurrency, 1), batch.count))]
        runs = [lane.call(lane.run_batch, batch, i == 0) for i, lane in enumerate(lanes)]
        for run in runs:
            run.add_done_callback(lambda _: batch.ready.set())
        try:
            while True:
                # Woken by a thread when outcomes pile up, else every _POLL seconds: a wake-up
                # per file would cost the download threads the GIL each time.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(batch.ready.wait(), _POLL)
                batch.ready.clear()
                batch.woken = False
                while batch.outcomes:
                    yield batch.outcomes.popleft()
                for run in runs:
                    if run.done() and run.exception() is not None:
                        raise run.exception()  # type: ignore[misc]  # not a file: the disk, a bug
                if all(run.done() for run in runs) and not batch.outcomes:
                    break
        finally:
            batch.stop()
            await asyncio.gather(*runs, return_exceptions=True)
            while batch.outcomes:
                _, outcome = batch.outcomes.popleft()
                if isinstance(outcome, Staged):
                    outcome.discard()  # never taken: nobody will publish it
            for lane in lanes:
                self._release(lane)

    async def _lane(self) -> Lane:
        if self._free:
            return self._free.pop()
        loop = asyncio.get_running_loop()
        if len(self._lanes) < max(self.concurrency, 1):
            lane = Lane(loop, self.timeout, self.routes)
            self._lanes.append(lane)
            return lane
        waiter: asyncio.Future[Lane] = loop.create_future()
        self._lane_waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            raise

    def _release(self, lane: Lane) -> None:
        while self._lane_waiters:
            waiter = self._lane_waiters.popleft()
            if not waiter.done():
                waiter.set_result(lane)
                return
        self._free.append(lane)
