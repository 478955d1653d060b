"""Run every benchmark, print each table, and keep the figures as JSON.

    .venv/bin/python -m benchmarks                      # the README's figures (about 30 min)
    .venv/bin/python -m benchmarks --before 62fc350     # also measure an older revision, same run
    .venv/bin/python -m benchmarks --quick              # small sizes: checks the harness works
    .venv/bin/python -m benchmarks --only 1 3

Needs nginx and curl (as CI installs them); benchmark 2 installs conda-mirror 0.10 into its own
virtualenv under the work directory. Generated upstreams are cached there between runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import orjson

from . import bench_conda_mirror, bench_download, bench_metadata, bench_resync
from . import common
from .common import builds, machine

FULL = {
    "1": lambda work, bs, repeat: bench_metadata.run(work, bs, records=500_000, repeat=repeat),
    "2": lambda work, bs, repeat: bench_conda_mirror.run(work, bs, records=20_000, repeat=repeat),
    "3": lambda work, bs, repeat: bench_resync.run(work, bs, records=100_000, repeat=repeat),
    "4": lambda work, bs, repeat: bench_download.run(work, bs, files=1500, repeat=repeat),
}
QUICK = {
    "1": lambda work, bs, repeat: bench_metadata.run(work, bs, records=20_000, repeat=1),
    "2": lambda work, bs, repeat: bench_conda_mirror.run(work, bs, records=300, repeat=1),
    "3": lambda work, bs, repeat: bench_resync.run(work, bs, records=2_000, repeat=1),
    "4": lambda work, bs, repeat: bench_download.run(work, bs, files=100, repeat=1),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mirrorgen-bench"),
                        help="cache and scratch directory (default: %(default)s)")
    parser.add_argument("--before", help="also measure this git revision of mirrorgen, in the same run")
    parser.add_argument("--only", nargs="+", choices=sorted(FULL), help="run only these benchmarks")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    chosen = QUICK if args.quick else FULL
    common.back_max = 0 if args.quick else common.BACK_FULL
    header = f"mirrorgen benchmarks, {dt.datetime.now().isoformat(timespec='seconds')}\nmachine: {machine()}"
    print(header, flush=True)
    results = {"machine": machine(), "when": dt.datetime.now().isoformat(timespec="seconds"),
               "before": args.before, "quick": args.quick, "tables": []}
    with builds(args.before) as bs:
        for number in args.only or sorted(chosen):
            table = chosen[number](work, bs, args.repeat)
            print("\n" + table.render(), flush=True)
            results["tables"].append({"title": table.title, "rows": table.rows})
            # What this benchmark's runs wrote goes now, not at exit: kept, it fills the page
            # cache, and the next benchmark's writes (curl's first: it runs first) pay for the
            # reclaim. Then a pause: see common.fresh on creating files next to deletions.
            if common.empty_trash():
                os.sync()
                time.sleep(common.RECENTLY_DELETED_S)
    out = work / "results.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"\nfigures saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
