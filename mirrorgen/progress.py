"""Progress of long work: a rich progress bar on a terminal, plain log lines otherwise (SPEC §2)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress, TaskID

__all__ = ["Progress"]

_LOG_EVERY: Final = 10.0  # seconds between plain progress lines


class Progress:
    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.files_total = self.files_done = 0
        self.bytes_total = self.bytes_done = 0
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._last_log = 0.0
        self._start = time.monotonic()

    def start(self, files: int, nbytes: int) -> None:
        self.files_total, self.bytes_total = files, nbytes
        self._start = time.monotonic()
        if self.tty and files:
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                       TextColumn, TimeRemainingColumn, TransferSpeedColumn)

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TextColumn("{task.fields[files]}"), TransferSpeedColumn(), TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=nbytes or None, files=f"0/{files} files")
        elif self.enabled and files:
            self.log(f"{self.label}: {files} files, {nbytes} bytes to fetch")

    def advance(self, nbytes: int, files: int = 1) -> None:
        self.files_done += files
        self.bytes_done += nbytes
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=nbytes,
                             files=f"{self.files_done}/{self.files_total} files")
        elif self.enabled and time.monotonic() - self._last_log > _LOG_EVERY:
            self._last_log = time.monotonic()
            rate = self.bytes_done / max(time.monotonic() - self._start, 1e-6)
            self.log(f"{self.label}: {self.files_done}/{self.files_total} files, "
                     f"{self.bytes_done}/{self.bytes_total} bytes, {rate / 1e6:.1f} MB/s")

    def log(self, message: str) -> None:
        if self.enabled:
            if self._bar is not None:
                self._bar.console.print(message)
            else:
                print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
