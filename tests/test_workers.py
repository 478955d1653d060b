"""The worker processes' pipe protocol under real signals: a stopped and continued process
(Ctrl-Z then fg, a debugger, a sampling profiler) makes writes to a pipe return short, and a
message must still arrive whole, or the run must fail, never hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mirrorgen import workers
from mirrorgen.workers import WorkerError, WorkerPool, _receive

# A child that sends numbered messages of 200 KB to 3 MB (more than a pipe holds, so its writes
# block and a stop interrupts them part-way), through mirrorgen's own framing.
_SENDER = """
import sys
from mirrorgen.workers import _send
for i in range({count}):
    size = 200_000 + (i * 7919) % 2_800_000
    _send(sys.stdout.fileno(), [i, bytes([i % 251]) * size])
"""


def _stop_and_continue(pid: int, done: threading.Event) -> None:
    while not done.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.003)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        time.sleep(0.004)


def test_messages_arrive_whole_while_the_sender_is_stopped_and_continued() -> None:
    count = 300
    here = str(Path(workers.__file__).resolve().parents[1])
    child = subprocess.Popen([sys.executable, "-c", _SENDER.format(count=count)], stdout=subprocess.PIPE,
                             bufsize=0, env={**os.environ, "PYTHONPATH": here})
    done = threading.Event()
    stopper = threading.Thread(target=_stop_and_continue, args=(child.pid, done))
    stopper.start()
    try:
        got = []
        while (message := _receive(child.stdout)) is not None:  # type: ignore[arg-type]
            number, data = message  # type: ignore[misc]
            assert len(data) == 200_000 + (number * 7919) % 2_800_000
            whole = data.count(bytes([number % 251])) == len(data)
            assert whole, f"message {number} is not whole"
            got.append(number)
            time.sleep(0.001)  # a reader a little slower than the writer: its writes block
    finally:
        done.set()
        stopper.join()
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    assert got == list(range(count))


def test_a_malformed_reply_fails_the_map_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    # A reply whose frame holds bytes that are not msgpack (0xc1 is never used).
    script = ("import sys, os; os.write(1, (5).to_bytes(8, 'little') + b'\\xc1' * 5); "
              "sys.stdin.buffer.read()")
    monkeypatch.setattr(workers, "_child_command", lambda: ([sys.executable, "-c", script], dict(os.environ)))
    with WorkerPool(1) as pool, pytest.raises(WorkerError, match="malformed reply"):
        list(pool.map("encode_shards", [[b"[{},{},[]]"], [b"[{},{},[]]"]]))


def test_a_worker_that_prints_does_not_corrupt_its_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    # A job that prints (a library's stray output, say): its text goes to stderr, not into the
    # reply stream.
    script = ("import sys; from mirrorgen import workers; "
              "workers.JOBS['encode_shards'] = lambda task: (print('chatty'), task)[1]; "
              "sys.exit(workers.main())")
    here = str(Path(workers.__file__).resolve().parents[1])
    monkeypatch.setattr(workers, "_child_command",
                        lambda: ([sys.executable, "-c", script], {**os.environ, "PYTHONPATH": here}))
    with WorkerPool(1) as pool:
        assert list(pool.map("encode_shards", [[b"a"], [b"b"]])) == [[b"a"], [b"b"]]
