"""A forward HTTP proxy on loopback, as a mirror host behind a corporate firewall talks to one.

Plain-http requests arrive in absolute form (``GET http://host:port/path HTTP/1.1``) and go on
to the origin in origin form, kept alive, pipelined requests in order, the responses passed back
byte for byte. ``CONNECT host:port`` opens a tunnel (what https goes through). With
``credentials`` set, a request without the matching ``Proxy-Authorization`` is answered 407, as
squid does; the header never goes on to the origin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["ForwardProxy", "run_forward_proxy"]


@dataclass
class ForwardProxy:
    credentials: str | None = None          # "user:password" the proxy demands
    connect_status: int | None = None       # answer every CONNECT with this instead of a tunnel
    port: int = 0
    # "GET http://127.0.0.1:PORT/demo/...", "CONNECT 127.0.0.1:PORT", in arrival order
    log: list[str] = field(default_factory=list)
    refused: int = 0                        # requests answered 407
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        auth = f"{self.credentials}@" if self.credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def count(self, method: str) -> int:
        return sum(1 for line in self.log if line.startswith(method + " "))

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
        return headers.get("proxy-authorization") == expected

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin: tuple[asyncio.StreamWriter, asyncio.Task[None]] | None = None
        target_origin: tuple[str, int] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                self.log.append(f"{method} {target}")
                if not self._authorized(headers):
                    self.refused += 1
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                 b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    await writer.drain()
                    return
                if method == "CONNECT":
                    await self._tunnel(target, reader, writer)
                    return
                parts = urlsplit(target)
                assert parts.scheme == "http" and parts.hostname, f"not absolute-form: {target}"
                where = (parts.hostname, parts.port or 80)
                if origin is None:
                    target_origin = where
                    up_reader, up_writer = await asyncio.open_connection(*where)
                    origin = (up_writer, asyncio.create_task(_pipe(up_reader, writer)))
                assert where == target_origin, "one origin per client connection in this proxy"
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                kept = [line for line in lines[1:] if line and
                        not line.lower().startswith(("proxy-authorization:", "proxy-connection:"))]
                origin[0].write("\r\n".join([f"{method} {path} HTTP/1.1", *kept, "", ""]).encode("latin-1"))
                await origin[0].drain()
        finally:
            if origin is not None:  # the client is gone: so is whatever it had not read
                origin[1].cancel()
                origin[0].close()
            writer.close()

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connect_status is not None:
            writer.write(f"HTTP/1.1 {self.connect_status} Refused\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            return
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.asynccontextmanager
async def run_forward_proxy(proxy: ForwardProxy) -> AsyncIterator[ForwardProxy]:
    """``proxy`` listening on 127.0.0.1 (a free port, set on it) for the body of the block."""
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for task in list(proxy._tasks):
            task.cancel()
        await asyncio.gather(*proxy._tasks, return_exceptions=True)
        await server.wait_closed()
