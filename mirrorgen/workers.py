"""Worker processes for CPU-bound batch work that Python threads cannot share (the GIL).

``WorkerPool(n).map(job, tasks)`` runs ``job`` on each task in ``n`` child processes started as
``python -m mirrorgen.workers`` and yields the results in task order. A task and its result are
lists of bytes, framed with msgpack over the child's stdin/stdout.

Not :mod:`multiprocessing`: its spawn and forkserver methods re-import the parent's
``__main__``, which breaks any script that embeds mirrorgen without an ``if __name__`` guard,
and fork is unsafe in a process that has threads (the asyncio executor, uvloop). A plain child
process that imports only what a job needs has neither problem.
"""

from __future__ import annotations

import queue
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Final

import msgpack

__all__ = ["WorkerPool", "JOBS"]

_HEADER: Final = struct.Struct("<Q")


def _encode_shards(task: list[bytes]) -> list[bytes]:
    from .conda.shards import encode_shard_sources

    return encode_shard_sources(task)


# What a worker can be asked to do, by name (a child never unpickles code).
JOBS: Final[dict[str, Callable[[list[bytes]], list[bytes]]]] = {"encode_shards": _encode_shards}


def _send(stream: IO[bytes], message: object) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: IO[bytes]) -> object | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return msgpack.unpackb(data, raw=False)


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-m", "mirrorgen.workers"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE) for _ in range(max(1, workers))]

    def map(self, job: str, tasks: Iterable[list[bytes]], *, depth: int = 3) -> Iterator[list[bytes]]:
        """Results in task order. Tasks go round-robin, up to ``depth`` per worker outstanding;
        a thread per worker writes its tasks, so a worker busy writing a large result never
        waits for us while we wait to hand it its next task."""
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}")
        queues: list[queue.Queue[list[bytes] | None]] = [queue.Queue() for _ in self.procs]
        failed: list[BaseException] = []

        def feed(proc: subprocess.Popen[bytes], tasks_for: queue.Queue[list[bytes] | None]) -> None:
            assert proc.stdin is not None
            while (task := tasks_for.get()) is not None:
                try:
                    _send(proc.stdin, [job, task])
                except OSError as exc:
                    failed.append(exc)
                    return

        feeders = [threading.Thread(target=feed, args=(p, q), daemon=True) for p, q in zip(self.procs, queues)]
        for thread in feeders:
            thread.start()
        in_flight: deque[int] = deque()  # worker index of each outstanding task, oldest first
        try:
            for number, task in enumerate(tasks):
                if len(in_flight) >= depth * len(self.procs):
                    yield self._result(in_flight.popleft())
                worker = number % len(self.procs)
                queues[worker].put(task)
                in_flight.append(worker)
            while in_flight:
                yield self._result(in_flight.popleft())
        finally:
            for q in queues:
                q.put(None)
            for thread in feeders:
                thread.join(timeout=10)
        if failed:
            raise WorkerError(f"writing to a worker process failed: {failed[0]}")

    def _result(self, worker: int) -> list[bytes]:
        proc = self.procs[worker]
        assert proc.stdout is not None
        reply = _receive(proc.stdout)  # blocks in read(), outside the GIL
        if not isinstance(reply, list) or len(reply) != 2:
            raise WorkerError(f"worker process {proc.pid} exited (code {proc.poll()})")
        status, value = reply
        if status != "ok":
            raise WorkerError(f"worker process {proc.pid}: {value}")
        return list(value)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()  # end of input: the worker exits
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    """The child: read [job, task] messages until end of input, answer each in turn."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        message = _receive(stdin)
        if message is None:
            return 0
        job, task = message  # type: ignore[misc]
        try:
            _send(stdout, ["ok", JOBS[job](task)])
        except Exception as exc:  # reported to the parent, which raises it there
            _send(stdout, ["error", f"{type(exc).__name__}: {exc}"])


if __name__ == "__main__":
    sys.exit(main())
