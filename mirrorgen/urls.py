"""URL handling shared by sources and downloads: joining, and keeping tokens out of logs."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact", "join_url", "is_remote"]

# anaconda.org / Anaconda Platform put the access token in the path: .../t/<TOKEN>/...
_TOKEN_RE: Final = re.compile(r"/t/[^/]+(?=/|$)")


def redact(url: str) -> str:
    """The URL with its path token and any user:password replaced, safe for logs, state and reports."""
    url = _TOKEN_RE.sub("/t/<TOKEN>", url)
    parts = urlsplit(url)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        url = urlunsplit((parts.scheme, f"<CREDENTIALS>@{host}", parts.path, parts.query, parts.fragment))
    return url


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a base URL or directory path with exactly one '/' between them."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://"))
