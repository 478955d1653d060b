"""HTTP/1.1 on a kept-alive socket, for the download threads (mirrorgen.lanes): requests written
by hand, responses parsed by httptools, bodies of known length received straight into the
caller's buffer. Requests may be pipelined (RFC 9112 section 9.3)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
from collections import deque
from typing import Final
from urllib.parse import quote, urlsplit

import httptools

from .errors import UpstreamError
from .httpproxy import Proxy, Routes, open_tunnel
from .urls import basic_credentials, redact

__all__ = ["Connection", "Response", "BadResponse", "NoResponse", "prepare", "host_header",
           "encode_request", "ssl_context", "describe", "CHUNK", "PATH_SAFE"]

# What a connection receives at once into its buffer while a response's headers are incomplete.
CHUNK: Final = 1 << 18
_CONNECT_TIMEOUT: Final = 30.0
_USER_AGENT: Final = "mirrorgen/0.1"

# Characters left as they are in a request path (RFC 3986 pchar and "/"; "%" keeps escapes).
PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE: Final = PATH_SAFE + "?"


class BadResponse(OSError):
    """Upstream sent something that is not an HTTP/1.1 response we can read."""


class NoResponse(ConnectionError):
    """The connection closed before a response began (a kept-alive one upstream had closed)."""


# An upstream that sends more header bytes than this is not a package server.
_MAX_HEADER_BYTES: Final = 64 << 10


class Connection:
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
        # Through ``proxy``: http requests name the whole URL (see prepare); https goes through
        # a tunnel, opened here, with TLS to the upstream itself inside it.
        try:
            sock = socket.create_connection(proxy.address if proxy else (host, port), timeout=_CONNECT_TIMEOUT)
        except OSError as exc:
            if proxy is None:
                raise
            raise ConnectionError(f"proxy {proxy.url}: {describe(exc)}") from None  # retried as it was
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy is not None:
                    open_tunnel(sock, proxy, host, port, _USER_AGENT)
                sock = ssl_context().wrap_socket(sock, server_hostname=host)
            # Then as aiohttp's sock_read: per read, not per file. Set as socket options on a
            # blocking socket, not with settimeout: with a timeout, Python polls before every
            # send and receive, a second system call (and GIL round trip) each time. A read
            # that times out then fails with EAGAIN (see describe).
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

    def response(self, request: bytes, *, head: bool = False, read: int = CHUNK) -> Response:
        """The response to ``request``, which must be the oldest one in flight (``head``: a
        HEAD request, whose response has no body whatever its headers say; ``read``: how many
        bytes to receive at most per read while its headers are incomplete)."""
        if not self.inflight or self.inflight[0] is not request:
            raise AssertionError("responses are read in the order their requests were sent")
        self.inflight.popleft()
        response = Response(self)
        response.begin(no_body=head, read=read)
        self.answered += 1
        return response

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Overrun(Exception):
    """The parser met the beginning of the next response (chunked or close-delimited body)."""


class Response:
    """A response being read from a :class:`Connection`, with the parts of http.client's
    HTTPResponse the download thread uses: ``status``, ``length`` (body bytes still to come, or
    None), ``will_close``, ``getheader``, ``readinto``, ``read``, ``isclosed``; and
    ``content_length``, the whole body's.

    Bytes past this response's end (pipelined responses after it) are left in ``conn.pending``:
    the parser is fed the header block alone, and a body of known length is taken by count. A
    chunked or close-delimited body goes through the parser, which cannot stop at its end, so
    after one of those the connection is not reused when more responses are on their way."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # The parser refers back to this response: a cycle, which begin() breaks once the
        # parser is done with (a body of known length), so that each response is freed as soon
        # as it is read, not left to the garbage collector (9,000 small files in one download
        # thread: 45 young-generation collections instead of 129).
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
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
        assert self.parser is not None
        self._keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._held += body

    def on_message_complete(self) -> None:
        self._complete = True

    def _parse(self, data: bytes | bytearray | memoryview) -> None:
        assert self.parser is not None  # dropped only once no more is parsed (begin)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Overrun) or not self._complete:
                raise BadResponse(f"bad response from upstream: {exc}") from None
            # The next response began in the same packet: this one is whole, the rest is lost
            # to the parser, so the connection goes after this response.
            self.will_close = True
        except httptools.HttpParserError as exc:
            raise BadResponse(f"bad response from upstream: {exc}") from None

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
            end = header_end(pending, start)
            if end >= 0:
                break
            if len(pending) > _MAX_HEADER_BYTES:
                raise BadResponse(f"response headers longer than {_MAX_HEADER_BYTES} bytes")
            start = max(0, len(pending) - 3)
            if not self._recv(read):
                if pending:
                    raise BadResponse("connection closed in the middle of the response headers")
                raise NoResponse("remote end closed connection without response")
        if end > _MAX_HEADER_BYTES:
            raise BadResponse(f"response headers longer than {_MAX_HEADER_BYTES} bytes")
        head = pending[:end]
        del pending[:end]
        self._parse(head)
        if not self._headers_done:
            raise BadResponse("bad response from upstream: incomplete header block")
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.will_close = not self._keep_alive
        if no_body:  # a HEAD's answer, RFC 9110 section 9.3.2: none, whatever Content-Length says
            with contextlib.suppress(ValueError):
                self.content_length = int(self.headers.get(b"content-length", b""))
            self.length = 0
            self._direct = True
            self.parser = None
            return
        chunked = self._chunked = b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()
        if not chunked and b"content-length" in self.headers:
            try:
                total = int(self.headers[b"content-length"])
            except ValueError:
                raise BadResponse("bad Content-Length from upstream") from None
            if total < 0:
                raise BadResponse("bad Content-Length from upstream")
            self.content_length = self.length = total
            self._direct = True
            self.parser = None
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
                    raise BadResponse("connection closed in the middle of a chunked body")
                self._complete = True  # a body without a length ends with its connection
                break
            self._parse(memoryview(conn.buf)[:n])
        return self.readinto(view) if self._held else 0

    def read_received(self) -> bytearray | None:
        """The rest of a body of known length if all of it is received already (small pipelined
        responses come many to a packet), else None (and nothing is taken)."""
        pending, n = self.conn.pending, self.length
        if not self._direct or not n or len(pending) < n:
            return None
        body = pending[:n]
        del pending[:n]
        self.length = 0
        return body

    def read(self, limit: int) -> bytes:
        out = bytearray()
        view = memoryview(bytearray(min(limit, CHUNK)))
        while len(out) < limit and (n := self.readinto(view[:limit - len(out)])):
            out += view[:n]
        return bytes(out)


