"""Writes to raw file descriptors: the one loop the store, the download threads, the shard writer
and the worker processes share. A module of its own, importing nothing else of mirrorgen's, so a
worker process that needs it does not pay for importing the store."""

from __future__ import annotations

import os

__all__ = ["write_all"]


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Every byte of ``data`` written to ``fd`` (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
