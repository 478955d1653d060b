"""Benchmark 4: active download throughput from a loopback upstream, against parallel curl.

A conda channel of ``files`` package files whose sizes are log-uniform in ``size_range`` (many
small files, a few large ones carrying most of the bytes), served by a real nginx on loopback.

- Baseline: one ``curl --parallel --parallel-max N`` fetching the same URLs, with N the
  concurrency mirrorgen uses by default. curl verifies nothing and fsyncs nothing: that is the
  point of the baseline. For context a second row adds a ``sync`` after it (curl's bytes on disk,
  as mirrorgen's are when it exits: it fsyncs every file before publishing it).
- mirrorgen: ``mirrorgen sync`` of an active mirror into an empty root, which checks every file's
  size and sha256 against the index before publishing it; the run must download every file with
  none failed.
- Floors, for context (``benchmarks/floors.py``): each part of mirrorgen's job alone, done as
  simply as Python can. ``receive``: the files fetched from the same nginx and sha256-checked,
  nothing written. ``write``: the same bytes written as mirrorgen writes them and synced, no
  network. ``both``: those two at once, each in a process of its own, so nothing but the cores
  and the disk is shared: how long those parts take on this machine when they overlap as well as
  they can, before any start-up or index. mirrorgen does both (and the index) in one process, on
  the same two cores.

Both write under ``work`` (the same filesystem); the upstream files are read right before each
timed run so the page cache holds them for both (see common.warm), and dirty pages of the
previous run are flushed (``sync``) before each timed run. Throughput is the channel's package
bytes over the run's wall time.
``sys_s`` is each run's kernel CPU time: curl's goes mostly to allocating page-cache pages. On a
virtual machine that hands freed memory back to its host (free page reporting) that cost from
0.3 s to 3 s per gigabyte from one run to the next, and mirrorgen's direct writes skip the page
cache, so the ratio measured the host more than either program; every timed run now starts with
the memory it needs backed (common.back_memory), curl's included.

Goal: mirrorgen >= 0.7x curl's throughput, every file verified.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import floors, synth
from .common import Measured, Mirrorgen, Table, fresh, measure, mib, run_result, serve_nginx, warm, write_config

SUBDIRS = ("linux-64", "noarch")


def default_concurrency() -> int:
    """``concurrency`` when a mirror does not set it (MirrorConfig's default)."""
    from mirrorgen.config import MirrorConfig

    default = next(f.default for f in dataclasses.fields(MirrorConfig) if f.name == "concurrency")
    assert isinstance(default, int)
    return default


def upstream(work: Path, files: int, size_range: tuple[int, int]) -> Path:
    """A channel of ``files`` package files, sizes log-uniform in ``size_range``, cached in ``work``."""
    lo, hi = size_range
    root = work / f"conda-sized-{files}-{lo}-{hi}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        synth.generate_conda(root, files, files=True, subdirs=SUBDIRS, size_range=size_range)
        done.write_text("")
    return root


def packages(up: Path) -> dict[str, int]:
    """``subdir/fn`` -> size of every package file upstream lists."""
    return {relpath: size for relpath, size, _ in floors.channel_files(up, SUBDIRS)}


def _curl_config(path: Path, base: str, out: Path, relpaths: list[str]) -> Path:
    lines = []
    for relpath in relpaths:
        lines.append(f'url = "{base}/{relpath}"')
        lines.append(f'output = "{out / relpath}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def _on_disk(root: Path, want: dict[str, int]) -> int:
    """How many of ``want`` exist under ``root`` with the right size (curl checks nothing)."""
    ok = 0
    for relpath, size in want.items():
        try:
            ok += (root / relpath).stat().st_size == size
        except FileNotFoundError:
            pass
    return ok


def run(work: Path, builds: list[Mirrorgen], *, files: int = 1500,
        size_range: tuple[int, int] = (10 << 10, 4 << 20), repeat: int = 3) -> Table:
    work.mkdir(parents=True, exist_ok=True)
    up = upstream(work, files, size_range)
    want = packages(up)
    relpaths = sorted(want)
    total = sum(want.values())
    n = default_concurrency()
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl not found")
    curl_version = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout.split()[1]
    lo, hi = size_range
    table = Table(f"4. active download: {len(want):,} files, {total / 1e6:,.0f} MB "
                  f"(log-uniform {lo >> 10} KiB-{hi >> 20} MiB), loopback nginx, "
                  f"concurrency {n}, vs curl {curl_version} --parallel")

    curl_out, curl_best, sync_best = work / "curl-out", None, None
    best: dict[str, tuple[Measured, dict[str, Any]]] = {}
    with serve_nginx(up, work / "nginx-download") as server:
        cfg = _curl_config(work / "curl-urls.txt", server.base_url, curl_out, relpaths)
        for _ in range(max(1, repeat)):
            fresh(curl_out)
            warm(up)
            c = measure([curl, "--silent", "--show-error", "--fail", "--create-dirs",
                         "--parallel", "--parallel-max", str(n), "--config", str(cfg)])
            s = measure(["sync"], back=False)
            got = _on_disk(curl_out, want)
            if got != len(want):
                raise SystemExit(f"curl wrote {got} of {len(want)} files")
            if curl_best is None or c.wall < curl_best.wall:
                curl_best = c
            if sync_best is None or c.wall + s.wall < sync_best[0].wall + sync_best[1].wall:
                sync_best = (c, s)

            for build in builds:
                root = work / "mirror-download"
                fresh(root)
                warm(up)
                mcfg = write_config(work / "download.yaml", root, {"bench": {
                    "type": "conda", "mode": "active", "source": server.base_url,
                    "subdirs": list(SUBDIRS)}})
                m = build.run("sync", "-c", str(mcfg), "--json")
                res = run_result(m)
                if res and (res.get("failed") or res.get("downloaded") != len(want)
                            or res.get("bytes_downloaded") != total):
                    raise SystemExit(f"{build.label}: downloaded {res.get('downloaded')} of {len(want)} "
                                     f"files ({res.get('bytes_downloaded')} of {total} bytes), "
                                     f"failed {len(res.get('failed') or {})}")
                if not res and _on_disk(root / "bench", want) != len(want):
                    raise SystemExit(f"{build.label}: not every file was mirrored")
                if build.label not in best or m.wall < best[build.label][0].wall:
                    best[build.label] = (m, res)
        fresh(curl_out)
        listed = work / "floor-files.json"
        floors.listing(up, SUBDIRS, listed)
        receive = floors.best_floor("receive", listed, [n], repeat, upstream=up, base_url=server.base_url)
        overlap = floors.best_floor("both", listed, [n], repeat, upstream=up, base_url=server.base_url,
                                    root=work / "floor-both")
    writes = floors.best_floor("write", listed, sorted({1, n}), repeat, upstream=up,
                               root=work / "floor-write")

    assert curl_best is not None and sync_best is not None
    base_mbs = total / 1e6 / curl_best.wall
    table.add(run=f"curl --parallel-max {n} (no verification)", wall_s=curl_best.wall,
              sys_s=curl_best.sys, mb_s=base_mbs, x_curl=1.0, rss_mib=mib(curl_best.rss),
              files=len(want), verified=0)
    cs_wall = sync_best[0].wall + sync_best[1].wall
    table.add(run="curl, then sync (for context)", wall_s=cs_wall,
              sys_s=sync_best[0].sys + sync_best[1].sys, mb_s=total / 1e6 / cs_wall,
              x_curl=total / 1e6 / cs_wall / base_mbs, rss_mib=mib(sync_best[0].rss), files=len(want),
              verified=0)
    for (m, threads), what, verified in ((receive, "receive + sha256 only, nothing written", len(want)),
                                         (writes, "durable writes only, no network", 0),
                                         (overlap, "both at once, two processes", len(want))):
        table.add(run=f"floor: {what} ({threads} thread{'s' * (threads > 1)})", wall_s=m.wall,
                  sys_s=m.sys, mb_s=total / 1e6 / m.wall, x_curl=total / 1e6 / m.wall / base_mbs,
                  rss_mib=mib(m.rss), files=len(want), verified=verified)
    for build in builds:
        m, res = best[build.label]
        mbs = total / 1e6 / m.wall
        table.add(run=f"mirrorgen {build.label}, active sync", wall_s=m.wall, sys_s=m.sys, mb_s=mbs,
                  x_curl=mbs / base_mbs, rss_mib=mib(m.rss), files=res.get("downloaded", ""),
                  verified=res.get("downloaded", "") if res else "")
    return table


if __name__ == "__main__":
    import argparse

    from . import common
    from .common import builds as _builds

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_download")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--min-size", type=int, default=10 << 10)
    parser.add_argument("--max-size", type=int, default=4 << 20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", default=None)
    args = parser.parse_args()
    common.back_max = common.BACK_FULL
    with _builds(args.before) as bs:
        print(run(args.work, bs, files=args.files, size_range=(args.min_size, args.max_size),
                  repeat=args.repeat).render())
