"""Benchmark 1: conda metadata at conda-forge scale.

``mirrorgen sync`` in passive mode (index work only) with a license filter, writing repodata.json,
repodata.json.zst and CEP-16 shards, against the naive floor (benchmarks/naive.py: orjson load,
dict-comprehension filter, orjson dump, zstd level 3) on the same 500,000-record subdir and the
same filter. Two mirrorgen runs:

- cold: an empty mirror (every shard is new);
- update: the same mirror after upstream added 1% more records (what a scheduled sync does).

Both sides must keep the same records; the benchmark checks that before printing anything.
Goal: wall <= 1.2x the floor, peak RSS <= 0.6x.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orjson

from . import synth
from .common import Mirrorgen, Table, best_of, fresh, mib, warm, write_config

LICENSES = ["-gpl3", "-agpl"]


def upstreams(work: Path, records: int) -> tuple[Path, Path]:
    """The upstream, and the same upstream a sync later (1% more records), cached in ``work``."""
    out = []
    for name, count in (("up", records), ("up-next", records + records // 100)):
        root = work / f"conda-{name}-{count}"
        if not (root / "linux-64" / "repodata.json").exists():
            shutil.rmtree(root, ignore_errors=True)
            synth.generate_conda(root, count, subdirs=("linux-64",))
        out.append(root)
    return out[0], out[1]


def _config(path: Path, root: Path, source: Path) -> Path:
    return write_config(path, root, {"bench": {
        "type": "conda", "mode": "passive", "source": str(source), "subdirs": ["linux-64"],
        "filters": {"licenses": LICENSES}}})


def _keys(repodata: Path) -> set[str]:
    doc = orjson.loads(repodata.read_bytes())
    return set(doc.get("packages") or {}) | set(doc.get("packages.conda") or {})


def run(work: Path, builds: list[Mirrorgen], *, records: int, repeat: int) -> Table:
    import sys

    up, up_next = upstreams(work, records)
    table = Table(f"1. conda metadata: {records:,} records, licenses {LICENSES}, passive sync vs naive floor")
    floor_out = work / "floor-out"
    floor = best_of(repeat, [sys.executable, "-m", "benchmarks.naive",
                             str(up / "linux-64" / "repodata.json"), str(floor_out), *LICENSES],
                    cwd=Path(__file__).resolve().parents[1], warming=up / "linux-64")
    expected = _keys(floor_out / "repodata.json")
    table.add(run="naive floor", wall_s=floor.wall, rss_mib=mib(floor.rss), wall_x=1.0, rss_x=1.0,
              records=len(expected))
    for build in builds:
        results: dict[str, Any] = {}
        for phase in ("cold", "update"):
            best = None
            for _ in range(max(1, repeat)):
                root = work / "mirror"
                if phase == "cold":
                    fresh(root)
                    cfg = _config(work / "cold.yaml", root, up)
                else:
                    # Back to the previous state: synced from `up`, then time the sync from `up-next`.
                    fresh(root)
                    build.run("sync", "-c", str(_config(work / "cold.yaml", root, up)), "--quiet")
                    os.sync()
                    cfg = _config(work / "update.yaml", root, up_next)
                warm((up if phase == "cold" else up_next) / "linux-64")
                m = build.run("sync", "-c", str(cfg), "--quiet")
                best = m if best is None or m.wall < best.wall else best
                got = _keys(root / "bench" / "linux-64" / "repodata.json")
                if phase == "cold" and got != expected:
                    raise SystemExit(f"{build.label}: kept {len(got)} records, the floor kept {len(expected)}")
                for name in ("repodata.json.zst", "repodata_shards.msgpack.zst"):
                    if not (root / "bench" / "linux-64" / name).exists():
                        raise SystemExit(f"{build.label}: no linux-64/{name} written")
                results[phase] = (best, len(got))
        for phase, (m, kept) in results.items():
            table.add(run=f"mirrorgen {build.label}, {phase}", wall_s=m.wall, rss_mib=mib(m.rss),
                      wall_x=m.wall / floor.wall, rss_x=m.rss / floor.rss, records=kept)
    return table
