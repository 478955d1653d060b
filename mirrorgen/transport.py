"""Getting bytes from upstream: http(s) with retries, or a local directory / file:// URL.

Downloads are verified while they stream: the size is checked as bytes arrive (a file larger than
the index says is cut off at once) and the hash is computed on the fly, so a file is hashed once,
and only a file whose size and hash match reaches its final name.

Every request goes through ``concurrency`` download threads (:class:`_Lane`, plain HTTP/1.1 with
kept-alive connections). Index files (a few, parsed in memory) are each one call to a thread
(:meth:`Transport.get`, :meth:`Transport.exists`). Package files (thousands, gigabytes) are each
fetched start to end by one of the threads: the body is received straight into
one reused buffer, hashed and written from there, in calls that release the GIL, so the event loop
never waits for a disk or a hash, and a byte is copied only from the socket and into the page
cache; a large file (``_DIRECT_MIN``) not even there: it goes from the buffer to the disk
(O_DIRECT, see mirrorgen.store). Small files go to one thread, which pipelines their requests
(sends up to 32 ahead on its connection) instead of waiting a round trip for each; large ones
to every thread (see :meth:`_Batch.take`). A verified file stays a temporary file (mostly an
unnamed one, see :class:`mirrorgen.store.OpenTemp`) until :class:`GroupCommit` publishes it with
a batch of others: one filesystem sync for the batch instead of two fsyncs per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import mmap
import os
import queue
import random
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote, unquote, urljoin, urlsplit

import httptools

from .errors import ChecksumMismatch, MirrorError, SizeMismatch, UpstreamError, naming
from .fdio import write_all
from .httpproxy import Proxy, ProxyRefused, Routes, open_tunnel
from .store import (DIRECT_ALIGN, Entry, Store, Temp, close_written, discard_temp, is_direct,
                    start_writeback, write_direct)
from .urls import basic_credentials, is_remote, redact

__all__ = ["Transport", "Verified", "Staged", "GroupCommit", "FetchRequest", "local_path"]

CHUNK: Final = 1 << 18
# What a download thread receives, hashes and writes at once: hashing and writing release the GIL
# for the whole of it, so the Python between them costs nothing next to the work.
BUFFER: Final = 1 << 20
# Files of at least this size (by the index) are written with O_DIRECT, a whole BUFFER at a time
# (see mirrorgen.store, "direct writes"); smaller ones, a write per packet received, through the
# page cache: a direct write waits for the disk, and under four blocks there is little to skip.
# At 256 KiB, files of 16-256 KiB (6% of benchmark 4's gigabyte) still cost 0.2 s of system
# time filling new page-cache pages; at 16 KiB the run's median fell from 1.43 s to 1.29 s
# (64 KiB: 1.41 s against 1.32 s for 16 KiB; 4 KiB: no change), runs interleaved.
_DIRECT_MIN: Final = 16 << 10
_RETRY_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS: Final = frozenset({301, 302, 303, 307, 308})
# Answers that mean "not there" (Transport.get, and Transport.exists's HEAD probes).
_ABSENT: Final = frozenset({404, 410})
_ABSENT_ON_HEAD: Final = _ABSENT | {401, 403}
_MAX_REDIRECTS: Final = 10
# Files up to this size go to the first download thread, which sends up to _PIPELINE_SMALL
# requests ahead of the response it is reading; larger ones to every thread, _PIPELINE_LARGE
# ahead. See _Batch.take.
_SMALL_FILE: Final = 64 << 10
# The first read of a larger file's response: its headers and a little of its body. A read of
# CHUNK would bring up to 256 KB of body with them, which is then copied three times on its way
# through ``conn.pending`` to the download buffer, where the rest of the body is received directly.
_HEAD_READ: Final = 16 << 10
_PIPELINE_SMALL: Final = 32
_PIPELINE_LARGE: Final = 1
# fetch_many hands outcomes to the loop in batches: every _POLL seconds, or _WAKE_AFTER at once.
_POLL: Final = 0.02
_WAKE_AFTER: Final = 256
_MAX_BACKOFF: Final = 30.0
_CONNECT_TIMEOUT: Final = 30.0
_USER_AGENT: Final = "mirrorgen/0.1"
# Characters left as they are in a request path (RFC 3986 pchar and "/"; "%" keeps escapes).
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE: Final = _PATH_SAFE + "?"


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
        self.routes = Routes()  # http_proxy, https_proxy, no_proxy: read once per run
        self._lanes: list[_Lane] = []
        self._free: list[_Lane] = []
        self._lane_waiters: deque[asyncio.Future[_Lane]] = deque()

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
        delay = min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF)
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
            job = _Job(url, None, None, None, None)
            try:
                status, body = await lane.call(lane.request, job, method, limit)
            except _Retry as retry:
                last = retry.reason
                continue
            except asyncio.CancelledError:
                job.cancel()  # the thread lets go of it; the lane takes its next call after
                raise
            finally:
                self._release(lane)
            if status in _RETRY_STATUS:
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
        batch = _Batch(loop, requests, store, self)
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

    async def _lane(self) -> _Lane:
        if self._free:
            return self._free.pop()
        loop = asyncio.get_running_loop()
        if len(self._lanes) < max(self.concurrency, 1):
            lane = _Lane(loop, self.timeout, self.routes)
            self._lanes.append(lane)
            return lane
        waiter: asyncio.Future[_Lane] = loop.create_future()
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


def _copy_local(url: str, path: Path, final: Path | str, store: Store, size: int | None,
                sha256: str | None, md5: str | None) -> Staged:
    try:
        src = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise UpstreamError(redact(url), "no such file") from None
    except OSError as exc:
        raise UpstreamError(redact(url), str(exc)) from None
    sink = _Sink(store, final, _Hasher(sha256, md5))
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


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """One file for :meth:`Transport.fetch_many`; ``key`` is the caller's, handed back."""
    key: Any
    url: str
    final: Path | str
    size: int | None
    sha256: str | None
    md5: str | None


