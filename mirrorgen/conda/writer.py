"""Turns kept records into a conda channel's index files.

Records are written byte for byte as upstream served them (``CondaRecord.raw``); only the envelope
is ours. ``info`` keeps upstream's keys except ``base_url`` (CEP-15): upstream's base_url would send
clients back to upstream for every package, and this channel serves its packages itself, next to
its repodata.json, so we write repodata_version 1 with no base_url.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson
import zstandard

from .record import CondaRecord
from .shards import encode_shard, encode_shard_index, shard_digest, shard_relpath

__all__ = ["RepodataFiles", "render_repodata", "render_channeldata", "compress_zst", "render_shards"]

ZSTD_LEVEL: Final = 3  # what conda-index and the naive baseline use; fast and ~10x smaller
# base_url would point clients back upstream; repodata_version is ours to set (top level, 1).
_DROPPED_INFO_KEYS: Final = frozenset({"base_url", "shards_base_url", "repodata_version"})
_ENCODER: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class RepodataFiles:
    """Everything one subdir publishes: relpath (inside the subdir) -> bytes."""

    repodata: bytes
    repodata_zst: bytes
    shard_index: bytes | None
    shards: dict[str, bytes]


def render_repodata(subdir: str, records: Iterable[CondaRecord], info: dict[str, msgspec.Raw],
                    removed: Sequence[str]) -> bytes:
    out_info: dict[str, Any] = {k: v for k, v in info.items() if k not in _DROPPED_INFO_KEYS}
    out_info["subdir"] = subdir
    tar, conda = [], []
    published = set()
    for record in sorted(records, key=lambda r: r.fn):
        published.add(record.fn)
        (conda if record.is_conda else tar).append(record)
    parts = [b'{"info":', _ENCODER.encode(out_info), b',"packages":{']
    parts.append(b",".join(orjson.dumps(r.fn) + b":" + bytes(r.raw) for r in tar))
    parts.append(b'},"packages.conda":{')
    parts.append(b",".join(orjson.dumps(r.fn) + b":" + bytes(r.raw) for r in conda))
    parts.append(b'},"removed":')
    # A file listed in `removed` is hidden by clients: never list one we publish.
    parts.append(orjson.dumps(sorted(set(removed) - published)))
    parts.append(b',"repodata_version":1}')
    return b"".join(parts)


def compress_zst(data: bytes) -> bytes:
    # threads=-1: compress on every core; the frame records the content size for clients.
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compress(data)


def render_shards(subdir: str, records: Iterable[CondaRecord], removed: Sequence[str]
                  ) -> tuple[bytes, dict[str, bytes]]:
    """CEP-16: one shard per package name, and the index naming each shard by its hash."""
    by_name: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = defaultdict(lambda: ({}, {}))
    for record in records:
        tar, conda = by_name[record.name]
        (conda if record.is_conda else tar)[record.fn] = bytes(record.raw)
    files: dict[str, bytes] = {}
    digests: dict[str, bytes] = {}
    for name in sorted(by_name):
        tar, conda = by_name[name]
        shard = encode_shard(tar, conda)
        digest = shard_digest(shard)
        digests[name] = digest
        files[shard_relpath(digest)] = shard
    return encode_shard_index(subdir, digests), files


def render_channeldata(subdirs: Sequence[str], kept: Iterable[CondaRecord],
                       upstream: dict[str, Any] | None) -> bytes:
    """channeldata.json for the kept packages: upstream's entry for each name where it has one,
    with ``subdirs`` and ``version`` narrowed to what this mirror publishes."""
    from .matchspec import conda_version

    up_packages = (upstream or {}).get("packages") if isinstance(upstream, dict) else None
    up_packages = up_packages if isinstance(up_packages, dict) else {}
    names: dict[str, dict[str, Any]] = {}
    for record in kept:
        entry = names.get(record.name)
        if entry is None:
            base = up_packages.get(record.name)
            entry = dict(base) if isinstance(base, dict) else {}
            entry["subdirs"] = set()
            entry["_best"] = None
            names[record.name] = entry
        entry["subdirs"].add(record.channel_subdir)
        version = conda_version(record.version)
        best = entry["_best"]
        if best is None or (version is not None and (best[0] is None or version > best[0])):
            entry["_best"] = (version, record)
    packages = {}
    for name in sorted(names):
        entry = names[name]
        _, best = entry.pop("_best")
        entry["subdirs"] = sorted(entry.pop("subdirs"))
        entry["version"] = best.version
        for key in ("license", "license_family"):
            value = getattr(best, key)
            if value is not None:
                entry.setdefault(key, value)
        if best.timestamp is not None:
            entry["timestamp"] = int(best.seconds or 0)
        packages[name] = entry
    doc = {"channeldata_version": 1, "packages": packages, "subdirs": sorted(subdirs)}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
