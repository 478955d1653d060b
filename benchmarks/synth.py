"""Synthetic upstreams at real scale, grown from the real index files in ``shared/testdata``.

Every synthetic record is a real record (real field shapes, real depends, licenses, timestamps,
odd keys) with its name or version varied so that the copies are distinct packages. The output is
deterministic for a given size and seed, so two runs of a benchmark read byte-identical input.

One generator per ecosystem, all with the same shape: ``generate(out, count, *, files, seed)``
writes an upstream tree under ``out`` that a loopback server (or ``file://``) can serve, and
returns an :class:`Upstream` describing it. Only conda exists yet; PyPI (650k projects) and CRAN
(22k packages) join :data:`GENERATORS` when those mirror types land.

    python -m benchmarks.synth conda /tmp/up --records 500000
    python -m benchmarks.synth conda /tmp/up --records 100000 --files
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
if not TESTDATA.is_dir():  # a checkout with shared/ beside it, as CI has
    TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"

# Fields that describe where a record was fetched from, not the package: dropped from seeds.
_LOCATION_KEYS = ("url", "channel", "fn")


@dataclass
class Upstream:
    """What a generator wrote: the tree's root, and what a benchmark needs to know about it."""

    root: Path
    ecosystem: str
    records: int
    subdirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)   # relpaths of package files, if written
    file_bytes: int = 0


# -- conda -----------------------------------------------------------------------------------------

def conda_seed_records() -> list[dict[str, Any]]:
    """Every real record in testdata/conda, deduplicated by (name, version, build)."""
    paths = sorted((TESTDATA / "conda").glob("*.json")) + sorted((TESTDATA / "conda").glob("*/*/repodata.json"))
    if not paths:
        raise SystemExit(f"no conda testdata under {TESTDATA}")
    seen: set[tuple[str, str, str]] = set()
    out: list[dict[str, Any]] = []
    for path in paths:
        doc = orjson.loads(path.read_bytes())
        for key in ("packages", "packages.conda"):
            for record in (doc.get(key) or {}).values():
                if not isinstance(record, dict) or not {"name", "version", "build"} <= record.keys():
                    continue
                ident = (record["name"], record["version"], record["build"])
                if ident in seen:
                    continue
                seen.add(ident)
                out.append({k: v for k, v in record.items() if k not in _LOCATION_KEYS})
    return out


def _stand_in(key: str, size: int) -> bytes:
    """Small, distinct, deterministic content for a stand-in package file."""
    block = hashlib.sha256(key.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def conda_records(count: int, *, seed: int = 0, conda_share: float = 0.8) -> Iterator[tuple[str, dict[str, Any]]]:
    """``count`` distinct (file name, record) pairs. Copy k of a seed record gets a new name every
    third copy and a new version otherwise, so a name has ~20 records as on conda-forge."""
    seeds = conda_seed_records()
    rng = random.Random(seed)
    rng.shuffle(seeds)
    for i in range(count):
        base = seeds[i % len(seeds)]
        copy = i // len(seeds)
        record = dict(base)
        if copy:
            if copy % 3 == 0:
                record["name"] = f"{base['name']}-s{copy // 3}"
            else:
                record["version"] = f"{base['version']}.{copy}"
        ext = ".conda" if rng.random() < conda_share else ".tar.bz2"
        fn = f"{record['name']}-{record['version']}-{record['build']}{ext}"
        record["sha256"] = hashlib.sha256(fn.encode()).hexdigest()
        record["md5"] = hashlib.md5(fn.encode(), usedforsecurity=False).hexdigest()
        yield fn, record


def generate_conda(out: Path, count: int, *, files: bool = False, seed: int = 0,
                   subdirs: tuple[str, ...] = ("linux-64", "noarch"), file_size: int = 256,
                   size_range: tuple[int, int] | None = None) -> Upstream:
    """A conda channel with ``count`` records spread over ``subdirs`` (noarch gets a tenth);
    with ``files``, every package file exists (``file_size`` bytes) and its record's size, sha256
    and md5 are the file's real ones. With ``size_range=(lo, hi)`` file sizes are drawn instead
    log-uniformly from [lo, hi] bytes (deterministic for ``seed``): many small files, a few large
    ones carrying most of the bytes, as on a real channel."""
    out.mkdir(parents=True, exist_ok=True)
    up = Upstream(out, "conda", count, list(subdirs))
    sizes = random.Random(f"sizes-{seed}")
    per: dict[str, dict[str, dict[str, bytes]]] = {s: {"packages": {}, "packages.conda": {}} for s in subdirs}
    main = [s for s in subdirs if s != "noarch"] or list(subdirs)
    for i, (fn, record) in enumerate(conda_records(count, seed=seed)):
        subdir = "noarch" if "noarch" in subdirs and i % 10 == 9 else main[i % len(main)]
        record["subdir"] = subdir
        if subdir == "noarch":
            record.setdefault("noarch", "generic")
        if files:
            size = file_size
            if size_range is not None:
                lo, hi = size_range
                size = min(hi, max(lo, round(math.exp(sizes.uniform(math.log(lo), math.log(hi))))))
            data = _stand_in(f"{subdir}/{fn}", size)
            path = out / subdir / fn
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            record["size"] = len(data)
            record["sha256"] = hashlib.sha256(data).hexdigest()
            record["md5"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
            up.files.append(f"{subdir}/{fn}")
            up.file_bytes += len(data)
        key = "packages.conda" if fn.endswith(".conda") else "packages"
        per[subdir][key][fn] = orjson.dumps(record)
    for subdir, maps in per.items():
        (out / subdir).mkdir(parents=True, exist_ok=True)
        (out / subdir / "repodata.json").write_bytes(_repodata(subdir, maps))
    return up


def _repodata(subdir: str, maps: dict[str, dict[str, bytes]]) -> bytes:
    # Written by hand from pre-encoded records: one pass, no 500k-entry dict tree in memory.
    parts = [b'{"info":{"subdir":', orjson.dumps(subdir), b"}"]
    for key in ("packages", "packages.conda"):
        parts.append(b"," + orjson.dumps(key) + b":{")
        parts.append(b",".join(orjson.dumps(fn) + b":" + raw for fn, raw in sorted(maps[key].items())))
        parts.append(b"}")
    parts.append(b',"removed":[],"repodata_version":1}')
    return b"".join(parts)


GENERATORS: dict[str, Callable[..., Upstream]] = {"conda": generate_conda}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("ecosystem", choices=sorted(GENERATORS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--files", action="store_true", help="write stand-in package files too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    up = GENERATORS[args.ecosystem](args.out, args.records, files=args.files, seed=args.seed)
    print(f"{up.ecosystem}: {up.records} records in {', '.join(up.subdirs)} under {up.root}"
          + (f"; {len(up.files)} files, {up.file_bytes} bytes" if up.files else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
