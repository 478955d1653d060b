"""The HTTP proxy between mirrorgen and its upstreams, for a mirror host that reaches the internet
only through one: the environment variables curl, pip and conda read, ``http_proxy`` and
``https_proxy`` (or upper case; ``all_proxy`` for both), and ``no_proxy`` for the hosts reached
directly. Read once, when a run starts, by the standard library
(:func:`urllib.request.getproxies_environment`: lower case first, and ``HTTP_PROXY`` ignored
under CGI). ``no_proxy`` is matched as curl does (:func:`_bypassed`).

A plain-http upstream is asked through the proxy (the request names the whole URL, RFC 9112
section 3.2.2); an https one through a tunnel the proxy opens (CONNECT, RFC 9110 section 9.3.6),
with TLS to the upstream itself inside it, so the proxy sees neither the files nor the
credentials in the upstream URL. The proxy's own credentials, from its URL
(``http://user:password@proxy:3128``), go to the proxy only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from .errors import UsageError
from .urls import basic_credentials, redact

__all__ = ["Proxy", "ProxyRefused", "Routes", "TunnelRefused", "open_tunnel"]

_MAX_ANSWER: Final = 64 << 10  # a proxy's answer to CONNECT: a status line and a few headers


class Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization header, from the proxy URL's user:password
    url: str                   # as configured, credentials redacted: for messages

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class Routes:
    """Which upstreams go through a proxy, by scheme and host (see the module docstring)."""

    def __init__(self) -> None:
        found: dict[str, str] = {}
        # urllib.request costs 7 ms of imports (http.client, email) that every run would pay;
        # without a *_proxy variable there is nothing for it to read.
        if any(name[-6:].lower() == "_proxy" for name in os.environ):
            import urllib.request
            found = urllib.request.getproxies_environment()
        self._no_proxy = [p.strip().lower() for p in found.get("no", "").split(",") if p.strip()]
        self._proxies: dict[str, Proxy] = {}
        for scheme in ("http", "https"):
            value = found.get(scheme) or found.get("all")
            if value:
                self._proxies[scheme] = _parse(value, f"{scheme}_proxy" if scheme in found else "all_proxy")
        self._cache: dict[tuple[str, str, int], Proxy | None] = {}

    def __bool__(self) -> bool:
        return bool(self._proxies)

    def proxy(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for an upstream, or None to connect to it directly."""
        key = (scheme, host, port)
        if key not in self._cache:
            proxy = self._proxies.get(scheme)
            if proxy is not None and _bypassed(host, port, self._no_proxy):
                proxy = None
            self._cache[key] = proxy
        return self._cache[key]


def _bypassed(host: str, port: int, patterns: list[str]) -> bool:
    """Whether ``no_proxy``'s ``patterns`` name the host, as curl reads them: ``*`` for every host;
    a name for itself and the names under it (``example.com`` and ``.example.com`` both match
    ``repo.example.com``); an IP address, or a network in CIDR notation; any with ``:port`` for
    that port only. Names compare without case, and without a trailing dot."""
    name = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for pattern in patterns:
        if pattern == "*":
            return True
        want_port = None
        if pattern.startswith("["):  # [v6]:port
            inner, _, tail = pattern[1:].partition("]")
            pattern, want_port = inner, tail[1:] if tail.startswith(":") else None
        elif pattern.count(":") == 1:
            pattern, want_port = pattern.split(":")
        if want_port is not None and want_port != str(port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(pattern, strict=False):
                    return True
            except ValueError:
                pass
            continue
        pattern = pattern.lstrip(".").rstrip(".")
        if pattern and (name == pattern or name.endswith("." + pattern)):
            return True
    return False


def _parse(value: str, variable: str) -> Proxy:
    """A proxy URL as the variables hold it: ``http://[user:password@]host[:port]``, or without
    the scheme. Only http proxies: a proxy spoken to over TLS, or SOCKS, is refused by name."""
    text = value.strip()
    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"{variable}: not a proxy URL (its port is not a number from 0 to 65535)") from None
    shown = redact(url)
    if parts.scheme.lower() != "http":
        raise UsageError(f"{variable}={shown}: only http:// proxies are supported, not {parts.scheme}://")
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"{variable}={shown}: not a proxy URL (expected http://host:port)")
    return Proxy(parts.hostname, port or 80, basic_credentials(parts), shown)


class TunnelRefused(ConnectionError):
    """The proxy answered CONNECT with a status worth another try (5xx, 408, 429)."""


class ProxyRefused(Exception):
    """The proxy will not open the tunnel, and asking again will not change that (407, 403):
    not an OSError, so that no retry loop takes it for a lost connection."""


def open_tunnel(sock: socket.socket, proxy: Proxy, host: str, port: int, user_agent: str) -> None:
    """Ask ``proxy``, connected on ``sock``, for a tunnel to ``host:port``: returns when it is
    open. A refusal raises ProxyRefused, or TunnelRefused where a retry may help; each names the
    proxy."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {user_agent}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    answer = bytearray()
    # The proxy says nothing more until TLS begins, so no byte of the tunnel is read here.
    while b"\r\n\r\n" not in answer:
        if len(answer) > _MAX_ANSWER:
            raise ProxyRefused(f"proxy {proxy.url}: CONNECT {authority}: answer larger than {_MAX_ANSWER} bytes")
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError(f"proxy {proxy.url} closed the connection (CONNECT {authority})")
        answer += chunk
    head, _, rest = bytes(answer).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise ProxyRefused(f"proxy {proxy.url}: CONNECT {authority}: not an HTTP answer: {status_line[:80]!r}")
    status = int(fields[1])
    if 200 <= status < 300:
        if rest:  # TLS has not begun: nothing may follow the answer
            raise ProxyRefused(f"proxy {proxy.url}: CONNECT {authority}: bytes after the proxy's answer")
        return
    reason = f"proxy {proxy.url}: CONNECT {authority}: HTTP {status_line[len(fields[0]) + 1:][:80]}"
    if status in (408, 429) or 500 <= status < 600:
        raise TunnelRefused(reason)
    raise ProxyRefused(reason)
