"""Real conda client operations against a served channel, with py-rattler 0.28.

py-rattler's ``solve``/``install``/``index_fs`` are coroutines.  This module
offers both flavours:

* ``solve_async`` / ``solve_and_install_async`` -- coroutines, **must be
  awaited**.  Use these in async tests whose server (``aiohttp_server``, the
  mirror under test) runs on the test's own event loop: a blocking call would
  freeze that loop and the client would wait forever for its own server.
* ``solve`` / ``solve_and_install`` -- plain blocking functions, **not
  awaited**.  They run rattler on a private event loop (on a helper thread
  when called from inside a running loop).  Fine for servers in another
  process, such as nginx from :mod:`tests.support.nginx`.

Every call gets its own ``Gateway`` so no repodata is shared between calls
except through ``cache_dir``; pass a fresh ``cache_dir`` to force a client to
fetch everything again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rattler import Gateway, RepoDataRecord, SourceConfig, Subdir

from mirrorgen.demo.packages import run_blocking
from rattler import install as rattler_install
from rattler import solve as rattler_solve

__all__ = [
    "installed_names",
    "solve",
    "solve_and_install",
    "solve_and_install_async",
    "solve_async",
]



def _gateway(cache_dir: Path, *, sharded: bool) -> Gateway:
    return Gateway(
        cache_dir=cache_dir / "repodata",
        default_config=SourceConfig(sharded_enabled=sharded),
        show_progress=False,
    )


def _platforms(platform: str) -> list[Subdir]:
    # A solve only queries the subdirs it is given: noarch must be explicit.
    names = [platform] if platform == "noarch" else [platform, "noarch"]
    return [Subdir(name) for name in names]


async def solve_async(
    channel_url: str,
    specs: Sequence[str],
    cache_dir: Path,
    *,
    platform: str = "linux-64",
    sharded: bool,
) -> list[RepoDataRecord]:
    """Solve ``specs`` against one channel URL.  A coroutine: await it."""
    return await rattler_solve(
        sources=[channel_url],
        specs=list(specs),
        gateway=_gateway(cache_dir, sharded=sharded),
        platforms=_platforms(platform),
        # No virtual packages: the demo packages need none, and detection
        # would make results depend on the machine running the tests.
        virtual_packages=[],
        # CEP-42 relations are off so the solve touches exactly this channel
        # (and the "warn" default would turn problems into Python warnings,
        # which pytest's filterwarnings=error makes fatal).
        channel_relations="disabled",
        # timestamp_policy only matters together with exclude_newer; the
        # default "require-timestamp" would drop records lacking both
        # timestamp and indexed_timestamp.  Keep it explicit and permissive
        # in case a caller adds exclude_newer for upstream data.
        timestamp_policy="allow-missing",
    )


async def solve_and_install_async(
    channel_url: str,
    specs: Sequence[str],
    prefix: Path,
    cache_dir: Path,
    *,
    platform: str = "linux-64",
    sharded: bool,
) -> list[str]:
    """Solve, download and link into ``prefix``; return installed names, sorted.

    A coroutine: await it.  Package archives are downloaded into
    ``cache_dir/pkgs`` and their sha256 from repodata is verified by rattler,
    so a corrupted mirror fails here.
    """
    records = await solve_async(channel_url, specs, cache_dir, platform=platform, sharded=sharded)
    await rattler_install(
        records,
        target_prefix=prefix,
        cache_dir=cache_dir / "pkgs",
        platform=Subdir(platform),
        show_progress=False,
        execute_link_scripts=False,
    )
    return installed_names(prefix)


def installed_names(prefix: Path) -> list[str]:
    """Names recorded in ``prefix/conda-meta`` -- what a client sees as installed."""
    meta = prefix / "conda-meta"
    if not meta.is_dir():
        return []
    names = {json.loads(p.read_text())["name"] for p in meta.glob("*.json")}
    return sorted(names)


def solve(
    channel_url: str,
    specs: Sequence[str],
    cache_dir: Path,
    *,
    platform: str = "linux-64",
    sharded: bool,
) -> list[RepoDataRecord]:
    """Blocking :func:`solve_async`.  Not a coroutine: do not await."""
    return run_blocking(solve_async(channel_url, specs, cache_dir, platform=platform, sharded=sharded))


def solve_and_install(
    channel_url: str,
    specs: Sequence[str],
    prefix: Path,
    cache_dir: Path,
    *,
    platform: str = "linux-64",
    sharded: bool,
) -> list[str]:
    """Blocking :func:`solve_and_install_async`.  Not a coroutine: do not await.

    Blocks the calling thread (and its event loop, if any) until done, so the
    channel must be served by another process or thread.
    """
    return run_blocking(
        solve_and_install_async(channel_url, specs, prefix, cache_dir, platform=platform, sharded=sharded)
    )
