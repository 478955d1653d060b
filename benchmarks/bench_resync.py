"""Benchmark 3: a no-op re-sync of a large active mirror (nothing changed upstream).

An active conda mirror of ``records`` package files (stand-in files, 256 bytes each, so the cost is
per file, not per byte), served by a real nginx on loopback. Per build: a first, full sync into an
empty root (timed, for information), then the timed re-sync against the unchanged upstream.

What a re-sync downloads is counted twice: from nginx's access log (requests made and body bytes
sent during the re-sync, split into index files - repodata.json and friends, which a re-sync
without conditional requests must fetch again - and package files) and from the run's own
``mirrorgen sync --json`` result (``downloaded`` files, ``bytes_downloaded``).

Baseline, measured in the same invocation: a Python process that ``os.stat``s every package file
of the mirror - the unavoidable cost of checking the files are still there. For context only, a
second floor also fetches and parses each subdir's repodata.json from the same server.

Goal: a re-sync of 100,000 files in <= 3 s, with 0 package bytes downloaded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import orjson

from . import synth
from .common import (Measured, Mirrorgen, Request, Table, access_log_since, best_of, fresh,
                     log_size, mib, run_result, serve_nginx, write_config)

SUBDIRS = ("linux-64", "noarch")
_INDEX_NAMES = ("repodata.json", "repodata.json.zst", "repodata.json.bz2", "channeldata.json",
                "repodata_shards.msgpack.zst")

# The floor: stat every path listed in argv[1] (one absolute path a line).
_STAT_FLOOR = "import os, sys\nfor p in open(sys.argv[1]).read().splitlines(): os.stat(p)\n"

# The context floor: also fetch and parse each subdir's repodata.json (argv[2:] are their URLs).
_INDEX_FLOOR = """import os, sys, urllib.request, orjson
for url in sys.argv[2:]:
    with urllib.request.urlopen(url) as r:
        orjson.loads(r.read())
for p in open(sys.argv[1]).read().splitlines(): os.stat(p)
"""


def upstream(work: Path, records: int) -> Path:
    """A channel of ``records`` records with every package file present, cached in ``work``."""
    root = work / f"conda-files-{records}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        synth.generate_conda(root, records, files=True, subdirs=SUBDIRS)
        done.write_text("")
    return root


def package_relpaths(up: Path) -> list[str]:
    """``subdir/fn`` of every package upstream lists (what an active mirror holds)."""
    out = []
    for subdir in SUBDIRS:
        doc = orjson.loads((up / subdir / "repodata.json").read_bytes())
        for key in ("packages", "packages.conda"):
            out += [f"{subdir}/{fn}" for fn in doc.get(key) or {}]
    return out


def _config(path: Path, root: Path, source: str) -> Path:
    return write_config(path, root, {"bench": {
        "type": "conda", "mode": "active", "source": source, "subdirs": list(SUBDIRS)}})


def _traffic(requests: list[Request]) -> dict[str, Any]:
    index = [r for r in requests if r.path.rsplit("/", 1)[-1] in _INDEX_NAMES or r.method == "HEAD"]
    packages = [r for r in requests if r not in index]
    return {"requests": len(requests),
            "index_reqs": len(index), "index_kib": sum(r.body_bytes for r in index) / 1024,
            "pkg_reqs": len(packages), "pkg_bytes": sum(r.body_bytes for r in packages)}


def run(work: Path, builds: list[Mirrorgen], *, records: int = 100_000, repeat: int = 3) -> Table:
    work.mkdir(parents=True, exist_ok=True)
    up = upstream(work, records)
    relpaths = package_relpaths(up)
    table = Table(f"3. no-op re-sync of an active conda mirror: {len(relpaths):,} files, "
                  f"nothing changed upstream, vs stat-every-file floor")
    with serve_nginx(up, work / "nginx-resync", access_log=True) as server:
        base = server.base_url
        rows: list[dict[str, Any]] = []
        mirrors: list[Path] = []
        for build in builds:
            root = work / "mirror-resync"
            fresh(root)
            cfg = _config(work / "resync.yaml", root, base)

            offset = log_size(server.access_log)
            first = build.run("sync", "-c", str(cfg), "--json")
            got = run_result(first)
            if got and (got.get("failed") or got.get("downloaded", len(relpaths)) != len(relpaths)):
                raise SystemExit(f"{build.label}: first sync downloaded {got.get('downloaded')} of "
                                 f"{len(relpaths)} files, failed {len(got.get('failed') or {})}")
            rows.append(dict(run=f"mirrorgen {build.label}, first (full) sync", wall_s=first.wall,
                             rss_mib=mib(first.rss), **_traffic(access_log_since(server.access_log, offset)),
                             downloaded=got.get("downloaded", ""), bytes_dl=got.get("bytes_downloaded", ""),
                             reused=got.get("reused", "")))

            best: tuple[Measured, dict[str, Any], dict[str, Any]] | None = None
            for _ in range(max(1, repeat)):
                offset = log_size(server.access_log)
                m = build.run("sync", "-c", str(cfg), "--json")
                traffic = _traffic(access_log_since(server.access_log, offset))
                if best is None or m.wall < best[0].wall:
                    best = (m, traffic, run_result(m))
            assert best is not None
            m, traffic, got = best
            rows.append(dict(run=f"mirrorgen {build.label}, re-sync", wall_s=m.wall, rss_mib=mib(m.rss),
                             **traffic, downloaded=got.get("downloaded", ""),
                             bytes_dl=got.get("bytes_downloaded", ""), reused=got.get("reused", "")))
            mirrors.append(root)

        # The floors, after the syncs: the mirror's files are in the page cache as for a re-sync.
        listing = work / "resync-files.txt"
        listing.write_text("\n".join(str(mirrors[-1] / "bench" / p) for p in relpaths) + "\n")
        stat_floor = best_of(repeat, [sys.executable, "-c", _STAT_FLOOR, str(listing)])
        index_floor = best_of(repeat, [sys.executable, "-c", _INDEX_FLOOR, str(listing),
                                       *(f"{base}/{s}/repodata.json" for s in SUBDIRS)])

    table.add(run="floor: os.stat every file", wall_s=stat_floor.wall, rss_mib=mib(stat_floor.rss),
              wall_x=1.0, rss_x=1.0)
    table.add(run="floor: + fetch, parse repodata.json", wall_s=index_floor.wall,
              rss_mib=mib(index_floor.rss), wall_x=index_floor.wall / stat_floor.wall,
              rss_x=index_floor.rss / stat_floor.rss)
    for row in rows:
        table.add(run=row.pop("run"), wall_s=row["wall_s"], rss_mib=row["rss_mib"],
                  wall_x=row["wall_s"] / stat_floor.wall, rss_x=row["rss_mib"] / mib(stat_floor.rss),
                  **{k: v for k, v in row.items() if k not in ("wall_s", "rss_mib")})
    return table


if __name__ == "__main__":
    import argparse

    from . import common
    from .common import builds as _builds

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_resync")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", default=None)
    args = parser.parse_args()
    common.back_max = common.BACK_FULL
    with _builds(args.before) as bs:
        print(run(args.work, bs, records=args.records, repeat=args.repeat).render())
