"""Benchmark 2: mirroring a 20,000-record channel, conda-mirror 0.10 vs mirrorgen (active mode).

Both tools mirror the same synthetic channel (benchmarks/synth.py, ``files=True``), served by one
real nginx on loopback, into a fresh directory each run: every package file downloaded, checked
and written, plus the index. The upstream files are read right before each timed run, whoever is
timed, so nginx serves them from the page cache (see common.warm). Goal: mirrorgen >= 1000x
faster than conda-mirror.

- conda-mirror 0.10.0 runs from its own venv (``WORK/conda-mirror-venv``, created with pip the
  first time), exactly as a user would run it, with its defaults (serial validation)::

      conda-mirror --upstream-channel http://127.0.0.1:PORT/files-N --platform linux-64 \\
          --target-directory DIR --temp-directory DIR --no-progress

  It downloads one file at a time and every 15 packages md5-checks the downloaded batch and
  rewrites the whole repodata.json (indent=2) and repodata.json.bz2 for everything it has so far,
  which makes it quadratic in the channel's size.
- mirrorgen ``sync`` in active mode, ``subdirs: [linux-64]``, no filters: it fetches, sha256-checks
  and publishes every file, then writes repodata.json, .zst and CEP-16 shards (noarch is always
  added; upstream has none, so it is empty).

For context, beside curl: floors (``benchmarks/floors.py``), each one part of the job done as
simply as Python can, on the same files: ``receive`` (fetched and sha256-checked, nothing written),
``write`` (the files written and synced, no network), ``fetch`` (both: a mirror with no index,
no atomic names and no record of what it holds), and ``both`` (``receive`` and ``write`` at once,
each in a process of its own: the two parts overlapped with no interpreter shared). Each runs
with 1 thread and with mirrorgen's concurrency where that can differ, and the faster is kept.

The channel has a single subdir, linux-64 (conda-mirror mirrors one platform per invocation), with
both .conda (~80%) and .tar.bz2 files: conda-mirror 0.10 reads ``packages.conda`` too. The package
files are stand-ins, not archives. That is enough for conda-mirror: its ``_validate`` compares the
md5 and, when it matches, returns before opening the file as a tarball (``info/index.json`` is
only read for records without an md5), and every synthetic record's md5, sha256 and size are the
stand-in file's real ones.

conda-mirror needs minutes at 20,000 records (the issue measured 18 min 30 s on 2 cores), so
``conda_mirror_records`` can time it on the first N records only (synth output for N records is a
prefix of the output for more). mirrorgen is then timed on that same N-record channel, that row
carries the speedup, the row label says "N of M records", and the full-size mirrorgen row has no
speedup: nothing is extrapolated. conda-mirror runs once; mirrorgen ``repeat`` times (the best).
Before a row is printed, each tool's output must hold exactly the upstream's package files and a
repodata.json listing them all.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from . import common, floors
from .bench_download import _curl_config, default_concurrency
from .common import REPO, Measured, Mirrorgen, Table, fresh, mib, measure, serve, warm, write_config

CONDA_MIRROR_PIN = "conda-mirror==0.10.*"
SUBDIR = "linux-64"
NAME = "bench"
_PACKAGE_SUFFIXES = (".conda", ".tar.bz2")


# -- inputs ----------------------------------------------------------------------------------------

def conda_mirror_venv(work: Path) -> tuple[Path, str]:
    """conda-mirror's own venv under ``work`` (made on first use); its executable and version."""
    venv = work / "conda-mirror-venv"
    exe = venv / "bin" / "conda-mirror"
    python = venv / "bin" / "python"
    if not exe.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        CONDA_MIRROR_PIN], check=True)
    # Not `conda-mirror --version`: it prints the version and exits 1.
    version = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                              "print(version('conda-mirror'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if not version.startswith("0.10."):
        raise SystemExit(f"{venv}: conda-mirror {version} installed, expected {CONDA_MIRROR_PIN}")
    return exe, version


def channel(channels: Path, count: int) -> tuple[Path, list[str]]:
    """A ``count``-record linux-64 channel with package files, cached under ``channels``, and the
    names of its package files. repodata.json is written last, so its presence means complete."""
    root = channels / f"files-{count}"
    if not (root / SUBDIR / "repodata.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        # In a child process: see _harness_rss.
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from benchmarks.synth import generate_conda; "
                        "generate_conda(Path(sys.argv[1]), int(sys.argv[2]), files=True, "
                        "subdirs=(sys.argv[3],))",
                        str(root), str(count), SUBDIR], cwd=REPO, check=True)
    return root, sorted(_package_files(root / SUBDIR))


