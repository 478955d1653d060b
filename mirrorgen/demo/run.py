"""``mirrorgen demo``: with no network and no configuration, build a small upstream channel of real
packages, mirror it with a license filter through the ordinary ``sync`` path, and serve the tree
over HTTP, printing how to point clients at it."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from ..config import load_config
from ..store import STATE_DIR, Store
from ..sync import sync_mirror
from .packages import demo_specs, write_channel

__all__ = ["run_demo"]

_CONFIG = """\
# Written by `mirrorgen demo`. Run it again with: mirrorgen sync -c {config}
root: {root}
mirrors:
  - name: conda-demo
    type: conda
    mode: active
    source: {upstream}
    subdirs: [linux-64, noarch]
    filters:
      licenses: ["-gpl3"]          # drop GPL-3 packages ...
      include: ["demo-readline"]   # ... except this one
      latest: 1                    # newest version of each package only
"""


def run_demo(*, workdir: Path | None, host: str, port: int, serve: bool) -> int:
    workdir = (workdir or Path(tempfile.mkdtemp(prefix="mirrorgen-demo-"))).resolve()
    upstream = workdir / "upstream" / "demo-channel"
    root = workdir / "mirror"
    print(f"mirrorgen demo in {workdir}")
    print(f"  building an upstream conda channel of real packages in {upstream}")
    write_channel(upstream, demo_specs(), zst=True, shards=False)
    config_path = workdir / "mirrorgen.yaml"
    config_path.write_text(_CONFIG.format(config=config_path, root=root, upstream=upstream))
    config = load_config(config_path)
    store = Store(config.root)
    result = asyncio.run(sync_mirror(config, config.mirrors[0], store, progress=False))
    print(f"  mirrored: {result.kept} of {result.upstream} records kept, {result.downloaded} files "
          f"downloaded and verified into {root / 'conda-demo'}")
    print(f"  see what was filtered and why: mirrorgen report -c {config_path}")
    if result.failed:
        return 1
    url = f"http://{host}:{port}/conda-demo"
    print(f"""
Point clients at the mirror:
  pixi:   pixi init demo && cd demo && pixi project channel add {url} && pixi add demo-cli
  conda:  conda create -n demo --override-channels -c {url} demo-cli
  mamba:  mamba create -n demo --override-channels -c {url} demo-cli
  pip and R: PyPI and CRAN mirrors are not built yet; their commands will appear here.
""")
    if not serve:
        return 0
    print(f"Serving {root} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    web.run_app(_static_app(root), host=host, port=port, print=None)
    return 0


def _static_app(root: Path) -> web.Application:
    @web.middleware
    async def hide_state(request: web.Request, handler: Handler) -> web.StreamResponse:
        if f"/{STATE_DIR}" in request.path or "/.mirrorgen-tmp-" in request.path:
            raise web.HTTPNotFound()
        return await handler(request)

    app = web.Application(middlewares=[hide_state])
    app.router.add_static("/", root, show_index=True, follow_symlinks=False)
    return app


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(workdir=None, host="127.0.0.1", port=8000, serve=True))
