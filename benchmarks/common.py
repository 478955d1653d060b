"""What every benchmark shares: measuring a child process, finding mirrorgen, printing results.

Wall time and peak RSS are taken from the child itself (``os.wait4`` returns its rusage), so the
benchmark harness's own memory never counts. Every figure is reported next to a baseline measured
in the same invocation, as a ratio: absolute seconds on one machine say little about another.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    wall: float          # seconds
    rss: int             # peak resident set size, bytes
    returncode: int
    stdout: str = ""
    stderr: str = ""
    sys: float = 0.0     # kernel CPU seconds of the process and the children it waited for


# Linux carries a process's RSS high-water mark across exec (and a fork/vfork child starts with its
# parent's), so ru_maxrss of a child spawned straight from this harness is at least the harness's
# own RSS at that moment - hundreds of MiB once a benchmark holds a big index in memory. GNU time is
# a ~1 MiB process: spawned through it, the child's figure is its own.
_GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            check: bool = True, back: bool = True) -> Measured:
    """Run ``cmd`` to completion; its wall time and peak RSS (ru_maxrss is KiB on Linux). The
    memory it will need is backed first (see :func:`back_memory`) unless ``back`` is false: a
    step that finishes the run before it (a ``sync`` after curl) follows it at once."""
    if back:
        back_memory()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        argv = list(cmd)
        if _GNU_TIME:
            argv = [_GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = _TreeSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        rss_kib = usage.ru_maxrss
        if _GNU_TIME:
            lines = rss_file.read().split()
            rss_kib = int(lines[-1]) if lines and lines[-1].isdigit() else rss_kib
        # A run with worker processes: their memory counts too (GNU time sees only the largest
        # process of the tree, not the sum).
        rss_kib = max(rss_kib, sampler.peak_kib)
        result = Measured(wall, rss_kib * 1024, proc.returncode,
                          out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                          usage.ru_stime)
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


# At most how much free memory back_memory touches. Full-size runs (``python -m benchmarks``, each
# benchmark's own main) set BACK_FULL: more than any timed run here allocates (benchmark 1's naive
# floor peaks at 1.8 GiB; benchmark 4 writes 1 GB through the page cache), with room for what the
# host takes back while a run goes on. 0 (the default: --quick, the tests) touches nothing.
BACK_FULL = 4 << 30
back_max = 0
_BACK = """import mmap, sys
mmap.mmap(-1, int(sys.argv[1]), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE).close()
"""


def back_memory() -> None:
    """Touch free memory (up to ``back_max``, a quarter of what is available) in a child process that
    exits at once, so that the pages the next timed run allocates are backed by the host.

    A virtual machine with free page reporting (virtio-balloon; this one reports free blocks of
    2 MiB, ``/sys/module/page_reporting/parameters/page_reporting_order`` = 9) hands memory that
    stays free for about 2 s back to its host. The next page allocated there is then a fault in
    the host as well: a run that allocates a lot of memory or page cache pays that, and by how
    much depends on what the machine did a few seconds before. Measured with benchmark 4's curl,
    runs interleaved: 2.0-3.1 s for its gigabyte without this, 0.83-1.48 s with 1.5 GiB touched
    first, 0.62-1.03 s with 4 GiB. Every timed run gets the same, baselines included, so the
    ratios compare the programs, not the host's bookkeeping. Elsewhere it costs a moment."""
    if not back_max or not hasattr(mmap, "MAP_POPULATE"):
        return
    try:
        with open("/proc/meminfo") as fh:
            available = next(int(line.split()[1]) << 10 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    size = min(back_max, available // 4)
    if size > 0:
        subprocess.run([sys.executable, "-c", _BACK, str(size)], check=True)


def run_result(m: Measured) -> dict[str, Any]:
    """The mirror's RunResult from a ``sync --json`` run ({} if this build prints none)."""
    try:
        doc = json.loads(m.stdout)
        result = (doc.get("mirrors") or [{}])[0]
    except (ValueError, AttributeError, IndexError, TypeError):
        return {}
    return result if isinstance(result, dict) else {}


class _TreeSampler:
    """Polls the summed RSS of a process and all its descendants (from /proc) every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _tree_rss_kib(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def best_of(runs: int, cmd: Sequence[str], *, warming: Path | None = None, **kwargs: Any) -> Measured:
    """The fastest of ``runs`` runs (the least disturbed by the rest of the machine); ``warming``:
    a tree to :func:`warm` before each."""
    results = []
    for _ in range(max(1, runs)):
        if warming is not None:
            warm(warming)
        results.append(measure(cmd, **kwargs))
    return min(results, key=lambda m: m.wall)


@dataclass
class Mirrorgen:
    """How to run one build of mirrorgen: this checkout, or an older revision (``--before``)."""

    label: str
    pythonpath: Path

    def cmd(self, *args: str) -> list[str]:
        # -P: no current directory on sys.path, so PYTHONPATH decides which checkout is imported
        # (run from this checkout, "-c" would otherwise import it for the "before" build too).
        # What the build's ``mirrorgen`` console script runs: ``entry`` where it has one.
        return [sys.executable, "-P", "-c",
                "import sys, mirrorgen.cli as c; sys.exit(getattr(c, 'entry', c.main)())", *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.pythonpath), "NO_COLOR": "1", "TERM": "dumb"}

    def run(self, *args: str, **kwargs: Any) -> Measured:
        # In its own checkout: a build older than the fix in mirrorgen.workers starts its worker
        # processes with the current directory first on their path, and from this checkout they
        # would run this checkout's code.
        kwargs.setdefault("cwd", self.pythonpath)
        return measure(self.cmd(*args), env=self.env(), **kwargs)


@contextlib.contextmanager
def builds(before: str | None) -> Iterator[list[Mirrorgen]]:
    """This checkout, and with ``before`` also that git revision, checked out in a temporary
    worktree, so "before" and "after" are measured in one invocation on the same input."""
    current = Mirrorgen("now", REPO)
    if not before:
        _byte_compile(REPO)
        yield [current]
        return
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgen-before-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp / "src"), before],
                   check=True, capture_output=True)
    try:
        _byte_compile(tmp / "src", REPO)
        yield [Mirrorgen(f"before ({before})", tmp / "src"), current]
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "src")],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _byte_compile(*checkouts: Path) -> None:
    """Each checkout's modules compiled to ``__pycache__``, as ``pip install`` does: every build
    is timed as an installed one is. Run from a source tree with PYTHONDONTWRITEBYTECODE set (as
    this machine's environment has it), Python would otherwise compile every module again on
    every run, about 40 ms each time."""
    for checkout in checkouts:
        packages = [str(checkout / name) for name in ("mirrorgen", "proxy", "benchmarks")
                    if (checkout / name).is_dir()]
        subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True,
                       stdout=subprocess.DEVNULL)


# -- fresh output directories ----------------------------------------------------------------------
#
# A timed run writes into an empty directory, but the previous run's output is not deleted
# before it: it is moved aside and deleted when the benchmark ends. On ext4 a file created within
# a minute or so of many deletions nearby is slow: the inode allocator skips each recently deleted
# inode, reading its inode-table block, from the start of the group, for every new file
# (fs/ext4/ialloc.c, recently_deleted). Measured here: 28,500 creates took 2.1-2.4 s in a
# directory whose block group had just lost 100,000 files, 0.45 s elsewhere. A mirror's first
# sync does not follow a mass deletion, and neither should its benchmark; curl and conda-mirror
# get the same treatment.

_TRASH: list[Path] = []


def fresh(path: Path) -> None:
    """Make ``path`` absent (moved into a trash directory beside it, deleted by
    :func:`empty_trash` after each benchmark, or at exit), then flush every dirty page, so no run
    pays for another's writeback."""
    if path.exists() or path.is_symlink():
        trash = path.parent / ".bench-trash"
        trash.mkdir(exist_ok=True)
        if trash not in _TRASH:
            _TRASH.append(trash)
        os.rename(path, trash / f"{path.name}-{time.time_ns()}")
    os.sync()


def warm(top: Path) -> None:
    """Read every file under ``top`` (an upstream tree) once, right before a timed run, so that
    nginx serves all of it from the page cache whoever is timed. This machine runs DAMON with a
    "pageout" scheme (``/sys/kernel/mm/damon/admin/kdamonds/0``: memory not touched for about 60
    s is reclaimed, page cache included), so files read a minute earlier may be back on disk:
    nginx, one worker, then waits for a disk read in the middle of the run (seen: 1,364
    read-ahead requests from nginx in one mirrorgen run of benchmark 2)."""
    for directory, _, files in os.walk(top):
        for name in files:
            with open(os.path.join(directory, name), "rb", buffering=0) as fh:
                while fh.read(1 << 20):
                    pass


# How long ext4 treats a deleted inode as recently deleted (RECENTCY_MIN, fs/ext4/ialloc.c), and a bit.
RECENTLY_DELETED_S = 65


def empty_trash() -> bool:
    """Delete what :func:`fresh` moved aside (after each benchmark); whether there was any."""
    emptied = bool(_TRASH)
    while _TRASH:
        shutil.rmtree(_TRASH.pop(), ignore_errors=True)
    return emptied


atexit.register(empty_trash)


def write_config(path: Path, root: Path, mirrors: dict[str, dict[str, Any]]) -> Path:
    listed = [{"name": name, **mirror} for name, mirror in mirrors.items()]
    path.write_text(yaml.safe_dump({"root": str(root), "mirrors": listed}, sort_keys=False))
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


@dataclass
class Table:
    """Rows of results, printed as a fixed-width table and kept for the JSON summary."""

    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def render(self) -> str:
        if not self.rows:
            return f"## {self.title}\n(no rows)\n"
        cols = list(dict.fromkeys(k for row in self.rows for k in row))
        cells = [[_fmt(row.get(c, "")) for c in cols] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = [f"## {self.title}", "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def mib(n: int) -> float:
    return n / 2**20


@contextlib.contextmanager
def serve(root: Path, workdir: Path, *, access_log: bool = False) -> Iterator[str]:
    """A real nginx serving ``root`` on loopback (the same server the tests use); its base URL.

    nginx, not an in-process Python server, so the upstream is never the bottleneck and every
    client (mirrorgen, curl, conda-mirror) meets the same server."""
    with serve_nginx(root, workdir, access_log=access_log) as server:
        yield server.base_url


@contextlib.contextmanager
def serve_nginx(root: Path, workdir: Path, *, access_log: bool = False) -> Iterator[Any]:
    """:func:`serve`, yielding the running server itself (``tests.support.nginx.NginxServer``:
    ``base_url``, ``access_log`` path), for benchmarks that count what a client requested."""
    from tests.support.nginx import free_port, run_nginx

    port = free_port()
    log = "" if access_log else "access_log off;"
    block = (f"server {{ listen 127.0.0.1:{port}; root {root}; {log} "
             f"sendfile on; tcp_nopush on; keepalive_requests 100000; }}")
    workdir.mkdir(parents=True, exist_ok=True)
    with run_nginx(block, workdir) as server:
        yield server


@dataclass
class Request:
    method: str
    path: str
    status: int
    body_bytes: int   # nginx's $body_bytes_sent: the response body, headers not counted


def access_log_since(log: Path, offset: int, *, settle: float = 0.2) -> list[Request]:
    """Requests nginx logged (combined format) after byte ``offset`` of its access log.

    nginx writes a line just after it sends the response, so a client that has exited may be a
    moment ahead of the log: wait until the log stops growing for ``settle`` seconds."""
    size = -1
    while True:
        now = log.stat().st_size if log.exists() else 0
        if now == size:
            break
        size = now
        time.sleep(settle)
    if size <= offset:
        return []
    with open(log, "rb") as fh:
        fh.seek(offset)
        text = fh.read(size - offset).decode(errors="replace")
    out = []
    for line in text.splitlines():
        try:
            _, request, rest = line.split('"', 2)
            method, path, _proto = request.split(" ", 2)
            status, sent = rest.split()[:2]
            out.append(Request(method, path, int(status), int(sent) if sent != "-" else 0))
        except ValueError:
            continue
    return out


def log_size(log: Path) -> int:
    """Where the access log ends now: pass it to :func:`access_log_since` after a run."""
    return log.stat().st_size if log.exists() else 0