def _harness_rss() -> int:
    """This process's peak RSS, bytes. Linux carries a process's RSS high-water mark across fork
    and exec, so a child spawned straight from the harness reports at least this as its own peak.
    common.measure avoids that by spawning through GNU time when /usr/bin/time exists; without it,
    this is a floor on every figure. Either way the big work (generating channels, parsing the
    mirrors' repodata.json) runs in child processes, and run() says so if the floor was reached."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- checks ----------------------------------------------------------------------------------------

def _package_files(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {e.name for e in os.scandir(directory) if e.is_file() and e.name.endswith(_PACKAGE_SUFFIXES)}


def _check(who: str, subdir: Path, expected: list[str]) -> int:
    """That ``subdir`` holds exactly the upstream's package files and indexes them all; the count."""
    got = _package_files(subdir)
    if got != set(expected):
        missing, extra = set(expected) - got, got - set(expected)
        raise SystemExit(f"{who}: {len(got)} package files in {subdir}, upstream has {len(expected)}"
                         f" ({len(missing)} missing, e.g. {sorted(missing)[:3]}; {len(extra)} extra)")
    # repodata.json parsed in a child, not here: see _harness_rss.
    indexed = subprocess.run([sys.executable, "-c", _INDEXED, str(subdir / "repodata.json")],
                             check=True, capture_output=True).stdout.decode().split()
    if set(indexed) != got:
        raise SystemExit(f"{who}: {subdir}/repodata.json lists {len(set(indexed))} packages, "
                         f"{len(got)} files are there")
    return len(got)


_INDEXED = """import sys, json
doc = json.load(open(sys.argv[1], "rb"))
print("\\n".join(set(doc.get("packages") or {}) | set(doc.get("packages.conda") or {})))
"""


# -- runs ------------------------------------------------------------------------------------------

def _conda_mirror(exe: Path, url: str, upstream: Path, work: Path,
                  expected: list[str]) -> tuple[Measured, int]:
    target, temp = work / "conda-mirror-target", work / "conda-mirror-tmp"
    for d in (target, temp):
        fresh(d)
    temp.mkdir(parents=True)
    warm(upstream)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    m = measure([str(exe), "--upstream-channel", url, "--platform", SUBDIR,
                 "--target-directory", str(target), "--temp-directory", str(temp), "--no-progress"],
                env=env)
    # conda-mirror logs a failed download and stops, exiting 0: only the files tell.
    if "Error" in m.stderr or "Traceback" in m.stderr:
        raise SystemExit(f"conda-mirror reported errors:\n{m.stderr[-3000:]}")
    return m, _check("conda-mirror", target / SUBDIR, expected)


