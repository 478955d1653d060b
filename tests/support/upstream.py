"""A fake upstream conda channel: an aiohttp app serving files from a directory.

Use it with pytest-aiohttp::

    control = UpstreamControl()
    server = await aiohttp_server(make_upstream_app(channel_parent, control))
    url = str(server.make_url("/demo"))

The test keeps a reference to ``control`` (also reachable as
``app[UPSTREAM_CONTROL]``) and flips its fields to inject faults between
requests; the handler reads them on every request, so changes take effect
immediately.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from aiohttp import web

__all__ = [
    "UPSTREAM_CONTROL",
    "UPSTREAM_ROOT",
    "UpstreamControl",
    "make_upstream_app",
]


@dataclass
class UpstreamControl:
    """Mutable fault-injection knobs; paths are relative, without leading ``/``.

    With ``token`` set, paths are still given relative to the channel root
    (``demo/noarch/repodata.json``), not including the ``t/<token>/`` prefix.
    """

    # path -> how many more times to answer 500 before serving it normally
    fail_first: dict[str, int] = field(default_factory=dict)
    # paths served with every byte inverted (same length, so only a checksum
    # catches it, never a Content-Length mismatch)
    corrupt: set[str] = field(default_factory=set)
    # paths answered with 404 as if they did not exist upstream
    hide: set[str] = field(default_factory=set)
    # when set, only /t/<token>/... is served; anything else is 403
    token: str | None = None
    # "GET /demo/noarch/repodata.json" for every request, in arrival order,
    # including the ones answered with an error
    requests: list[str] = field(default_factory=list)
    # the client's (host, port) for each of those requests: one port per connection
    peers: list[object] = field(default_factory=list)
    # seconds to sleep before every response (to exercise timeouts/concurrency)
    delay: float = 0.0
    # the answer for a path that does not exist: 404, or 403 as S3 gives without list permission
    missing_status: int = 404
    # requests that carried a Proxy-Authorization header (a proxy's credentials, never ours to see)
    proxy_authorizations: int = 0

    def count(self, path: str, method: str = "GET") -> int:
        """How many ``method`` requests reached ``path`` (relative, no token)."""
        wanted = {f"{method} /{path}"}
        if self.token is not None:
            wanted.add(f"{method} /t/{self.token}/{path}")
        return sum(1 for line in self.requests if line in wanted)


UPSTREAM_CONTROL = web.AppKey("upstream_control", UpstreamControl)
UPSTREAM_ROOT = web.AppKey("upstream_root", Path)


def _relative_path(request: web.Request, control: UpstreamControl) -> str | None:
    """The served path relative to the root, or None when the token is wrong.

    Raises 403/404 for paths that are forbidden or malformed.
    """
    # yarl normalises dot segments out of request.path, so a traversal attempt
    # is only visible in the raw path; check that, percent-decoded.
    raw = unquote(request.raw_path.split("?", 1)[0])
    if any(part in ("..", ".") for part in raw.split("/")) or "\\" in raw:
        raise web.HTTPForbidden(text="path traversal rejected\n")
    parts = PurePosixPath(request.path).parts[1:]
    if control.token is not None:
        if len(parts) < 2 or parts[0] != "t" or parts[1] != control.token:
            return None
        parts = parts[2:]
    return "/".join(parts)


async def _serve(request: web.Request) -> web.StreamResponse:
    control = request.app[UPSTREAM_CONTROL]
    root = request.app[UPSTREAM_ROOT]
    # raw_path keeps what the client actually sent (with token, undecoded).
    control.requests.append(f"{request.method} {request.raw_path}")
    control.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
    if "Proxy-Authorization" in request.headers:
        control.proxy_authorizations += 1
    if control.delay > 0:
        await asyncio.sleep(control.delay)

    rel = _relative_path(request, control)
    if rel is None:
        raise web.HTTPForbidden(text="missing or wrong token\n")
    remaining = control.fail_first.get(rel, 0)
    if remaining > 0:
        control.fail_first[rel] = remaining - 1
        raise web.HTTPInternalServerError(text="injected failure\n")
    if rel in control.hide:
        raise web.HTTPNotFound()

    target = root.joinpath(*rel.split("/")) if rel else root
    # Second line of defence against traversal (e.g. via symlinks).
    try:
        target.resolve().relative_to(root.resolve())
    except ValueError:
        raise web.HTTPForbidden(text="outside root\n") from None
    if not target.is_file():
        return web.Response(status=control.missing_status)

    body = target.read_bytes()
    if rel in control.corrupt:
        body = bytes(b ^ 0xFF for b in body)
    headers = {"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
    if request.method == "HEAD":
        # aiohttp would otherwise replace our Content-Length with 0.
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        return response
    return web.Response(body=body, headers=headers)


def make_upstream_app(root: Path, control: UpstreamControl) -> web.Application:
    """An app serving ``root`` for GET and HEAD, with faults from ``control``."""
    app = web.Application()
    app[UPSTREAM_ROOT] = root
    app[UPSTREAM_CONTROL] = control
    # add_get registers HEAD as well (allow_head=True by default).
    app.router.add_get("/{tail:.*}", _serve)
    return app