def header_end(data: bytearray, start: int) -> int:
    """Where the header block in ``data`` ends (just past its empty line), or -1. A bare LF
    ends a line too (RFC 9112 section 2.2 lets a recipient accept it; llhttp does)."""
    crlf = data.find(b"\r\n\r\n", start)
    # A bare "\n\n" ends the block only if it comes first: look no further than that (a body
    # received with its headers is not scanned, which cost a pass over every first read).
    lf = data.find(b"\n\n", start, len(data) if crlf < 0 else crlf + 3)
    if lf >= 0:
        return lf + 2
    return crlf + 4 if crlf >= 0 else -1


def prepare(original: str, url: str, routes: Routes) -> tuple[tuple[str, str, int], str, dict[str, str]]:
    """A GET of ``url`` (``original``: the URL asked for, before redirects): the connection's
    key (scheme, host, port), the request target, and the headers. Through a proxy (plain http
    only: https tunnels), the target is the whole URL and the proxy's credentials go with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(redact(original), f"cannot fetch {redact(url)}")
    key = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
    target = quote(parts.path or "/", safe=PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if (credentials := basic_credentials(parts)) is not None:
        headers["Authorization"] = credentials
    if scheme == "http" and routes and (proxy := routes.proxy(*key)) is not None:
        target = f"http://{host_header(key)}{target}"
        if proxy.authorization is not None:
            headers["Proxy-Authorization"] = proxy.authorization
    return key, target, headers


def host_header(key: tuple[str, str, int]) -> str:
    scheme, host, port = key
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


def encode_request(target: str, host: str, headers: dict[str, str], method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


@functools.lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """The system's trust store and defaults (what aiohttp verifies against too); made once, on
    the first https download, shared by every thread."""
    return ssl.create_default_context()


def describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, socket.timeout, BlockingIOError,
                        ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
