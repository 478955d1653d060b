"""URL handling shared by sources and downloads: joining, and keeping tokens out of logs."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

__all__ = ["redact", "join_url", "is_remote", "local_path", "basic_credentials"]

# anaconda.org / Anaconda Platform put the access token in the path: .../t/<TOKEN>/...
_TOKEN_RE: Final = re.compile(r"/t/[^/]+(?=/|$)")
_USERINFO_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redact(url: str) -> str:
    """The URL with its path token and any user:password replaced, safe for logs, state and reports."""
    url = _TOKEN_RE.sub("/t/<TOKEN>", url)
    try:
        parts = urlsplit(url)
        if parts.password or parts.username:
            host = parts.hostname or ""
            if parts.port:
                host += f":{parts.port}"
            url = urlunsplit((parts.scheme, f"<CREDENTIALS>@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:  # not a URL urllib can split (a bad port, an unclosed "["): any user info goes
        url = _USERINFO_RE.sub(r"\1<CREDENTIALS>@", url)
    return url


def basic_credentials(parts: SplitResult) -> str | None:
    """The ``Basic`` credentials (RFC 7617) of a URL's ``user:password``, or None without any."""
    if parts.username is None and parts.password is None:
        return None
    user = unquote(parts.username or "") + ":" + unquote(parts.password or "")
    return "Basic " + base64.b64encode(user.encode()).decode()


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a base URL or directory path with exactly one '/' between them."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def local_path(source: str) -> Path | None:
    """The filesystem path of a file:// URL or a plain path; None for http(s)."""
    if is_remote(source):
        return None
    if source.startswith("file://"):
        return Path(unquote(urlsplit(source).path))  # config allows only file:/// and file://localhost/
    return Path(source)
