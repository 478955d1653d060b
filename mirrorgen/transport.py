"""Getting bytes from upstream: http(s) with retries, or a local directory / file:// URL.

Downloads are verified while they stream: the size is checked as bytes arrive (a file larger than
the index says is cut off at once) and the hash is computed on the fly, so a file is hashed once,
and only a file whose size and hash match reaches its final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiohttp

from .errors import ChecksumMismatch, SizeMismatch, UpstreamError
from .store import Entry, Store
from .urls import is_remote, redact

__all__ = ["Transport", "Verified", "Staged", "local_path"]

CHUNK: Final = 1 << 18
# Bytes a download hands its thread at once: hashing releases the GIL for the whole batch, and one
# hand-over per MiB costs nothing next to hashing and writing it.
BATCH: Final = 1 << 20
_LANE_BACKLOG: Final = 8  # batches a download may be ahead of its thread before it waits for it
_IOV_MAX: Final = 1024
# aiohttp's per-response buffer: large enough that the socket is read in big pieces and not
# paused after every 128 KiB.
_READ_BUFSIZE: Final = 1 << 20
_RETRY_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF: Final = 30.0


@dataclass(frozen=True, slots=True)
class Verified:
    entry: Entry
    bytes_downloaded: int


def local_path(source: str) -> Path | None:
    """The filesystem path of a file:// URL or a plain path; None for http(s)."""
    if is_remote(source):
        return None
    if source.startswith("file://"):
        return Path(unquote(urlsplit(source).path))  # config allows only file:/// and file://localhost/
    return Path(source)


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Transport:
    def __init__(self, *, retries: int = 4, timeout: float = 300.0, concurrency: int = 8,
                 backoff: float = 0.5) -> None:
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._lanes: list[_Lane] = []
        self._free: list[_Lane] = []
        self._lane_waiters: deque[asyncio.Future[_Lane]] = deque()

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=max(self.concurrency * 2, 8), ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.timeout),
            headers={"User-Agent": "mirrorgen/0.1"},
            auto_decompress=False,  # we want upstream's bytes, exactly, to hash them
            read_bufsize=_READ_BUFSIZE,
        )
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
        lanes, self._lanes, self._free = self._lanes, [], []
        for lane in lanes:
            lane.stop()
        for lane in lanes:  # each finishes what it was given (an abort's unlink) first
            await asyncio.to_thread(lane.thread.join)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use `async with Transport(...)`"
        return self._session

    async def _attempts(self, url: str):  # type: ignore[no-untyped-def]
        """Yield attempt numbers, sleeping with exponential backoff and jitter between them."""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            yield attempt

    async def get(self, url: str, *, limit: int = 4 << 30) -> bytes | None:
        """The whole body, or None if upstream says the file does not exist (404/410, no file)."""
        path = local_path(url)
        if path is not None:
            try:
                return await asyncio.to_thread(path.read_bytes)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                raise UpstreamError(redact(url), str(exc)) from None
        last = "no attempt"
        async for _ in self._attempts(url):
            try:
                async with self.session.get(url) as resp:
                    if resp.status in (404, 410):
                        return None
                    if resp.status in _RETRY_STATUS:
                        last = f"HTTP {resp.status}"
                        continue
                    if resp.status != 200:
                        raise UpstreamError(redact(url), f"HTTP {resp.status}")
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        body += chunk
                        if len(body) > limit:
                            raise UpstreamError(redact(url), f"larger than {limit} bytes")
                    return bytes(body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = _describe(exc)
        raise UpstreamError(redact(url), f"{last} (after {self.retries + 1} attempts)")

    async def download(self, url: str, final: Path, store: Store, *, size: int | None,
                       sha256: str | None, md5: str | None, verify: bool = True) -> Verified:
        """Fetch ``url`` into ``final`` (atomically), checking size and hash before publishing.
        One file, published on its own; many go through :meth:`fetch` and :class:`GroupCommit`."""
        staged = await self.fetch(url, final, store, size=size, sha256=sha256, md5=md5, verify=verify)
        try:
            await asyncio.to_thread(store.publish_temps, [(staged.tmp, staged.final)])
        except BaseException:
            staged.discard()
            raise
        return Verified(staged.entry, staged.bytes_downloaded)

    async def fetch(self, url: str, final: Path, store: Store, *, size: int | None,
                    sha256: str | None, md5: str | None, verify: bool = True) -> Staged:
        """Fetch ``url`` into a temporary file next to ``final``, checking size and hash: the
        result is complete and verified, but not yet durable nor under its final name (that is
        :meth:`Store.publish_temps`, for many files at once). On any failure no file is left."""
        path = local_path(url)
        last = "no attempt"
        async for _ in self._attempts(url):
            try:
                if path is not None:
                    return await asyncio.to_thread(self._copy_local, url, path, final, store, size,
                                                   sha256, md5, verify)
                return await self._fetch_http(url, final, store, size, sha256, md5, verify)
            except _Retry as retry:
                last = retry.reason
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = _describe(exc)
        raise UpstreamError(redact(url), f"{last} (after {self.retries + 1} attempts)")

    async def _fetch_http(self, url: str, final: Path, store: Store, size: int | None,
                          sha256: str | None, md5: str | None, verify: bool) -> Staged:
        async with self.session.get(url) as resp:
            if resp.status in _RETRY_STATUS:
                raise _Retry(f"HTTP {resp.status}")
            if resp.status != 200:
                raise UpstreamError(redact(url), f"HTTP {resp.status}")
            lane = await self._lane()
            sink = _Sink(store, final, _Hasher(sha256, md5, verify))
            try:
                # Everything that touches the file (open, hash, write, fstat, close) runs on the
                # lane's thread, in order; the loop only receives, counts and hands over batches
                # of ~1 MiB, so it never waits for the disk or for hashing.
                lane.submit(sink.open)
                batch: list[bytes] = []
                batched = got = 0
                content = resp.content
                while True:
                    chunk, _ = await content.readchunk()
                    if not chunk:
                        if content.at_eof():
                            break
                        continue
                    got += len(chunk)
                    if size is not None and got > size:
                        raise SizeMismatch(redact(url), size, got)
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= BATCH:
                        if sink.error is not None:
                            raise sink.error
                        lane.submit(sink.write, batch)
                        batch, batched = [], 0
                        sink.submitted += 1
                        if sink.submitted - sink.done > _LANE_BACKLOG:
                            # The thread fell behind (slow disk): wait for it, bounding memory.
                            await lane.call(sink.sync)
                if batch:
                    lane.submit(sink.write, batch)
                if size is not None and got != size:
                    raise SizeMismatch(redact(url), size, got)
                return await lane.call(sink.finish, redact(url), got)
            except BaseException:
                lane.submit(sink.abort)
                raise
            finally:
                self._release(lane)

    async def _lane(self) -> _Lane:
        if self._free:
            return self._free.pop()
        if len(self._lanes) < max(self.concurrency, 1):
            lane = _Lane(asyncio.get_running_loop())
            self._lanes.append(lane)
            return lane
        waiter = asyncio.get_running_loop().create_future()
        self._lane_waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            raise

    def _release(self, lane: _Lane) -> None:
        while self._lane_waiters:
            waiter = self._lane_waiters.popleft()
            if not waiter.done():
                waiter.set_result(lane)
                return
        self._free.append(lane)

    @staticmethod
    def _copy_local(url: str, path: Path, final: Path, store: Store, size: int | None,
                    sha256: str | None, md5: str | None, verify: bool) -> Staged:
        try:
            src = open(path, "rb")
        except FileNotFoundError:
            raise UpstreamError(redact(url), "no such file") from None
        except OSError as exc:
            raise UpstreamError(redact(url), str(exc)) from None
        sink = _Sink(store, final, _Hasher(sha256, md5, verify))
        with src:
            try:
                sink.open()
                got = 0
                while chunk := src.read(BATCH):
                    got += len(chunk)
                    if size is not None and got > size:
                        raise SizeMismatch(redact(url), size, got)
                    sink.write([chunk])
                if size is not None and got != size:
                    raise SizeMismatch(redact(url), size, got)
                return sink.finish(redact(url), got)
            except BaseException:
                sink.abort()
                raise


@dataclass(frozen=True, slots=True)
class Staged:
    """A verified file under its temporary name ``tmp`` next to ``final``, closed but not yet
    durable; ``tmp`` None for a file found (and re-hashed) under its final name."""
    tmp: Path | None
    final: Path
    entry: Entry
    bytes_downloaded: int

    def discard(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


class GroupCommit:
    """Publishes verified downloads in batches (group commit) instead of one fsync per file and
    one per rename: :meth:`add` a :class:`Staged` file; a batch goes when ``max_files`` are
    waiting, or ``max_delay`` seconds after its first one, or at the end. A batch is
    :meth:`Store.publish_temps` (one filesystem sync, the renames, one fsync per directory), and
    only after that ``on_published`` is called with the batch's ``(key, staged)`` pairs, the caller
    records them (a manifest entry never names a file that is not durable under its final name).

    Leaving the ``async with`` normally publishes what is waiting; leaving it with an exception
    removes the temporary files of what was not published (a killed process leaves them for
    ``clean``: never under a final name, never recorded)."""

    def __init__(self, store: Store, on_published: Callable[[list[tuple[Any, Staged]]], None], *,
                 max_files: int = 512, max_delay: float = 0.25) -> None:
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


class _Lane:
    """A worker thread that runs one download's file work in order (a lane is held by one download
    at a time). ``submit`` does not wait; ``call`` returns a future the loop can await."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                            asyncio.Future[Any] | None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="mirrorgen-download", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.queue.put((fn, args, None))

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.queue.put((fn, args, future))
        return future

    def stop(self) -> None:
        self.queue.put(None)

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            fn, args, future = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            if future is not None:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting
                    self.loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        if isinstance(result, Staged):
            result.discard()  # its download was cancelled: nobody will publish it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Sink:
    """One download's temporary file and hashes. Called from one thread at a time, in order;
    the loop reads ``error`` and ``done`` only (plain attribute reads)."""

    def __init__(self, store: Store, final: Path, hasher: _Hasher) -> None:
        self.store, self.final, self.hasher = store, final, hasher
        self.tmp: Path | None = None
        self.fd = -1
        self.error: BaseException | None = None
        self.submitted = self.done = 0  # batches handed over (loop) and written (thread)

    def open(self) -> None:
        try:
            self.tmp, self.fd = self.store.open_temp(self.final)
        except BaseException as exc:
            self.error = exc

    def write(self, chunks: list[bytes]) -> None:
        try:
            if self.error is not None:
                return
            for chunk in chunks:
                self.hasher.update(chunk)
            if len(chunks) == 1:
                view = memoryview(chunks[0])
                while view:
                    view = view[os.write(self.fd, view):]
            else:
                while chunks:
                    n = os.writev(self.fd, chunks[:_IOV_MAX])
                    chunks = _advance(chunks, n)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done += 1

    def sync(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self, url: str, got: int) -> Staged:
        """Check the hashes, close the file, and hand it over as verified."""
        if self.error is not None:
            raise self.error
        digests = self.hasher.check(url)
        st = os.fstat(self.fd)
        if st.st_size != got:  # never expected: what we wrote is not what we received
            raise SizeMismatch(url, got, st.st_size)
        os.close(self.fd)
        self.fd = -1
        assert self.tmp is not None
        staged = Staged(self.tmp, self.final, Entry(st.st_size, digests[0], digests[1], st.st_mtime_ns), got)
        self.tmp = None  # the caller owns it now
        return staged

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def _advance(chunks: list[bytes], n: int) -> list[bytes]:
    """What is left of ``chunks`` after a (possibly partial) writev of ``n`` bytes."""
    i = 0
    while i < len(chunks) and n >= len(chunks[i]):
        n -= len(chunks[i])
        i += 1
    rest = chunks[i:]
    if rest and n:
        rest[0] = memoryview(rest[0])[n:]  # type: ignore[call-overload]
    return rest


class _Hasher:
    """sha256 always (what we record); md5 too when it is all upstream published."""

    def __init__(self, sha256: str | None, md5: str | None, verify: bool) -> None:
        self.want_sha256 = sha256.lower() if sha256 else None
        self.want_md5 = md5.lower() if md5 else None
        self.verify = verify
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if (md5 and not sha256) else None

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)

    def check(self, url: str) -> tuple[str, str | None]:
        got_sha = self.sha256.hexdigest()
        got_md5 = self.md5.hexdigest() if self.md5 is not None else None
        if self.verify:
            if self.want_sha256 and got_sha != self.want_sha256:
                raise ChecksumMismatch(url, "sha256", self.want_sha256, got_sha)
            if self.md5 is not None and got_md5 != self.want_md5:
                raise ChecksumMismatch(url, "md5", self.want_md5 or "", got_md5 or "")
        return got_sha, (got_md5 or self.want_md5)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
