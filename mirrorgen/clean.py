"""``mirrorgen clean``: remove files the published, filtered index no longer lists (seed 001:
"anaconda-mirror clean --dry-run" shows what no longer matches; clean removes it)."""

from __future__ import annotations

from .config import MirrorConfig
from .manifest import Manifest
from .store import Store
from .sync import channel_for, stray_files

__all__ = ["clean_mirror"]


def clean_mirror(mirror: MirrorConfig, store: Store, *, dry_run: bool) -> list[str]:
    channel = channel_for(mirror)
    with store.lock(mirror.name):
        base = store.mirror_dir(mirror.name)
        if not any(base.glob("*/repodata.json")):
            return []  # nothing published yet: without an index, nothing can be called stray
        keep = set(channel.published_files(base))
        stray = stray_files(store, mirror, channel, keep)
        if dry_run:
            return stray
        manifest = Manifest(store, mirror.name).load()
        for relpath in stray:
            store.remove(base / relpath)
            manifest.discard(relpath)
        manifest.save()
        return stray
