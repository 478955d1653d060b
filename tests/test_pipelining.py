"""Pipelined downloads: small files are requested ahead on one connection and answered in order.

The upstream here is a raw HTTP/1.1 server on loopback (asyncio streams, not aiohttp), so that a
test can see what the client really sent on each connection (how many requests were waiting
before the first response went out) and can misbehave the way real servers do: close a
connection after a number of responses (nginx's keepalive_requests), announced or not; keep no
connection alive at all; send chunked bodies; answer 503 once; cut a body short.

Whatever the upstream does, every file must arrive whole and verified, and requests lost with a
closed connection must be sent again without being counted as failed attempts (``retries=0``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mirrorgen.store import Store
from mirrorgen.tempfiles import TEMP_PREFIX, unnamed_temps
from mirrorgen.http1 import header_end
from mirrorgen.transport import FetchRequest, Staged, Transport

FILES = {f"/c/pkg-{i}-1.0-0.conda": hashlib.sha256(str(i).encode()).digest() * (20 + i % 50) for i in range(120)}
# Larger than a small file (mirrorgen.batch.SMALL_FILE): fetched by every thread, the first
# read of each response limited to its headers' likely size.
LARGE = {f"/c/big-{i}-1.0-0.conda": hashlib.sha256(str(i).encode()).digest() * (3000 + 3000 * i)
         for i in range(4)}


@dataclass
class Upstream:
    url: str
    close_after: int = 0          # close each connection after this many responses (0: never)
    announce_close: bool = True   # ... saying so in the last response (Connection: close)
    no_keepalive: bool = False    # every response closes its connection
    chunked: bool = False
    pad_headers: int = 0          # bytes of extra header sent with every response
    fail_once: set[str] = field(default_factory=set)   # paths answered 503 the first time
    cut_once: set[str] = field(default_factory=set)    # paths whose body is cut the first time
    connections: int = 0
    served: list[str] = field(default_factory=list)
    # for each connection, the most requests ever received and not yet answered
    most_waiting: list[int] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        index = len(up.most_waiting)
        up.most_waiting.append(0)
        buffered = b""
        answered = 0
        held: list[bytes] = []

        def send(data: bytes) -> None:
            # Chunked responses to requests already here go out in one write: the client then
            # finds the next response's bytes right after a chunked body.
            held.append(data)
            if not (up.chunked and b"\r\n\r\n" in buffered):
                writer.write(b"".join(held))
                held.clear()
        try:
            while True:
                # Whatever has arrived by now counts as waiting (a pipelining client sends ahead).
                try:
                    buffered += await asyncio.wait_for(reader.read(65536), 0.05) if not buffered else b""
                except asyncio.TimeoutError:
                    continue
                if not buffered:
                    return
                await asyncio.sleep(0.001)  # let requests sent ahead arrive
                with_more = reader._buffer  # type: ignore[attr-defined]  # what the stream holds
                waiting = (buffered + bytes(with_more)).count(b"\r\n\r\n")
                up.most_waiting[index] = max(up.most_waiting[index], waiting)
                while b"\r\n\r\n" not in buffered:
                    more = await reader.read(65536)
                    if not more:
                        return
                    buffered += more
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                up.served.append(path)
                answered += 1
                last = up.no_keepalive or (up.close_after and answered == up.close_after)
                headers = ["HTTP/1.1 200 OK"]
                if last and (up.announce_close or up.no_keepalive):
                    headers.append("Connection: close")
                if up.pad_headers:
                    headers.append("X-Pad: " + "p" * up.pad_headers)
                body = FILES.get(path, LARGE.get(path))
                if body is None:
                    send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                elif path in up.fail_once:
                    up.fail_once.discard(path)
                    send(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
                elif path in up.cut_once:
                    up.cut_once.discard(path)
                    headers.append(f"Content-Length: {len(body)}")
                    send(("\r\n".join(headers) + "\r\n\r\n").encode() + body[:len(body) // 2])
                    await writer.drain()
                    return
                elif up.chunked:
                    headers.append("Transfer-Encoding: chunked")
                    half = len(body) // 2
                    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
                    send(("\r\n".join(headers) + "\r\n\r\n").encode() + chunks + b"0\r\n\r\n")
                else:
                    headers.append(f"Content-Length: {len(body)}")
                    send(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
                await writer.drain()
                if last:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if held:
                writer.write(b"".join(held))
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    up.url = f"http://127.0.0.1:{port}"
    async with server:
        yield up
        server.close()


async def fetch_all(up: Upstream, tmp_path: Path, *, retries: int = 0, concurrency: int = 4,
                    files: dict[str, bytes] = FILES) -> dict[str, object]:
    store = Store(tmp_path / "root")
    requests = [FetchRequest(path, up.url + path, tmp_path / "root" / "m" / path.rsplit("/", 1)[1],
                             len(body), hashlib.sha256(body).hexdigest(), None)
                for path, body in files.items()]
    async with Transport(retries=retries, backoff=0.01, concurrency=concurrency) as transport:
        outcomes = {request.key: outcome async for request, outcome in transport.fetch_many(requests, store)}
    assert set(outcomes) == set(files)
    for path, outcome in outcomes.items():
        assert isinstance(outcome, Staged), f"{path}: {outcome}"
        assert outcome.tmp is not None and outcome.tmp.read_bytes() == files[path], path
        assert outcome.entry.sha256 == hashlib.sha256(files[path]).hexdigest()
        outcome.discard()
    assert not list((tmp_path / "root").rglob(f"{TEMP_PREFIX}*")) and unnamed_temps() == 0
    return outcomes


async def test_small_files_are_requested_ahead_on_one_connection(upstream: Upstream, tmp_path: Path) -> None:
    await fetch_all(upstream, tmp_path)
    assert upstream.connections == 1  # small files all go to one thread
    assert max(upstream.most_waiting) > 1  # requests were waiting before responses went out
    assert sorted(upstream.served) == sorted(FILES)  # each asked for once


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
async def test_requests_lost_with_a_closed_connection_are_sent_again_not_failed(
        upstream: Upstream, tmp_path: Path, announce: bool) -> None:
    upstream.close_after, upstream.announce_close = 7, announce
    await fetch_all(upstream, tmp_path, retries=0)
    assert upstream.connections >= len(FILES) // 7
    assert set(upstream.served) == set(FILES)


async def test_an_upstream_that_keeps_no_connection_alive_gets_one_request_per_connection(
        upstream: Upstream, tmp_path: Path) -> None:
    upstream.no_keepalive = True
    await fetch_all(upstream, tmp_path, retries=0)
    # After the first connection showed it, nothing more is sent ahead.
    assert max(upstream.most_waiting[1:]) == 1
    assert set(upstream.served) == set(FILES)


async def test_chunked_bodies_among_requests_sent_ahead(upstream: Upstream, tmp_path: Path) -> None:
    upstream.chunked = True
    await fetch_all(upstream, tmp_path, retries=0)
    assert set(upstream.served) == set(FILES)


async def test_a_503_and_a_cut_body_among_requests_sent_ahead_are_retried(upstream: Upstream, tmp_path: Path) -> None:
    paths = sorted(FILES)
    upstream.fail_once = {paths[10], paths[50]}
    upstream.cut_once = {paths[30]}
    await fetch_all(upstream, tmp_path, retries=1)
    for path in (paths[10], paths[30], paths[50]):
        assert upstream.served.count(path) >= 2
    assert max(upstream.most_waiting) > 1


@pytest.mark.parametrize("pad", [0, 40_000], ids=["short-headers", "headers-over-several-reads"])
async def test_large_and_small_files_arrive_whole_whatever_the_length_of_their_headers(
        upstream: Upstream, tmp_path: Path, pad: int) -> None:
    upstream.pad_headers = pad
    files = {**LARGE, **dict(list(FILES.items())[:40])}
    await fetch_all(upstream, tmp_path, retries=0, files=files)
    assert sorted(upstream.served) == sorted(files)


@pytest.mark.parametrize("url", [
    "http://u:p@h:81/a b/c%20d/x y.conda", "http://h/x", "https://h/d/e/f-1.0.tar.bz2",
    "http://h/d/e/f?x=1/2", "http://[::1]:80/a/b", "http://h"])
@pytest.mark.parametrize("proxy", [None, "http://pu:pp@proxy:3128"])
def test_requests_built_per_directory_are_the_requests_built_from_the_whole_url(
        url: str, proxy: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mirrorgen.httpproxy import Routes
    from mirrorgen.http1 import encode_request, host_header, prepare
    from mirrorgen.lanes import Lane

    if proxy is not None:
        monkeypatch.setenv("http_proxy", proxy)
    lane = Lane.__new__(Lane)  # no thread: only its request cache
    lane._bases, lane.routes = {}, Routes()
    key, target, headers = prepare(url, url, lane.routes)
    want = (key, encode_request(target, host_header(key), headers))
    assert lane._encode(url, url) == want
    assert lane._encode(url, url) == want  # from the cache the second time
    # Through a proxy, plain http names the whole URL and carries the proxy's credentials.
    forward = proxy is not None and url.startswith("http:")
    assert target.startswith("http://") is forward
    assert ("Proxy-Authorization" in headers) is forward


@pytest.mark.parametrize(("data", "end"), [
    (b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody\n\nmore", 25),     # "\n\n" in the body: not the end
    (b"HTTP/1.1 200 OK\nA: b\n\nbody\r\n\r\n", 22),             # bare LF, CRLFs in the body
    (b"HTTP/1.1 200 OK\r\nA: b\n\nbody\r\n\r\n", 23),          # a bare LF ends a CRLF block
    (b"HTTP/1.1 200 OK\r\nA: b\r\n\nbody", 24),                 # CRLF then LF
    (b"HTTP/1.1 200 OK\r\nA: b\r\n", -1),                        # not yet complete
])
def test_the_header_block_ends_at_its_first_empty_line(data: bytes, end: int) -> None:
    assert header_end(bytearray(data), 0) == end
