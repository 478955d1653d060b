"""The download threads: each a lane, holding kept-alive connections (mirrorgen.http1), fetching
the files of one :meth:`mirrorgen.transport.Transport.fetch_many` batch (mirrorgen.batch) start
to end, with retries, and handing each verified file (a :class:`mirrorgen.groupcommit.Staged`)
to the loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import mmap
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote, urljoin

from .batch import (PIPELINE_LARGE, PIPELINE_SMALL, RETRY_STATUS, SMALL_FILE, Batch, Cancelled,
                    FetchRequest, Job, Retry)
from .errors import MirrorError, SizeMismatch, UpstreamError
from .groupcommit import Staged
from .http1 import CHUNK, PATH_SAFE, Connection, Response, describe, encode_request, host_header, prepare
from .httpproxy import ProxyRefused, Routes
from .sink import BUFFER, DIRECT_MIN, Hasher, Sink, copy_local
from .urls import is_remote, local_path, redact

__all__ = ["Lane"]

_REDIRECT_STATUS: Final = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS: Final = 10
# The first read of a larger file's response: its headers and a little of its body. A read of
# CHUNK would bring up to 256 KB of body with them, which is then copied three times on its way
# through ``conn.pending`` to the download buffer, where the rest of the body is received directly.
_HEAD_READ: Final = 16 << 10


class Lane:
    """A download thread: runs the downloads it is given one after the other, each from request
    to verified temporary file, over HTTP/1.1 connections it keeps alive (one per host).
    A lane is held by one download at a time (:meth:`Transport._lane`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, routes: Routes) -> None:
        self.loop, self.timeout, self.routes = loop, timeout, routes
        self.conns: dict[tuple[str, str, int], Connection] = {}
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

    def run_batch(self, batch: Batch, first: bool) -> None:
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

    def _fetch_with_retries(self, batch: Batch, request: FetchRequest) -> Staged | MirrorError | None:
        path = local_path(request.url)
        last = "no attempt"
        for attempt in range(batch.retries + 1):
            if attempt and not batch.pause(attempt):
                return None
            job = Job(request.url, request.final, batch, request.size,
                      Hasher(request.sha256, request.md5))
            batch.started(job)
            try:
                if path is not None:
                    return copy_local(request.url, path, request.final, batch.store, request.size,
                                      request.sha256, request.md5)
                return self.download(job)
            except Retry as retry:
                last = retry.reason
            except Cancelled:
                return None
            except MirrorError as exc:
                return exc
            finally:
                batch.ended(job)
        return UpstreamError(redact(request.url), f"{last} (after {batch.retries + 1} attempts)")

    # -- one download, in the thread ---------------------------------------------------------

    def download(self, job: Job) -> Staged:
        if job.cancelled:
            raise Cancelled()
        url, size = job.url, job.size
        key, resp = self._open(job)
        try:
            status = resp.status
            if status in RETRY_STATUS:
                raise Retry(f"HTTP {status}")
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

    def request(self, job: Job, method: str, limit: int) -> tuple[int, bytes]:
        """``method`` (GET or HEAD) of ``job.url``, redirects followed: the status, and the body
        of a 200 answer to a GET (at most ``limit`` bytes, else UpstreamError). Connection
        failures raise Retry; the caller decides what a status means."""
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
                raise Retry(describe(exc)) from None
            raise
        if resp.will_close or not resp.isclosed():
            self._drop(key)
        if job.cancelled:
            raise Cancelled()
        return resp.status, body

    @staticmethod
    def _read_body(job: Job, resp: Response, limit: int) -> bytes:
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
                    raise Cancelled()
                if resp.length:
                    raise Retry(f"connection closed {resp.length} bytes before the end of the body")
                break
            got += n
        view.release()
        if got > limit:
            raise UpstreamError(redact(job.url), f"larger than {limit} bytes")
        del body[got:]
        return bytes(body)

    def _receive(self, job: Job, resp: Response) -> Staged:
        size, buf = job.size, self.buf
        assert job.batch is not None and job.final is not None and job.hasher is not None  # a fetch's job
        sink = Sink(job.batch.store, job.final, job.hasher, self.dirs)
        try:
            sink.open(direct=size is not None and size >= DIRECT_MIN)
            got = 0
            filled = 0  # direct: bytes received into buf, not written yet
            # A small file's whole body often came with its headers (or an earlier response's).
            body = None if sink.direct else resp.read_received()
            if body is not None:
                sink.write(memoryview(body))
                got = len(body)
            while body is None:
                # With a known size, never ask for more than one byte past it: a longer body is
                # cut off as soon as it shows.
                view = buf[filled:] if sink.direct else buf
                if size is not None:
                    view = view[:size - got + 1]
                try:
                    n = resp.readinto(view)
                except OSError as exc:
                    raise Cancelled() if job.cancelled else Retry(describe(exc)) from None
                if not n:
                    if job.cancelled:
                        raise Cancelled()
                    if resp.length:  # closed before the end of the body: a broken transfer
                        raise Retry(f"connection closed {resp.length} bytes before the end of the body")
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
                    raise Cancelled()
            if size is not None and got != size:
                raise SizeMismatch(redact(job.url), size, got)
            if filled:
                sink.write_direct(buf, filled, last=True)
            return sink.finish(job.url, got)
        except BaseException as exc:
            raise sink.abort(exc)

    def _open(self, job: Job, method: str = "GET") -> tuple[tuple[str, str, int], Response]:
        """GET ``job.url`` (or HEAD it), following redirects; the response to read, and its
        connection's key. Only a package file's GET (from :meth:`run_batch`) sends more ahead."""
        url = job.url
        for hop in range(_MAX_REDIRECTS + 1):
            if method == "GET":
                encoded = self._encoded.pop(url, None) if not hop else None
                key, data = encoded or self._encode(job.url, url)
            else:
                key, target, headers = prepare(job.url, url, self.routes)
                data = encode_request(target, host_header(key), headers, method)
            resp = self._request(job, key, data, pipeline=not hop and job.batch is not None,
                                 head=method == "HEAD")
            if resp.status not in _REDIRECT_STATUS or not (location := resp.getheader("Location")):
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
                key, target, headers = prepare(original, url, self.routes)
                return key, encode_request(target, host_header(key), headers)
            key, target, headers = prepare(original, base + "/", self.routes)  # quote works char by char
            prefix, _, tail = encode_request(target + "\0", host_header(key), headers).partition(b"\0")
            shared = self._bases[base] = (key, prefix, tail)
        elif "?" in name or "#" in name:
            key, target, headers = prepare(original, url, self.routes)
            return key, encode_request(target, host_header(key), headers)
        key, prefix, tail = shared
        return key, b"".join((prefix, quote(name, safe=PATH_SAFE).encode("latin-1"), tail))

    def _request(self, job: Job, key: tuple[str, str, int], data: bytes, *,
                 pipeline: bool, head: bool = False) -> Response:
        """Send the request (unless it was sent ahead on this connection), send more ahead if
        ``pipeline``, and begin reading its response."""
        conn = self.conns.get(key)
        for fresh in ((False, True) if conn is not None else (True,)):
            if job.cancelled:
                raise Cancelled()
            try:
                if fresh:
                    conn = self._connect(key)
                assert conn is not None
                job.sock = conn.sock
                if job.cancelled:  # cancelled while connecting: its socket was not known then
                    raise Cancelled()
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
                large = job.size is not None and job.size > SMALL_FILE
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
                    raise Cancelled() from None
                if fresh or not isinstance(exc, ConnectionError):  # RemoteDisconnected is one
                    raise Retry(describe(exc)) from None
                # A kept-alive connection upstream had closed meanwhile: once more, on a new one.
        raise AssertionError("unreachable")

    def _send_ahead(self, job: Job, key: tuple[str, str, int], conn: Connection) -> None:
        """Send the requests taken ahead that go to ``conn``'s upstream and are not in flight
        yet, taking more from the batch up to the lane's depth. In order: responses come in the
        order requests were sent, and the lane reads them in the order it takes requests."""
        batch = job.batch
        assert batch is not None  # only a fetch's requests are pipelined
        depth = PIPELINE_SMALL if self.first else PIPELINE_LARGE
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

    def _connect(self, key: tuple[str, str, int]) -> Connection:
        conn = Connection(*key, timeout=self.timeout, proxy=self.routes.proxy(*key))
        self.conns[key] = conn
        return conn

    def _drop(self, key: tuple[str, str, int]) -> None:
        conn = self.conns.pop(key, None)
        if conn is not None:
            conn.close()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        if isinstance(result, Staged):
            result.discard()  # its download was cancelled: nobody will publish it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