class _Batch:
    """The shared state of one :meth:`Transport.fetch_many`: the requests left, the outcomes
    done, and how the threads wake the loop (once per batch of outcomes, not once per file)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: Iterable[FetchRequest],
                 store: Store, transport: Transport) -> None:
        self.loop, self.store = loop, store
        self.small: deque[FetchRequest] = deque()
        self.large: deque[FetchRequest] = deque()
        for request in requests:
            small = request.size is not None and request.size <= _SMALL_FILE
            (self.small if small else self.large).append(request)
        self.count = len(self.small) + len(self.large)
        # Set when an upstream would not take pipelined requests: small files are then shared
        # by every thread, each round trip carrying one.
        self.unpipelined = False
        self.retries, self.backoff = transport.retries, transport.backoff
        self.outcomes: deque[tuple[FetchRequest, Staged | MirrorError]] = deque()
        self.ready = asyncio.Event()
        self.woken = False
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self.jobs: set[_Job] = set()

    def take(self, first: bool, held: int = 0) -> FetchRequest | None:
        """The next request for a thread that holds ``held`` requests taken ahead; None when
        there is none for it.

        Small files go to the first thread, up to _PIPELINE_SMALL at a time: a file of a few
        kilobytes costs far less than a round trip to fetch, and more threads at it would mostly
        contend for the GIL (measured: 20,000 files of 4.5 KB took 0.74 s in one thread, 1.2 s
        in two). Large files, which hashing and writing keep busy outside the GIL, go to every
        thread, _PIPELINE_LARGE at a time, so that no thread sits on files the others could
        fetch. deque.popleft is atomic: no lock."""
        if first or self.unpipelined:
            with contextlib.suppress(IndexError):
                return self.small.popleft()
        if held >= _PIPELINE_LARGE:
            return None
        try:
            return self.large.popleft()
        except IndexError:
            return None

    def deliver(self, request: FetchRequest, outcome: Staged | MirrorError) -> None:
        """From a thread: one outcome; the loop is woken when _WAKE_AFTER are waiting (unless a
        wake-up is on its way), else it comes for them within _POLL seconds."""
        self.outcomes.append((request, outcome))
        if not self.woken and len(self.outcomes) >= _WAKE_AFTER:
            self.woken = True
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the loop is closed: nobody will take it
                pass

    def stop(self) -> None:
        self.stopped.set()
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel()

    def started(self, job: _Job) -> None:
        with self._lock:
            self.jobs.add(job)
        if self.stopped.is_set():
            job.cancel()

    def ended(self, job: _Job) -> None:
        with self._lock:
            self.jobs.discard(job)

    def pause(self, attempt: int) -> bool:
        """Sleep before retry ``attempt`` (as Transport._backoff); False if stopped meanwhile."""
        delay = min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF) * (0.5 + random.random() / 2)
        return not self.stopped.wait(delay)


class _Job:
    """One download handed to a lane; ``cancel`` (from the loop) makes the lane drop it."""

    def __init__(self, url: str, final: Path | str | None, batch: _Batch | None, size: int | None,
                 hasher: _Hasher | None) -> None:
        self.url, self.final, self.batch, self.size, self.hasher = url, final, batch, size, hasher
        self.cancelled = False
        self.sock: socket.socket | None = None

    def cancel(self) -> None:
        self.cancelled = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread if it is waiting on upstream


class _Cancelled(Exception):
    pass


class _BadResponse(OSError):
    """Upstream sent something that is not an HTTP/1.1 response we can read."""


class _NoResponse(ConnectionError):
    """The connection closed before a response began (a kept-alive one upstream had closed)."""


# An upstream that sends more header bytes than this is not a package server.
_MAX_HEADER_BYTES: Final = 64 << 10


class _Conn:
    """One kept-alive HTTP/1.1 connection of a download thread: requests are written by hand
    (one GET, a few fixed headers) and responses parsed by httptools (llhttp, the parser behind
    uvloop's and uvicorn's HTTP), whose C callbacks cost a few microseconds per response where
    http.client's pure-Python header parsing cost about 80: a mirror of many small files spends
    its time there. Only the status line, headers and chunked bodies go through the parser; a
    body of known length is received straight into the caller's buffer.

    Requests may be pipelined (RFC 9112 section 9.3): sent ahead, while earlier responses are
    still to come, and answered in order. ``inflight`` holds the requests sent whose responses
    have not begun, oldest first; ``pending``, bytes received past the response being read (the
    beginning of the next ones)."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float, proxy: Proxy | None = None) -> None:
        # Through ``proxy``: http requests name the whole URL (see _prepare); https goes through
        # a tunnel, opened here, with TLS to the upstream itself inside it.
        try:
            sock = socket.create_connection(proxy.address if proxy else (host, port), timeout=_CONNECT_TIMEOUT)
        except OSError as exc:
            if proxy is None:
                raise
            raise ConnectionError(f"proxy {proxy.url}: {_describe(exc)}") from None  # retried as it was
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy is not None:
                    open_tunnel(sock, proxy, host, port, _USER_AGENT)
                sock = _ssl_context().wrap_socket(sock, server_hostname=host)
            # Then as aiohttp's sock_read: per read, not per file. Set as socket options on a
            # blocking socket, not with settimeout: with a timeout, Python polls before every
            # send and receive, a second system call (and GIL round trip) each time. A read
            # that times out then fails with EAGAIN (see _describe).
            sock.settimeout(None)
            limit = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buf = bytearray(CHUNK)
        self.pending = bytearray()
        self.inflight: deque[bytes] = deque()
        self.answered = 0  # responses begun on this connection

    def send(self, requests: list[bytes]) -> None:
        """Write ``requests`` in one call; their responses come in order."""
        self.sock.sendall(b"".join(requests))
        self.inflight.extend(requests)

    def response(self, request: bytes, *, head: bool = False, read: int = CHUNK) -> _Response:
        """The response to ``request``, which must be the oldest one in flight (``head``: a
        HEAD request, whose response has no body whatever its headers say; ``read``: how many
        bytes to receive at most per read while its headers are incomplete)."""
        if not self.inflight or self.inflight[0] is not request:
            raise AssertionError("responses are read in the order their requests were sent")
        self.inflight.popleft()
        response = _Response(self)
        response.begin(no_body=head, read=read)
        self.answered += 1
        return response

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Overrun(Exception):
    """The parser met the beginning of the next response (chunked or close-delimited body)."""


