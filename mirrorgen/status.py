"""``mirrorgen status``: per mirror, the state of its last run (seed 002: pending, running,
completed, failed, stopped), when it ran, its counts, and when the schedule runs it next."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from typing import Any

from .config import MIRROR_TYPES, MODES, Filters, MirrorConfig, valid_mirror_name
from .store import Store

__all__ = ["mirror_status", "mirrors_in_tree"]


def mirrors_in_tree(store: Store, file: str) -> tuple[MirrorConfig, ...]:
    """The mirrors a tree holds, for a configuration that gives only ``root`` (SPEC §3: verify
    and status need nothing else): each state directory under ``<root>/.mirrorgen/``, with the
    type and mode its runs recorded. A tree whose runs predate that record is read as what its
    files show (a conda channel), in active mode."""
    state_dir = store.state_dir()
    if not state_dir.is_dir():
        return ()
    mirrors = []
    for entry in sorted(state_dir.iterdir()):
        name = entry.name
        if not entry.is_dir() or not valid_mirror_name(name):
            continue
        recorded = {**(store.read_state(name, "report.json") or {}),
                    **(store.read_state(name, "status.json") or {})}
        mtype, mode = recorded.get("type"), recorded.get("mode", "active")
        if mtype is None and next(store.mirror_dir(name).glob("*/repodata.json"), None) is not None:
            mtype = "conda"
        if mtype in MIRROR_TYPES and mode in MODES:
            mirrors.append(MirrorConfig(name=name, type=mtype, mode=mode, sources=(), subdirs=None,
                                        filters=Filters(), file=file))
    return tuple(mirrors)


def _lock_held(store: Store, mirror: str) -> bool:
    path = store.state_dir(mirror) / "lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def mirror_status(mirror: MirrorConfig, store: Store) -> dict[str, Any]:
    status = store.read_state(mirror.name, "status.json") or {}
    state = status.get("state", "pending")
    if state == "running" and not _lock_held(store, mirror.name):
        # The run's process is gone without recording an end: it was killed.
        state = "stopped"
    next_run = None
    if mirror.schedule:
        from croniter import croniter

        next_run = croniter(mirror.schedule, dt.datetime.now(dt.timezone.utc)).get_next(dt.datetime).isoformat()
    return {"mirror": mirror.name, "type": mirror.type, "mode": mirror.mode, "state": state,
            "last_start": status.get("last_start"), "last_end": status.get("last_end"),
            "counts": status.get("counts"), "error": status.get("error"),
            "schedule": mirror.schedule, "next_run": next_run}
