"""Getting bytes from upstream: http(s) with retries, or a local directory / file:// URL.

Downloads are verified while they stream: the size is checked as bytes arrive (a file larger than
the index says is cut off at once) and the hash is computed on the fly, so a file is hashed once,
and only a file whose size and hash match reaches its final name.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final
from urllib.parse import unquote, urlsplit

import aiohttp

from .errors import ChecksumMismatch, SizeMismatch, UpstreamError
from .store import Entry, Store
from .urls import is_remote, redact

__all__ = ["Transport", "Verified", "local_path"]

CHUNK: Final = 1 << 18
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

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=max(self.concurrency * 2, 8), ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.timeout),
            headers={"User-Agent": "mirrorgen/0.1"},
            auto_decompress=False,  # we want upstream's bytes, exactly, to hash them
        )
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

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
        """Fetch ``url`` into ``final`` (atomically), checking size and hash before publishing."""
        path = local_path(url)
        last = "no attempt"
        async for _ in self._attempts(url):
            try:
                if path is not None:
                    return await asyncio.to_thread(self._copy_local, url, path, final, store, size,
                                                   sha256, md5, verify)
                return await self._download_http(url, final, store, size, sha256, md5, verify)
            except _Retry as retry:
                last = retry.reason
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = _describe(exc)
        raise UpstreamError(redact(url), f"{last} (after {self.retries + 1} attempts)")

    async def _download_http(self, url: str, final: Path, store: Store, size: int | None,
                             sha256: str | None, md5: str | None, verify: bool) -> Verified:
        hasher = _Hasher(sha256, md5, verify)
        async with self.session.get(url) as resp:
            if resp.status in _RETRY_STATUS:
                raise _Retry(f"HTTP {resp.status}")
            if resp.status != 200:
                raise UpstreamError(redact(url), f"HTTP {resp.status}")
            with store.temp_file(final) as (tmp, fh):
                got = 0
                async for chunk in resp.content.iter_chunked(CHUNK):
                    got += len(chunk)
                    if size is not None and got > size:
                        raise SizeMismatch(redact(url), size, got)
                    hasher.update(chunk)
                    # A plain write: the page cache takes a 256 KiB chunk in microseconds, far less
                    # than a thread hop (aiofiles) would cost per chunk; the fsync goes to a thread.
                    fh.write(chunk)
                if size is not None and got != size:
                    raise SizeMismatch(redact(url), size, got)
                digests = hasher.check(redact(url))
                await asyncio.to_thread(store.commit, tmp, fh, final)
        st = final.stat()
        return Verified(Entry(st.st_size, digests[0], digests[1], st.st_mtime_ns), got)

    @staticmethod
    def _copy_local(url: str, path: Path, final: Path, store: Store, size: int | None,
                    sha256: str | None, md5: str | None, verify: bool) -> Verified:
        hasher = _Hasher(sha256, md5, verify)
        try:
            src = open(path, "rb")
        except FileNotFoundError:
            raise UpstreamError(redact(url), "no such file") from None
        except OSError as exc:
            raise UpstreamError(redact(url), str(exc)) from None
        with src, store.temp_file(final) as (tmp, fh):
            got = 0
            while chunk := src.read(CHUNK):
                got += len(chunk)
                if size is not None and got > size:
                    raise SizeMismatch(redact(url), size, got)
                hasher.update(chunk)
                fh.write(chunk)
            if size is not None and got != size:
                raise SizeMismatch(redact(url), size, got)
            digests = hasher.check(redact(url))
            store.commit(tmp, fh, final)
        st = os.stat(final)
        return Verified(Entry(st.st_size, digests[0], digests[1], st.st_mtime_ns), got)


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