def _curl(url: str, upstream: Path, work: Path, expected: list[str], repeat: int) -> tuple[Measured, int]:
    """curl fetching the same files with mirrorgen's default concurrency: no checks, no index."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl not found")
    out = work / "curl-root"
    cfg = _curl_config(work / "conda-mirror-curl.txt", url, out, [f"{SUBDIR}/{fn}" for fn in expected])
    best: Measured | None = None
    for _ in range(max(1, repeat)):
        fresh(out)
        warm(upstream)
        m = measure([curl, "--silent", "--show-error", "--fail", "--create-dirs", "--parallel",
                     "--parallel-max", str(default_concurrency()), "--config", str(cfg)])
        best = m if best is None or m.wall < best.wall else best
    assert best is not None
    return best, len(list((out / SUBDIR).iterdir()))


def _mirrorgen(build: Mirrorgen, url: str, upstream: Path, work: Path, expected: list[str],
               repeat: int, mode: str = "active") -> tuple[Measured, int]:
    best: Measured | None = None
    files = 0
    for _ in range(max(1, repeat)):
        root = work / "mirrorgen-root"
        fresh(root)
        warm(upstream)
        cfg = write_config(work / "conda-mirror-bench.yaml", root, {NAME: {
            "type": "conda", "mode": mode, "source": url, "subdirs": [SUBDIR]}})
        m = build.run("sync", "-c", str(cfg), "--quiet")
        if mode == "active":
            files = _check(f"mirrorgen {build.label}", root / NAME / SUBDIR, expected)
        best = m if best is None or m.wall < best.wall else best
    assert best is not None
    return best, files


def run(work: Path, builds: list[Mirrorgen], *, records: int, repeat: int,
        conda_mirror_records: int | None = None) -> Table:
    cm_count = min(conda_mirror_records or records, records)
    subset = cm_count < records
    exe, version = conda_mirror_venv(work)
    channels = work / "conda-mirror-channels"
    counts = [cm_count, records] if subset else [records]
    chans = {n: channel(channels, n) for n in counts}

    title = (f"2. mirroring a {records:,}-record channel (linux-64, with files): "
             f"conda-mirror {version} vs mirrorgen active sync; goal >= 1000x")
    if subset:
        title += (f". conda-mirror timed on the first {cm_count:,} records only; "
                  f"speedups are on those {cm_count:,}")
    table = Table(title)

    def label(who: str, n: int) -> str:
        return f"{who}, {n:,} of {records:,} records" if n < records else f"{who}, {n:,} records"

    with serve(channels, work / "conda-mirror-nginx") as base:
        url = {n: f"{base}/{chans[n][0].name}" for n in counts}
        # conda-mirror treats the last path segment of the URL as the channel name and the rest
        # as the base, so the channel must sit below the server root (hence files-N/).
        cm, cm_files = _conda_mirror(exe, url[cm_count], chans[cm_count][0], work, chans[cm_count][1])
        table.add(run=label(f"conda-mirror {version}", cm_count), wall_s=cm.wall, rss_mib=mib(cm.rss),
                  speedup=1.0, files=cm_files)
        for build in builds:
            for n in counts:
                m, files = _mirrorgen(build, url[n], chans[n][0], work, chans[n][1], repeat)
                table.add(run=label(f"mirrorgen {build.label}", n), wall_s=m.wall, rss_mib=mib(m.rss),
                          speedup=cm.wall / m.wall if n == cm_count else "-", files=files)
        # Context, not the same job: what bounds any active mirror (fetching the files, nothing
        # checked or indexed), and mirrorgen's index work alone (passive mode, no downloads).
        c, files = _curl(url[cm_count], chans[cm_count][0], work, chans[cm_count][1], repeat)
        table.add(run=label("context: curl --parallel, downloads only", cm_count), wall_s=c.wall,
                  rss_mib=mib(c.rss), speedup=cm.wall / c.wall, files=files)
        for build in builds:
            m, _ = _mirrorgen(build, url[cm_count], chans[cm_count][0], work, chans[cm_count][1], repeat,
                              mode="passive")
            table.add(run=label(f"context: mirrorgen {build.label}, passive (index only)", cm_count),
                      wall_s=m.wall, rss_mib=mib(m.rss), speedup=cm.wall / m.wall, files=0)
        up = chans[cm_count][0]
        listed = work / "floor-files.json"
        files = len(floors.listing(up, [SUBDIR], listed))
        threads = sorted({1, default_concurrency()})
        for what, counts, about in (
                ("receive", threads[-1:], "receive + sha256 only, nothing written"),
                ("write", threads, "write + sync only, no network"),
                ("fetch", threads, "receive + sha256 + write + sync, no index"),
                ("both", threads, "receive + sha256, and write + sync, in two processes at once")):
            m, n = floors.best_floor(what, listed, counts, repeat, upstream=up, base_url=url[cm_count],
                                     root=None if what == "receive" else work / "floor-root")
            table.add(run=label(f"floor: {about} ({n} thread{'s' * (n > 1)})", cm_count), wall_s=m.wall,
                      rss_mib=mib(m.rss), speedup=cm.wall / m.wall, files=files)
    floor = _harness_rss()
    if not getattr(common, "_GNU_TIME", None) and any(row["rss_mib"] <= mib(floor) for row in table.rows):
        table.title += (f". NOTE: the harness's own peak RSS ({mib(floor):.0f} MiB) is a floor on every "
                        f"rss_mib figure (common.measure counts it in), so rows at that value are not real")
    return table


def main(argv: list[str] | None = None) -> int:
    from .common import builds, machine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_conda_mirror",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="cache and scratch directory")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--conda-mirror-records", type=int, default=None,
                        help="time conda-mirror on only the first N records (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="mirrorgen runs per size (best kept)")
    parser.add_argument("--before", help="also measure this git revision of mirrorgen")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    common.back_max = common.BACK_FULL
    print(machine())
    with builds(args.before) as bs:
        print(run(args.work.resolve(), bs, records=args.records, repeat=args.repeat,
                  conda_mirror_records=args.conda_mirror_records).render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
