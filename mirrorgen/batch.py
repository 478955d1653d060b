"""One :meth:`mirrorgen.transport.Transport.fetch_many` as the download threads see it: the
requests (:class:`FetchRequest`), their shared state (:class:`Batch`: which thread takes which
file, the outcomes, the wake-ups), and each download in progress (:class:`Job`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .errors import MirrorError
from .groupcommit import Staged
from .sink import Hasher
from .store import Store

__all__ = ["Batch", "Job", "FetchRequest", "Retry", "Cancelled", "RETRY_STATUS", "MAX_BACKOFF",
           "SMALL_FILE", "PIPELINE_SMALL", "PIPELINE_LARGE"]

RETRY_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF: Final = 30.0
# Files up to this size go to the first download thread, which sends up to PIPELINE_SMALL
# requests ahead of the response it is reading; larger ones to every thread, PIPELINE_LARGE
# ahead. See Batch.take.
SMALL_FILE: Final = 64 << 10
PIPELINE_SMALL: Final = 32
PIPELINE_LARGE: Final = 1
# A thread wakes the loop (mirrorgen.transport, fetch_many) when this many outcomes wait.
_WAKE_AFTER: Final = 256


class Retry(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """One file for :meth:`Transport.fetch_many`; ``key`` is the caller's, handed back."""
    key: Any
    url: str
    final: Path | str
    size: int | None
    sha256: str | None
    md5: str | None


class Batch:
    """The shared state of one :meth:`Transport.fetch_many`: the requests left, the outcomes
    done, and how the threads wake the loop (once per batch of outcomes, not once per file)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: Iterable[FetchRequest],
                 store: Store, retries: int, backoff: float) -> None:
        self.loop, self.store = loop, store
        self.small: deque[FetchRequest] = deque()
        self.large: deque[FetchRequest] = deque()
        for request in requests:
            small = request.size is not None and request.size <= SMALL_FILE
            (self.small if small else self.large).append(request)
        self.count = len(self.small) + len(self.large)
        # Set when an upstream would not take pipelined requests: small files are then shared
        # by every thread, each round trip carrying one.
        self.unpipelined = False
        self.retries, self.backoff = retries, backoff
        self.outcomes: deque[tuple[FetchRequest, Staged | MirrorError]] = deque()
        self.ready = asyncio.Event()
        self.woken = False
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self.jobs: set[Job] = set()

    def take(self, first: bool, held: int = 0) -> FetchRequest | None:
        """The next request for a thread that holds ``held`` requests taken ahead; None when
        there is none for it.

        Small files go to the first thread, up to PIPELINE_SMALL at a time: a file of a few
        kilobytes costs far less than a round trip to fetch, and more threads at it would mostly
        contend for the GIL (measured: 20,000 files of 4.5 KB took 0.74 s in one thread, 1.2 s
        in two). Large files, which hashing and writing keep busy outside the GIL, go to every
        thread, PIPELINE_LARGE at a time, so that no thread sits on files the others could
        fetch. deque.popleft is atomic: no lock."""
        if first or self.unpipelined:
            with contextlib.suppress(IndexError):
                return self.small.popleft()
        if held >= PIPELINE_LARGE:
            return None
        try:
            return self.large.popleft()
        except IndexError:
            return None

    def deliver(self, request: FetchRequest, outcome: Staged | MirrorError) -> None:
        """From a thread: one outcome; the loop is woken when _WAKE_AFTER are waiting (unless a
        wake-up is on its way), else it comes for them within _POLL seconds."""
        self.outcomes.append((request, outcome))
        if not self.woken and len(self.outcomes) >= _WAKE_AFTER:
            self.woken = True
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the loop is closed: nobody will take it
                pass

    def stop(self) -> None:
        self.stopped.set()
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel()

    def started(self, job: Job) -> None:
        with self._lock:
            self.jobs.add(job)
        if self.stopped.is_set():
            job.cancel()

    def ended(self, job: Job) -> None:
        with self._lock:
            self.jobs.discard(job)

    def pause(self, attempt: int) -> bool:
        """Sleep before retry ``attempt`` (as Transport._backoff); False if stopped meanwhile."""
        delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF) * (0.5 + random.random() / 2)
        return not self.stopped.wait(delay)


class Job:
    """One download handed to a lane; ``cancel`` (from the loop) makes the lane drop it."""

    def __init__(self, url: str, final: Path | str | None, batch: Batch | None, size: int | None,
                 hasher: Hasher | None) -> None:
        self.url, self.final, self.batch, self.size, self.hasher = url, final, batch, size, hasher
        self.cancelled = False
        self.sock: socket.socket | None = None

    def cancel(self) -> None:
        self.cancelled = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread if it is waiting on upstream


class Cancelled(Exception):
    pass
