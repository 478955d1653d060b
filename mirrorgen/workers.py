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

import gc
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Final, cast

import msgpack

from .errors import UnusableRecord
from .fdio import write_all

__all__ = ["WorkerPool", "JOBS"]

_HEADER: Final = struct.Struct("<Q")


def _encode_shards(task: list[bytes]) -> list[bytes]:
    from .conda.shards import encode_shard_sources

    return encode_shard_sources(task)


def _write_shards(task: list[bytes]) -> list[bytes]:
    """``task``: a header (the directory, NUL, the file name prefix), then shard sources."""
    from .conda.shards import write_shard_files

    directory, _, prefix = task[0].partition(b"\0")
    return write_shard_files(directory, prefix.decode(), task[1:])


# What a worker can be asked to do, by name (a child never unpickles code).
JOBS: Final[dict[str, Callable[[list[bytes]], list[bytes]]]] = {
    "encode_shards": _encode_shards, "write_shards": _write_shards}


def _send(fd: int, message: object) -> None:
    """One framed message onto the pipe ``fd``, every byte of it. Not through a BufferedWriter:
    a write to a pipe that a signal interrupts (a stop and continue: Ctrl-Z then fg, a debugger,
    a profiler) returns short, and CPython's BufferedWriter has been seen to drop the rest of the
    message and go on with the next one, which desynchronises the framing for good."""
    data = msgpack.packb(message, use_bin_type=True)
    write_all(fd, _HEADER.pack(len(data)))
    write_all(fd, data)


def _read_exact(stream: IO[bytes], size: int) -> bytearray | None:
    """``size`` bytes from the unbuffered ``stream``, or None if it ends first (a read from a
    pipe returns what is there, short of ``size`` when a signal interrupts it)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            return None
        got += n
    return buf


def _receive(stream: IO[bytes]) -> object | None:
    """The next message from the unbuffered ``stream``, or None at its end."""
    header = _read_exact(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read_exact(stream, size)
    if data is None:
        return None
    message: object = msgpack.unpackb(data, raw=False)
    return message


class WorkerError(RuntimeError):
    pass


def _child_command() -> tuple[list[str], dict[str, str]]:
    """How to start a worker that runs this very copy of mirrorgen: its parent directory first
    on the child's path, and -P, so that neither the current directory (another checkout, say)
    nor an installed copy is imported instead."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}
    return [sys.executable, "-P", "-m", "mirrorgen.workers"], env


class WorkerPool:
    def __init__(self, workers: int) -> None:
        command, env = _child_command()
        # Unbuffered pipes: each message is written and read whole by _send and _receive.
        self.procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                       bufsize=0)
                      for _ in range(max(1, workers))]
        # A thread per worker reads its replies as soon as they come, so a worker never waits
        # for the consumer of the results to hand it its next task.
        self._replies: list[queue.SimpleQueue[object | None]] = [queue.SimpleQueue() for _ in self.procs]
        self._readers = [threading.Thread(target=self._read, args=(p, q), daemon=True)
                         for p, q in zip(self.procs, self._replies)]
        for thread in self._readers:
            thread.start()

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], replies: queue.SimpleQueue[object | None]) -> None:
        assert proc.stdout is not None
        while True:
            try:
                reply = _receive(proc.stdout)  # blocks in read(), outside the GIL
            except Exception as exc:  # not a message: the consumer raises, it does not wait forever
                replies.put(WorkerError(f"worker process {proc.pid} sent a malformed reply: {exc}"))
                replies.put(None)
                return
            replies.put(reply)
            if reply is None:  # the worker is gone
                return

    def map(self, job: str, tasks: Iterable[list[bytes]], *, depth: int = 4) -> Iterator[list[bytes]]:
        """Results in task order. Tasks go round-robin, up to ``depth`` per worker outstanding.
        Nobody waits on anybody else: ``tasks`` is drawn on a thread of its own (making a task
        overlaps with using the results), a thread per worker writes its tasks, and a thread per
        worker reads its replies as they come, held until their turn. A map left before its end
        leaves replies behind: the pool is then good only for :meth:`close`."""
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}")
        queues: list[queue.Queue[list[bytes] | None]] = [queue.Queue() for _ in self.procs]
        order: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
        slots = threading.Semaphore(depth * len(self.procs))
        stop = threading.Event()
        failed: list[BaseException] = []

        def feed(proc: subprocess.Popen[bytes], tasks_for: queue.Queue[list[bytes] | None]) -> None:
            assert proc.stdin is not None
            while (task := tasks_for.get()) is not None:
                try:
                    _send(proc.stdin.fileno(), [job, task])
                except OSError as exc:
                    failed.append(exc)
                    return

        def dispatch() -> None:
            try:
                for number, task in enumerate(tasks):
                    while not slots.acquire(timeout=0.05):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    worker = number % len(self.procs)
                    queues[worker].put(task)
                    order.put(worker)
            except BaseException as exc:  # making a task failed: the consumer raises it
                order.put(exc)
            finally:
                order.put(None)

        threads = [threading.Thread(target=feed, args=(p, q), daemon=True) for p, q in zip(self.procs, queues)]
        dispatcher = threading.Thread(target=dispatch, daemon=True)
        for thread in (*threads, dispatcher):
            thread.start()
        try:
            while (item := order.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                result = self._result(item)
                slots.release()
                yield result
        finally:
            stop.set()
            dispatcher.join()
            for q in queues:
                q.put(None)
            for thread in threads:
                thread.join(timeout=10)
        if failed:
            raise WorkerError(f"writing to a worker process failed: {failed[0]}")

    def _result(self, worker: int) -> list[bytes]:
        proc = self.procs[worker]
        reply = self._replies[worker].get()
        if isinstance(reply, WorkerError):
            self._replies[worker].put(None)  # nothing more will come from it
            raise reply
        if reply is None:
            self._replies[worker].put(None)  # it stays gone
        if not isinstance(reply, list) or len(reply) != 2:
            raise WorkerError(f"worker process {proc.pid} exited (code {proc.poll()})")
        status, value = reply
        if status == "unusable":
            raise UnusableRecord(*value)
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
        for thread in self._readers:
            thread.join(timeout=10)  # each sees its worker's end of output
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    """The child: read [job, task] messages until end of input, answer each in turn."""
    stdin = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    stdout = sys.stdout.fileno()
    sys.stdout = sys.stderr  # a stray print() must not land in the middle of a reply
    # A job's objects (decoded JSON, bytes) hold no cycles and are freed by reference counting
    # when its task ends; the collector would only walk them, over and over (shard encoding:
    # about 5% of its time, measured at conda-forge scale).
    gc.disable()
    while True:
        message = _receive(stdin)
        if message is None:
            return 0
        job, task = cast("list[Any]", message)  # [job name, task], as the parent's _send wrote it
        try:
            _send(stdout, ["ok", JOBS[job](task)])
        except UnusableRecord as exc:  # a record no client could read: the parent leaves it out
            _send(stdout, ["unusable", [exc.fn, exc.reason]])
        except Exception as exc:  # reported to the parent, which raises it there
            _send(stdout, ["error", f"{type(exc).__name__}: {exc}"])


if __name__ == "__main__":
    # Every reply is written (unbuffered) and every file a job made is closed: nothing is left
    # to flush, so the worker ends without freeing its heap object by object, which the parent's
    # close() would wait for (about 15 ms, at the end of each index it writes).
    code = main()
    sys.stderr.flush()
    os._exit(code)
