"""``mirrorgen verify``: re-hash every file the published index lists; report missing, corrupt
and stray files. Unlike a sync, this trusts nothing: every byte is read again."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import MirrorConfig
from .store import Store, hash_file
from .sync import channel_for, stray_files

__all__ = ["VerifyResult", "verify_mirror"]


@dataclass
class VerifyResult:
    mirror: str
    checked: int = 0
    ok: int = 0
    missing: list[str] = field(default_factory=list)       # active: listed but not on disk
    not_fetched: int = 0                                    # passive: not yet requested by anyone
    corrupt: dict[str, str] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.missing or self.corrupt)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def _check(path: Path, record: dict[str, Any]) -> str | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    want_size = record.get("size")
    if isinstance(want_size, int) and size != want_size:
        return f"size {size}, index says {want_size}"
    sha256, md5 = record.get("sha256"), record.get("md5")
    got_sha, got_md5 = hash_file(path, md5=not sha256)
    if isinstance(sha256, str) and sha256:
        if got_sha != sha256.lower():
            return f"sha256 {got_sha}, index says {sha256}"
    elif isinstance(md5, str) and md5:
        if got_md5 != md5.lower():
            return f"md5 {got_md5}, index says {md5}"
    else:
        return "the index gives no hash to check against"
    return None


async def verify_mirror(mirror: MirrorConfig, store: Store) -> VerifyResult:
    channel = channel_for(mirror)
    base = store.mirror_dir(mirror.name)
    listed = channel.published_files(base)
    result = VerifyResult(mirror.name)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 2, 2)) as pool:
        futures = {}
        for relpath, record in listed.items():
            path = base / relpath
            if mirror.mode == "passive" and not path.exists():
                result.not_fetched += 1
                continue
            futures[relpath] = loop.run_in_executor(pool, _check, path, record)
        for relpath, future in futures.items():
            problem = await future
            result.checked += 1
            if problem is None:
                result.ok += 1
            elif problem == "missing":
                result.missing.append(relpath)
            else:
                result.corrupt[relpath] = problem
    result.stray = stray_files(store, mirror, channel, set(listed))
    return result
