"""The machine's own limits for an active sync, measured beside benchmarks 2 and 4.

An active mirror must receive every file, check its sha256, and make it durable before the index
that names it is published. Each of those needs a resource that curl's baseline uses less of or
not at all (curl checks nothing and leaves its files in the page cache). Two floors, each one
doing a single part of the job with nothing else in the way, show what is left for the rest:

- ``receive``: ``threads`` Python threads, each on one kept-alive HTTP/1.1 connection, fetch the
  listed files from the same nginx one after another and check each file's sha256 (the bytes
  received straight into a buffer, hashed there, and dropped). No file is written, no index made.
  This is as little as a Python client can do per file and per byte, and it is what mirrorgen's
  download threads do before they write.
- ``fetch``: ``receive``, and each file written as it arrives into a new file under ROOT, through
  the page cache; then the filesystem synced. A mirror without an index, atomic names or a
  record of what it holds: used for benchmark 2's small files, where per-file costs rule.
- ``write``: ``threads`` threads write the listed sizes (bytes from memory, no network) into new
  files the way mirrorgen writes its downloads (a file of 16 KiB or more in whole 4 KiB blocks
  with O_DIRECT from a page-aligned buffer and its last partial block through the page cache, a
  smaller one through the page cache), then sync the filesystem: the time the disk takes to hold
  these bytes durably.
- ``both``: ``receive`` and ``write`` at once, each in a process of its own, so they share the
  two cores and the disk but no interpreter: how long the machine takes to receive, check and
  durably write these bytes when the two parts overlap as well as they can. A client doing the
  whole job also pays for its start-up and its index.

Run as a child process, like every measured command (its own interpreter start-up included)::

    python -m benchmarks.floors receive BASE_URL LIST THREADS
    python -m benchmarks.floors write ROOT LIST THREADS
    python -m benchmarks.floors fetch BASE_URL,ROOT LIST THREADS
    python -m benchmarks.floors both BASE_URL,ROOT LIST THREADS

LIST is a JSON file of ``[relpath, size, sha256]`` triples. Exit status 1 if a file's size or
sha256 is not what LIST says.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from .common import Measured

BUFFER: Final = 1 << 20
BLOCK: Final = 4096
_LENGTH: Final = re.compile(rb"(?i)\r\ncontent-length:[ \t]*(\d+)")
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)
_NEW: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL
# As mirrorgen.sink's: smaller downloads are written buffered. The floors import nothing of
# mirrorgen (its store's write_direct included), so a floor's child starts as a bare interpreter.
_DIRECT_MIN: Final = 16 << 10

File = tuple[str, int, str]           # relpath, size, sha256
Take = Callable[[], "File | None"]    # the next file to handle, or None: all taken


def channel_files(upstream: Path, subdirs: Sequence[str]) -> list[File]:
    """Every package file the channel at ``upstream`` lists in ``subdirs``, as ``(relpath, size,
    sha256)``, sorted."""
    files = []
    for subdir in subdirs:
        doc = orjson.loads((upstream / subdir / "repodata.json").read_bytes())
        for key in ("packages", "packages.conda"):
            for fn, record in (doc.get(key) or {}).items():
                files.append((f"{subdir}/{fn}", record["size"], record["sha256"]))
    return sorted(files)


def listing(upstream: Path, subdirs: Sequence[str], out: Path) -> list[File]:
    """:func:`channel_files`, also written to ``out``: the LIST file for :func:`main`."""
    files = channel_files(upstream, subdirs)
    out.write_bytes(orjson.dumps(files))
    return files


def measure_floor(what: str, where: str | Path, listed: Path, threads: int) -> Measured:
    """One run of a floor, as a child process (see the module's docstring). The harness is
    imported here, not at the top: the child imports this module, and nothing more than it needs."""
    from .common import REPO, measure

    return measure([sys.executable, "-P", "-m", "benchmarks.floors", what, str(where), str(listed),
                    str(threads)], env={**os.environ, "PYTHONPATH": str(REPO)})


def best_floor(what: str, listed: Path, threads: Sequence[int], repeat: int, *, upstream: Path,
               base_url: str = "", root: Path | None = None) -> tuple[Measured, int]:
    """The fastest of ``repeat`` runs of floor ``what`` with each thread count in ``threads``
    (the floor is the best way found, so each is tried), and its thread count. ``upstream``'s
    files are read before each run and ``root`` made absent, as before every timed run."""
    from .common import fresh, warm

    best: tuple[Measured, int] | None = None
    for _ in range(max(1, repeat)):
        for n in threads:
            warm(upstream)
            if root is not None:
                fresh(root)
            assert (root is None) == (what == "receive"), "receive writes nothing; the others need a root"
            where = {"receive": base_url, "write": str(root)}.get(what, f"{base_url},{root}")
            m = measure_floor(what, where, listed, n)
            if best is None or m.wall < best[0].wall:
                best = (m, n)
    assert best is not None
    if root is not None:
        fresh(root)
    return best


def _share(files: list[File], threads: int, work: Callable[[Take, list[str]], None]) -> list[str]:
    """Run ``work(take, errors)`` on ``threads`` threads, each taking files off one shared queue
    (``take()``: the next file, or None); the errors they collected."""
    queue = list(reversed(files))
    lock = threading.Lock()
    errors: list[str] = []

    def take() -> File | None:
        with lock:
            return queue.pop() if queue else None

    def run() -> None:
        try:
            work(take, errors)
        except Exception as exc:  # noqa: BLE001 - reported as a failure of the floor's run
            errors.append(f"{type(exc).__name__}: {exc}")

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return errors


def receive(base_url: str, files: list[File], threads: int,
            root: Path | None = None) -> list[str]:
    """Fetch and sha256-check every file of ``files`` from ``base_url`` (plain http), and with
    ``root`` write each under it, then sync; errors."""
    if root is not None:
        _make_dirs(root, files)
    url = urlsplit(base_url)
    host, port, prefix = url.hostname or "127.0.0.1", url.port or 80, url.path.rstrip("/")

    def work(take: Take, errors: list[str]) -> None:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(mmap.mmap(-1, BUFFER))
        head = bytearray()
        try:
            while (item := take()) is not None:
                relpath, size, sha256 = item
                sock.sendall(b"GET %s/%s HTTP/1.1\r\nHost: %s\r\n\r\n"
                             % (prefix.encode(), relpath.encode(), host.encode()))
                while (end := head.find(b"\r\n\r\n")) < 0:
                    n = sock.recv_into(buf)
                    if not n:
                        raise ConnectionError("connection closed before the headers")
                    head += buf[:n]
                match = _LENGTH.search(head, 0, end + 2)
                if not head.startswith(b"HTTP/1.1 200") or match is None:
                    raise ConnectionError(f"{relpath}: {bytes(head[:end]).splitlines()[0]!r}")
                left = int(match.group(1))
                digest = hashlib.sha256()
                fd = -1 if root is None else os.open(root / relpath, _NEW, 0o644)
                try:
                    body = head[end + 4:end + 4 + left]
                    digest.update(body)
                    if fd >= 0:
                        os.write(fd, body)
                    left -= len(body)
                    del head[:end + 4 + len(body)]  # what is left is the next response's
                    while left:
                        n = sock.recv_into(buf, min(left, BUFFER))
                        if not n:
                            raise ConnectionError(f"{relpath}: connection closed mid-body")
                        digest.update(buf[:n])
                        if fd >= 0:
                            os.write(fd, buf[:n])
                        left -= n
                finally:
                    if fd >= 0:
                        os.close(fd)
                if digest.hexdigest() != sha256:
                    errors.append(f"{relpath}: sha256 mismatch")
        finally:
            sock.close()

    errors = _share(files, threads, work)
    if root is not None:
        os.sync()
    return errors


def _make_dirs(root: Path, files: list[File]) -> None:
    for parent in {os.path.dirname(relpath) for relpath, _, _ in files}:
        (root / parent).mkdir(parents=True, exist_ok=True)


def write(root: Path, files: list[File], threads: int) -> list[str]:
    """Write every file's size in bytes under ``root`` (as mirrorgen writes a download), then
    sync; errors."""
    _make_dirs(root, files)

    def work(take: Take, errors: list[str]) -> None:
        buf = memoryview(mmap.mmap(-1, BUFFER))
        buf[:] = os.urandom(BUFFER)
        while (item := take()) is not None:
            relpath, size, _ = item
            direct = _O_DIRECT if size >= _DIRECT_MIN else 0
            fd = os.open(root / relpath, _NEW | direct, 0o644)
            try:
                left = size
                while direct and left >= BLOCK:
                    left -= os.write(fd, buf[:min(left, BUFFER) // BLOCK * BLOCK])
                if direct and left:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                while left:
                    left -= os.write(fd, buf[:min(left, BUFFER)])
                if os.fstat(fd).st_size != size:
                    errors.append(f"{relpath}: wrote {os.fstat(fd).st_size} of {size} bytes")
            finally:
                os.close(fd)

    errors = _share(files, threads, work)
    os.sync()
    return errors


def both(base_url: str, root: Path, listed: str, threads: str) -> int:
    """``receive`` and ``write`` run at once, each as a child process (see the module's
    docstring); 1 if either failed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    children = [subprocess.Popen([sys.executable, "-P", "-m", "benchmarks.floors", what, where,
                                  listed, threads], env=env)
                for what, where in (("receive", base_url), ("write", str(root)))]
    codes = [child.wait() for child in children]
    return 1 if any(codes) else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] not in ("receive", "write", "fetch", "both"):
        print(__doc__.split("\n\n")[-2], file=sys.stderr)
        return 2
    what, where, listed, threads = args
    if what == "both":
        base_url, root = where.split(",", 1)
        return both(base_url, Path(root), listed, threads)
    files: list[File] = [(relpath, size, sha256)
                         for relpath, size, sha256 in orjson.loads(Path(listed).read_bytes())]
    if what == "receive":
        errors = receive(where, files, int(threads))
    elif what == "write":
        errors = write(Path(where), files, int(threads))
    else:
        base_url, root = where.split(",", 1)
        errors = receive(base_url, files, int(threads), Path(root))
    for error in errors[:10]:
        print(f"floors {what}: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
