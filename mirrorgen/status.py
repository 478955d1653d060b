"""``mirrorgen status``: per mirror, the state of its last run (seed 002: pending, running,
completed, failed, stopped), when it ran, its counts, and when the schedule runs it next."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from typing import Any

from .config import MirrorConfig
from .store import Store

__all__ = ["mirror_status"]


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