class _Response:
    """A response being read from a :class:`_Conn`, with the parts of http.client's
    HTTPResponse the download thread uses: ``status``, ``length`` (body bytes still to come, or
    None), ``will_close``, ``getheader``, ``readinto``, ``read``, ``isclosed``; and
    ``content_length``, the whole body's.

    Bytes past this response's end (pipelined responses after it) are left in ``conn.pending``:
    the parser is fed the header block alone, and a body of known length is taken by count. A
    chunked or close-delimited body goes through the parser, which cannot stop at its end, so
    after one of those the connection is not reused when more responses are on their way."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.length: int | None = None          # body bytes still to come, when known
        self.content_length: int | None = None  # the whole body's, when known
        self.will_close = False
        self.headers: dict[bytes, bytes] = {}
        self._held = bytearray()      # body bytes the parser gave us, not yet handed out
        self._headers_done = False
        self._keep_alive = False
        self._complete = False
        self._messages = 0
        self._direct = False          # body of known length: received without the parser
        self._chunked = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._messages += 1
        if self._messages > 1:  # bytes past the end of this response
            raise _Overrun()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._headers_done = True
        # Asked now: once the message is complete (a small body in the same packet), llhttp has
        # reset what it knew, and answers False.
        self._keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._held += body

    def on_message_complete(self) -> None:
        self._complete = True

    def _parse(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Overrun) or not self._complete:
                raise _BadResponse(f"bad response from upstream: {exc}") from None
            # The next response began in the same packet: this one is whole, the rest is lost
            # to the parser, so the connection goes after this response.
            self.will_close = True
        except httptools.HttpParserError as exc:
            raise _BadResponse(f"bad response from upstream: {exc}") from None

    def _recv(self, limit: int = CHUNK) -> int:
        """Up to ``limit`` more bytes from the socket into ``conn.pending``: how many (0: closed)."""
        conn = self.conn
        n = conn.sock.recv_into(conn.buf, limit)
        conn.pending += memoryview(conn.buf)[:n]
        return n

    def begin(self, no_body: bool = False, read: int = CHUNK) -> None:
        pending = self.conn.pending
        start = 0
        while True:
            end = _header_end(pending, start)
            if end >= 0:
                break
            if len(pending) > _MAX_HEADER_BYTES:
                raise _BadResponse(f"response headers longer than {_MAX_HEADER_BYTES} bytes")
            start = max(0, len(pending) - 3)
            if not self._recv(read):
                if pending:
                    raise _BadResponse("connection closed in the middle of the response headers")
                raise _NoResponse("remote end closed connection without response")
        if end > _MAX_HEADER_BYTES:
            raise _BadResponse(f"response headers longer than {_MAX_HEADER_BYTES} bytes")
        head = bytes(pending[:end])
        del pending[:end]
        self._parse(head)
        if not self._headers_done:
            raise _BadResponse("bad response from upstream: incomplete header block")
        self.status = self.parser.get_status_code()
        self.will_close = not self._keep_alive
        if no_body:  # a HEAD's answer, RFC 9110 section 9.3.2: none, whatever Content-Length says
            with contextlib.suppress(ValueError):
                self.content_length = int(self.headers.get(b"content-length", b""))
            self.length = 0
            self._direct = True
            return
        chunked = self._chunked = b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()
        if not chunked and b"content-length" in self.headers:
            try:
                total = int(self.headers[b"content-length"])
            except ValueError:
                raise _BadResponse("bad Content-Length from upstream") from None
            if total < 0:
                raise _BadResponse("bad Content-Length from upstream")
            self.content_length = self.length = total
            self._direct = True
        elif not chunked:
            self.will_close = True  # the body ends when the connection does
        elif self.conn.inflight:
            self.will_close = True  # see the class's docstring
        if not self._direct and not self._complete and pending:
            data = bytes(pending)
            pending.clear()
            self._parse(data)

    def getheader(self, name: str) -> str | None:
        value = self.headers.get(name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    def isclosed(self) -> bool:
        """Whether the whole body has been read (the connection can carry the next request)."""
        if self._direct:
            return self.length == 0
        return self._complete and not self._held

    def readinto(self, view: memoryview) -> int:
        """Body bytes into ``view``: how many, 0 at the end of the body (or when the connection
        closes before it: ``length`` then says how many were missing)."""
        if not view:
            return 0
        if self._direct:
            assert self.length is not None
            want = min(len(view), self.length)
            if want == 0:
                return 0
            pending = self.conn.pending
            if pending:
                n = min(want, len(pending))
                view[:n] = pending[:n]
                del pending[:n]
            else:
                n = self.conn.sock.recv_into(view[:want])
            self.length -= n
            return n
        if self._held:
            n = min(len(view), len(self._held))
            view[:n] = self._held[:n]
            del self._held[:n]
            return n
        while not self._held and not self._complete:
            conn = self.conn
            n = conn.sock.recv_into(conn.buf)
            if not n:
                if self._chunked:
                    raise _BadResponse("connection closed in the middle of a chunked body")
                self._complete = True  # a body without a length ends with its connection
                break
            self._parse(memoryview(conn.buf)[:n])
        return self.readinto(view) if self._held else 0

    def read(self, limit: int) -> bytes:
        out = bytearray()
        view = memoryview(bytearray(min(limit, CHUNK)))
        while len(out) < limit and (n := self.readinto(view[:limit - len(out)])):
            out += view[:n]
        return bytes(out)


def _header_end(data: bytearray, start: int) -> int:
    """Where the header block in ``data`` ends (just past its empty line), or -1. A bare LF
    ends a line too (RFC 9112 section 2.2 lets a recipient accept it; llhttp does)."""
    crlf = data.find(b"\r\n\r\n", start)
    # A bare "\n\n" ends the block only if it comes first: look no further than that (a body
    # received with its headers is not scanned, which cost a pass over every first read).
    lf = data.find(b"\n\n", start, len(data) if crlf < 0 else crlf + 3)
    if lf >= 0:
        return lf + 2
    return crlf + 4 if crlf >= 0 else -1


class _Lane:
    """A download thread: runs the downloads it is given one after the other, each from request
    to verified temporary file, over HTTP/1.1 connections it keeps alive (one per host).
    A lane is held by one download at a time (:meth:`Transport._lane`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, routes: Routes) -> None:
        self.loop, self.timeout, self.routes = loop, timeout, routes
        self.conns: dict[tuple[str, str, int], _Conn] = {}
        # An anonymous mapping: page-aligned, as direct writes need.
        self.buf = memoryview(mmap.mmap(-1, BUFFER))
        self.dirs: set[str] = set()
        self.ahead: deque[FetchRequest] = deque()  # taken from the batch, not fetched yet
        self.serial: set[tuple[str, str, int]] = set()  # upstreams sent one request at a time
        # URL up to its last "/" -> (connection key, request bytes before the name, after it).
        self._bases: dict[str, tuple[tuple[str, str, int], bytes, bytes]] = {}
        # URL -> its GET as _send_ahead encoded it, for _open to take instead of encoding again.
        self._encoded: dict[str, tuple[tuple[str, str, int], bytes]] = {}
        self.first = False  # the thread that takes small files, in the batch it runs now
        self.queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                            asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="mirrorgen-download", daemon=True)
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.queue.put((fn, args, future))
        return future

    def stop(self) -> None:
        self.queue.put(None)

    def _work(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                fn, args, future = item
                try:
                    result, error = fn(*args), None
                except BaseException as exc:  # handed to the awaiting coroutine
                    result, error = None, exc
                try:
                    self.loop.call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:  # the loop is closed: nobody will take it
                    if isinstance(result, Staged):
                        result.discard()
        finally:
            for conn in self.conns.values():
                conn.close()

    def run_batch(self, batch: _Batch, first: bool) -> None:
        """Take requests from ``batch`` until none is left (or it is stopped), each fetched with
        retries, and hand each outcome over. ``first``: the thread that takes small files.

        Requests are taken ahead (``ahead``) so that they can be pipelined: sent on the
        connection while the response before them is still being read, which saves a round
        trip per file. They are still fetched (and retried) one at a time, in order; a request
        sent ahead whose connection goes before its response begins is sent again, not
        counted as an attempt."""
        self.ahead.clear()
        self.first = first
        request: FetchRequest | None
        try:
            while not batch.stopped.is_set():
                if self.ahead:
                    request = self.ahead.popleft()
                elif (request := batch.take(first)) is None:
                    return
                outcome = self._fetch_with_retries(batch, request)
                if outcome is None:  # stopped
                    return
                if batch.stopped.is_set() and isinstance(outcome, Staged):
                    outcome.discard()
                    return
                batch.deliver(request, outcome)
        finally:
            self._encoded.clear()
            # Requests in flight are not wanted any more; their responses are not read.
            for key in [k for k, conn in self.conns.items() if conn.inflight]:
                self._drop(key)

    def _fetch_with_retries(self, batch: _Batch, request: FetchRequest) -> Staged | MirrorError | None:
        path = local_path(request.url)
        last = "no attempt"
        for attempt in range(batch.retries + 1):
            if attempt and not batch.pause(attempt):
                return None
            job = _Job(request.url, request.final, batch, request.size,
                       _Hasher(request.sha256, request.md5))
            batch.started(job)
            try:
                if path is not None:
                    return _copy_local(request.url, path, request.final, batch.store, request.size,
                                       request.sha256, request.md5)
                return self.download(job)
            except _Retry as retry:
                last = retry.reason
            except _Cancelled:
                return None
            except MirrorError as exc:
                return exc
            finally:
                batch.ended(job)
        return UpstreamError(redact(request.url), f"{last} (after {batch.retries + 1} attempts)")

    # -- one download, in the thread ---------------------------------------------------------

    def download(self, job: _Job) -> Staged:
        if job.cancelled:
            raise _Cancelled()
        url, size = job.url, job.size
        key, resp = self._open(job)
        try:
            status = resp.status
            if status in _RETRY_STATUS:
                raise _Retry(f"HTTP {status}")
            if status != 200:
                raise UpstreamError(redact(url), f"HTTP {status}")
            if size is not None and resp.content_length is not None and resp.content_length != size:
                raise SizeMismatch(redact(url), size, resp.content_length)  # its Content-Length says so
            staged = self._receive(job, resp)
        except BaseException:
            self._drop(key)  # whatever is left of that response is not read: not reusable
            raise
        if resp.will_close:
            self._drop(key)
        return staged

    def request(self, job: _Job, method: str, limit: int) -> tuple[int, bytes]:
        """``method`` (GET or HEAD) of ``job.url``, redirects followed: the status, and the body
        of a 200 answer to a GET (at most ``limit`` bytes, else UpstreamError). Connection
        failures raise _Retry; the caller decides what a status means."""
        key, resp = self._open(job, method)
        try:
            body = b""
            if resp.status == 200 and method == "GET":
                body = self._read_body(job, resp, limit)
            elif method == "GET":
                with contextlib.suppress(OSError):
                    resp.read(1 << 16)  # an error page: short, or the connection goes
        except BaseException as exc:
            self._drop(key)  # what is left of the response is not read: not reusable
            if isinstance(exc, OSError):
                raise _Retry(_describe(exc)) from None
            raise
        if resp.will_close or not resp.isclosed():
            self._drop(key)
        if job.cancelled:
            raise _Cancelled()
        return resp.status, body

    @staticmethod
    def _read_body(job: _Job, resp: _Response, limit: int) -> bytes:
        total = resp.content_length
        if total is not None and total > limit:
            raise UpstreamError(redact(job.url), f"larger than {limit} bytes")
        body = bytearray(total if total is not None else CHUNK)
        view = memoryview(body)
        got = 0
        while True:
            if got == len(body):
                if total is not None:
                    break
                if got > limit:
                    raise UpstreamError(redact(job.url), f"larger than {limit} bytes")
                view.release()
                body.extend(bytes(len(body)))  # unknown length: double the room
                view = memoryview(body)
            n = resp.readinto(view[got:])
            if not n:
                if job.cancelled:
                    raise _Cancelled()
                if resp.length:
                    raise _Retry(f"connection closed {resp.length} bytes before the end of the body")
                break
            got += n
        view.release()
        if got > limit:
            raise UpstreamError(redact(job.url), f"larger than {limit} bytes")
        del body[got:]
        return bytes(body)

    def _receive(self, job: _Job, resp: _Response) -> Staged:
        size, buf = job.size, self.buf
        assert job.batch is not None and job.final is not None and job.hasher is not None  # a fetch's job
        sink = _Sink(job.batch.store, job.final, job.hasher, self.dirs)
        try:
            sink.open(direct=size is not None and size >= _DIRECT_MIN)
            got = 0
            filled = 0  # direct: bytes received into buf, not written yet
            while True:
                # With a known size, never ask for more than one byte past it: a longer body is
                # cut off as soon as it shows.
                view = buf[filled:] if sink.direct else buf
                if size is not None:
                    view = view[:size - got + 1]
                try:
                    n = resp.readinto(view)
                except OSError as exc:
                    raise _Cancelled() if job.cancelled else _Retry(_describe(exc)) from None
                if not n:
                    if job.cancelled:
                        raise _Cancelled()
                    if resp.length:  # closed before the end of the body: a broken transfer
                        raise _Retry(f"connection closed {resp.length} bytes before the end of the body")
                    break
                got += n
                if size is not None and got > size:
                    raise SizeMismatch(redact(job.url), size, got)
                if not sink.direct:
                    sink.write(buf[:n])
                elif (filled := filled + n) == len(buf):
                    sink.write_direct(buf, filled, last=False)
                    filled = 0
                if job.cancelled:
                    raise _Cancelled()
            if size is not None and got != size:
                raise SizeMismatch(redact(job.url), size, got)
            if filled:
                sink.write_direct(buf, filled, last=True)
            return sink.finish(job.url, got)
        except BaseException as exc:
            raise sink.abort(exc)

    def _open(self, job: _Job, method: str = "GET") -> tuple[tuple[str, str, int], _Response]:
        """GET ``job.url`` (or HEAD it), following redirects; the response to read, and its
        connection's key. Only a package file's GET (from :meth:`run_batch`) sends more ahead."""
        url = job.url
        for hop in range(_MAX_REDIRECTS + 1):
            if method == "GET":
                encoded = self._encoded.pop(url, None) if not hop else None
                key, data = encoded or self._encode(job.url, url)
            else:
                key, target, headers = _prepare(job.url, url, self.routes)
                data = _encode_request(target, _host_header(key), headers, method)
            resp = self._request(job, key, data, pipeline=not hop and job.batch is not None,
                                 head=method == "HEAD")
            location = resp.getheader("Location")
            if resp.status not in _REDIRECT_STATUS or not location:
                return key, resp
            try:
                resp.read(1 << 16)  # a redirect's body is short; more and the connection goes
            except OSError:
                pass
            if not resp.isclosed() or resp.will_close:
                self._drop(key)
            url = urljoin(url, location)
        raise UpstreamError(redact(job.url), f"more than {_MAX_REDIRECTS} redirects")

    def _encode(self, original: str, url: str) -> tuple[tuple[str, str, int], bytes]:
        """The connection key and the bytes of a GET of ``url`` (``original``: the URL asked
        for, before redirects). What a directory's URLs share is worked out once per directory:
        urlsplit and quote cost more than the rest of a small file's request."""
        base, _, name = url.rpartition("/")
        shared = self._bases.get(base)
        if shared is None:
            if "?" in url or "#" in url or base.count("/") < 2:
                key, target, headers = _prepare(original, url, self.routes)
                return key, _encode_request(target, _host_header(key), headers)
            key, target, headers = _prepare(original, base + "/", self.routes)  # quote works char by char
            prefix, _, tail = _encode_request(target + "\0", _host_header(key), headers).partition(b"\0")
            shared = self._bases[base] = (key, prefix, tail)
        elif "?" in name or "#" in name:
            key, target, headers = _prepare(original, url, self.routes)
            return key, _encode_request(target, _host_header(key), headers)
        key, prefix, tail = shared
        return key, b"".join((prefix, quote(name, safe=_PATH_SAFE).encode("latin-1"), tail))

    def _request(self, job: _Job, key: tuple[str, str, int], data: bytes, *,
                 pipeline: bool, head: bool = False) -> _Response:
        """Send the request (unless it was sent ahead on this connection), send more ahead if
        ``pipeline``, and begin reading its response."""
        conn = self.conns.get(key)
        for fresh in ((False, True) if conn is not None else (True,)):
            if job.cancelled:
                raise _Cancelled()
            try:
                if fresh:
                    conn = self._connect(key)
                assert conn is not None
                job.sock = conn.sock
                if job.cancelled:  # cancelled while connecting: its socket was not known then
                    raise _Cancelled()
                if conn.inflight and conn.inflight[0] != data:
                    # Something else is ahead of it (a redirect, a retry): start afresh.
                    self._drop(key)
                    conn = self._connect(key)
                    job.sock = conn.sock
                if conn.inflight:
                    data = conn.inflight[0]  # sent ahead: its response is next
                else:
                    conn.send([data])
                if pipeline and key not in self.serial:
                    self._send_ahead(job, key, conn)
                large = job.size is not None and job.size > _SMALL_FILE
                resp = conn.response(data, head=head, read=_HEAD_READ if large else CHUNK)
                if resp.will_close and conn.answered == 1 and conn.inflight and job.batch is not None:
                    # A new connection that closes after one response, with requests sent
                    # ahead on it: nothing is sent ahead to this upstream any more.
                    self.serial.add(key)
                    job.batch.unpipelined = True
                return resp
            except ProxyRefused as exc:  # no retry changes that
                self._drop(key)
                raise UpstreamError(redact(job.url), str(exc)) from None
            except OSError as exc:
                self._drop(key)
                if job.cancelled:
                    raise _Cancelled() from None
                if fresh or not isinstance(exc, ConnectionError):  # RemoteDisconnected is one
                    raise _Retry(_describe(exc)) from None
                # A kept-alive connection upstream had closed meanwhile: once more, on a new one.
        raise AssertionError("unreachable")

    def _send_ahead(self, job: _Job, key: tuple[str, str, int], conn: _Conn) -> None:
        """Send the requests taken ahead that go to ``conn``'s upstream and are not in flight
        yet, taking more from the batch up to the lane's depth. In order: responses come in the
        order requests were sent, and the lane reads them in the order it takes requests."""
        batch = job.batch
        assert batch is not None  # only a fetch's requests are pipelined
        depth = _PIPELINE_SMALL if self.first else _PIPELINE_LARGE
        if len(conn.inflight) > depth // 2 + 1:
            return  # enough on their way: more later, many per system call
        ahead = self.ahead
        while len(ahead) < depth and (more := batch.take(self.first, len(ahead))) is not None:
            ahead.append(more)
        out: list[bytes] = []
        # conn.inflight: this job's request, then the first of ``ahead``, sent already.
        for request in itertools.islice(ahead, len(conn.inflight) - 1, None):
            if not is_remote(request.url):
                break
            try:
                rkey, data = self._encode(request.url, request.url)
            except UpstreamError:
                break
            if rkey != key:
                break
            self._encoded[request.url] = (rkey, data)
            out.append(data)
        if out:
            conn.send(out)

    def _connect(self, key: tuple[str, str, int]) -> _Conn:
        conn = _Conn(*key, timeout=self.timeout, proxy=self.routes.proxy(*key))
        self.conns[key] = conn
        return conn

    def _drop(self, key: tuple[str, str, int]) -> None:
        conn = self.conns.pop(key, None)
        if conn is not None:
            conn.close()


def _prepare(original: str, url: str, routes: Routes) -> tuple[tuple[str, str, int], str, dict[str, str]]:
    """A GET of ``url`` (``original``: the URL asked for, before redirects): the connection's
    key (scheme, host, port), the request target, and the headers. Through a proxy (plain http
    only: https tunnels), the target is the whole URL and the proxy's credentials go with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(redact(original), f"cannot fetch {redact(url)}")
    key = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if (credentials := basic_credentials(parts)) is not None:
        headers["Authorization"] = credentials
    if scheme == "http" and routes and (proxy := routes.proxy(*key)) is not None:
        target = f"http://{_host_header(key)}{target}"
        if proxy.authorization is not None:
            headers["Proxy-Authorization"] = proxy.authorization
    return key, target, headers


def _host_header(key: tuple[str, str, int]) -> str:
    scheme, host, port = key
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


def _encode_request(target: str, host: str, headers: dict[str, str], method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """The system's trust store and defaults (what aiohttp verifies against too); made once, on
    the first https download, shared by every thread."""
    return ssl.create_default_context()


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
    """One download's temporary file and hashes (used from one thread)."""

    def __init__(self, store: Store, final: Path | str, hasher: _Hasher,
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
                                                 direct=direct)
        self.direct = direct and is_direct(self.fd)
        if self.dirs is not None and not known:
            self.dirs.add(parent)

    def write(self, data: memoryview) -> None:
        self.hasher.update(data)
        self.written += len(data)
        write_all(self.fd, data)

    def write_direct(self, buf: memoryview, n: int, *, last: bool) -> None:
        """The first ``n`` bytes of ``buf`` (page-aligned, ``n`` a multiple of DIRECT_ALIGN
        unless ``last``) to a direct file: see :func:`mirrorgen.store.write_direct`."""
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


class _Hasher:
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, socket.timeout, BlockingIOError,
                        ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
