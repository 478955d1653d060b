"""Turns kept records into a conda channel's index files.

Records are written byte for byte as upstream served them (``CondaRecord.raw``); only the envelope
is ours. ``info`` keeps upstream's keys except ``base_url`` (CEP-15): upstream's base_url would send
clients back to upstream for every package, and this channel serves its packages itself, next to
its repodata.json, so we write repodata_version 1 with no base_url.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections import defaultdict
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import orjson

from ..workers import WorkerPool
from .record import CondaRecord
from .shards import (compress_shards, encode_shard_index, pack_shard_source,
                     records_source, shard_digest, shard_relpath, write_shard_files)

__all__ = ["Repodata", "ShardPlan", "ShardSet", "plan_shards", "render_repodata", "render_channeldata",
           "render_shards"]

# base_url would point clients back upstream; repodata_version is ours to set (top level, 1).
_DROPPED_INFO_KEYS: Final = frozenset({"base_url", "shards_base_url", "repodata_version"})
_ENCODER: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Repodata:
    """One subdir's repodata.json, not yet rendered: ``chunks()`` yields its bytes in pieces
    (never the whole 200 MB document at once) and ``size`` is their exact total, known up front
    so the .zst frame written while streaming records the content size, as clients expect."""

    head: bytes
    tar: list[CondaRecord]
    conda: list[CondaRecord]
    tail: bytes
    size: int

    def chunks(self, per_chunk: int = 4096) -> Iterator[bytes]:
        yield self.head
        for n, records in enumerate((self.tar, self.conda)):
            if n:
                yield b'},"packages.conda":{'
            for start in range(0, len(records), per_chunk):
                # File names are validated by the source ([A-Za-z0-9_.+!~-] only), so quoting
                # them needs no JSON escaping; raw records are buffers, joined without a copy.
                parts: list[Any] = []
                for record in records[start:start + per_chunk]:
                    parts += (b',"' if parts or start else b'"', record.fn.encode(), b'":', record.raw)
                yield b"".join(parts)
        yield self.tail

    def render(self) -> bytes:
        return b"".join(self.chunks())


def render_repodata(subdir: str, records: Iterable[CondaRecord], info: dict[str, msgspec.Raw],
                    removed: Sequence[str]) -> Repodata:
    out_info: dict[str, Any] = {k: v for k, v in info.items() if k not in _DROPPED_INFO_KEYS}
    out_info["subdir"] = subdir
    tar: list[CondaRecord] = []
    conda: list[CondaRecord] = []
    for record in sorted(records, key=_by_fn):
        (conda if record.is_conda else tar).append(record)
    # `removed` is short; the records are not: test each record against it, not the reverse.
    removed_set = set(removed)
    published = {r.fn for group in (tar, conda) for r in group if r.fn in removed_set}
    head = b'{"info":' + _ENCODER.encode(out_info) + b',"packages":{'
    # A file listed in `removed` is hidden by clients: never list one we publish.
    tail = b'},"removed":' + orjson.dumps(sorted(set(removed) - published)) + b',"repodata_version":1}'
    size = len(head) + len(tail) + len(b'},"packages.conda":{')
    for group in (tar, conda):
        # '"' fn '":' raw, and a comma between records
        size += sum(len(r.fn) + len(r.raw) for r in group) + 4 * len(group) - (1 if group else 0)
    return Repodata(head, tar, conda, tail, size)


_by_fn: Final = operator.attrgetter("fn")


# Part of every shard's content key: change it when encode_shard's output changes, and every
# shard is encoded afresh on the next run.
SHARD_ENCODING: Final = b"mirrorgen-cep16-v2"


@dataclass
class ShardSet:
    """One subdir's CEP-16 shards: the index, the shards not yet on disk, and the cache of
    name -> (content key, shard digest) that lets the next run skip every unchanged name."""

    index: bytes
    new: dict[str, bytes]                  # relpath inside the subdir -> shard bytes
    cache: dict[str, tuple[str, str]]      # name -> (content key hex, digest hex)
    encoded: int = 0
    reused: int = 0


@dataclass
class ShardPlan:
    """One subdir's shards, planned: every name's content key (a hash of its shard source,
    :func:`records_source`), the names whose shard from last run is still good, and the names to
    encode. :meth:`encode` yields the new shards as they are made, so they can be written while
    the rest are still being encoded; :meth:`index` comes after.

    A name last run did not publish (none in a first run) is encoded whatever its key, so its
    key is computed only when its source is built for the encoder: ``keys`` is complete once
    the new shards are all made (:attr:`complete`)."""

    subdir: str
    keys: dict[str, str]                                   # name -> content key hex (known so far)
    digests: dict[str, bytes]                              # name -> shard digest (known so far)
    misses: list[tuple[str, list[CondaRecord]]]            # names to encode, with their records
    reused: int = 0

    @property
    def complete(self) -> bool:
        """Whether every name's key is known (else some new shard is still to be made)."""
        return all(name in self.keys for name, _ in self.misses)

    @property
    def cache(self) -> dict[str, tuple[str, str]]:
        return {name: (self.keys[name], self.digests[name].hex()) for name in self.digests}

    def encode(self, workers: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(relpath inside the subdir, shard bytes) for each name to encode. When there are
        many records to encode (a first run), worker processes encode them on every core."""
        for (name, _), shard in zip(self.misses, _encode(self._sources(), self._workers(workers))):
            digest = shard_digest(shard)
            self.digests[name] = digest
            yield shard_relpath(digest), shard

    def write(self, directory: Path, prefix: str, workers: int | None = None) -> Iterator[tuple[str, Path]]:
        """:meth:`encode`, each new shard written to a temporary file in ``directory`` (the
        subdir's shards directory, which must exist) by the process that encodes it, worker
        or this one (:func:`write_shard_files`): (relpath inside the subdir, the temporary file)
        for each name to encode. The files are named ``prefix`` + their hex digest; the caller
        publishes them, or removes every ``prefix`` file if it gives up (a worker's files from
        results never taken are known only by that prefix)."""
        digests = _write(self._sources(), directory, prefix, self._workers(workers))
        for (name, _), digest in zip(self.misses, digests):
            self.digests[name] = digest
            yield shard_relpath(digest), directory / f"{prefix}{digest.hex()}"

    def _sources(self) -> Iterator[bytes]:
        for name, group in self.misses:
            source = records_source(group)
            if name not in self.keys:
                self.keys[name] = content_key(source)
            yield source

    def _workers(self, workers: int | None) -> int:
        if workers is not None:
            return workers
        count = sum(len(group) for _, group in self.misses)
        return _cores() if count >= POOL_MIN_RECORDS else 1

    def index(self) -> bytes:
        return encode_shard_index(self.subdir, {name: self.digests[name] for name in sorted(self.digests)})


def content_key(source: bytes) -> str:
    """A name's content key: its shard is a function of its shard source alone."""
    return hashlib.sha256(SHARD_ENCODING + b"\0" + source).hexdigest()


def plan_shards(subdir: str, records: Iterable[CondaRecord], *,
                cache: Mapping[str, Sequence[str]] | None = None,
                on_disk: Container[str] = frozenset()) -> ShardPlan:
    """CEP-16: one shard per package name, and the index naming each shard by its hash.

    Encoding a shard means decoding each record to turn its hex digests into bytes, the one
    costly step in the whole index build. A name whose records are byte-for-byte what they were
    last run (same content key) keeps last run's shard, provided that file is still ``on_disk``;
    only changed names are encoded again.

    ``records`` come from the source (see :func:`records_source`).
    """
    groups: dict[str, list[CondaRecord]] = defaultdict(list)
    for record in records:
        groups[record.name].append(record)
    cache = cache or {}
    plan = ShardPlan(subdir, {}, {}, [])
    for name in sorted(groups):
        group = sorted(groups[name], key=_by_fn)
        hit = cache.get(name)
        if hit is None:
            plan.misses.append((name, group))
            continue
        key = plan.keys[name] = content_key(records_source(group))
        if len(hit) == 2 and hit[0] == key and _is_sha256_hex(hit[1]) \
                and shard_relpath(bytes.fromhex(hit[1])) in on_disk:
            plan.digests[name] = bytes.fromhex(hit[1])
            plan.reused += 1
        else:
            plan.misses.append((name, group))
    # The names with the most records first: encoding one of those (tens of thousands of records
    # for some conda-forge names) is a task no other can share, and at the end of the list it
    # kept one worker busy while the other waited (about 1 s of a cold run). Where a shard lands
    # in the list changes nothing else: the index is keyed by name.
    plan.misses.sort(key=_by_size, reverse=True)
    return plan


def _by_size(miss: tuple[str, list[CondaRecord]]) -> int:
    return len(miss[1])


def render_shards(subdir: str, records: Iterable[CondaRecord], *,
                  cache: Mapping[str, Sequence[str]] | None = None,
                  on_disk: Container[str] = frozenset(), workers: int | None = None) -> ShardSet:
    """:func:`plan_shards` and every shard encoded, in one go."""
    plan = plan_shards(subdir, records, cache=cache, on_disk=on_disk)
    new = dict(plan.encode(workers))
    return ShardSet(plan.index(), new, plan.cache, encoded=len(plan.misses), reused=plan.reused)


# Below this many records to encode, starting worker processes costs more than it saves.
POOL_MIN_RECORDS: Final = 20_000
_TASK_BYTES: Final = 1 << 19  # about 512 KB of raw records per task: small, so workers stay small


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _encode(sources: Iterable[bytes], workers: int) -> Iterator[bytes]:
    """Shard files for ``sources`` (shard_source documents), in order.

    With one worker: packed here, compressed in batches by zstd's threads. With more: tasks of
    about 512 KB go to worker processes (mirrorgen.workers), a few in flight per worker, so the
    sources never all sit in memory at once.
    """
    if workers <= 1:
        batch: list[bytes] = []
        for source in sources:
            batch.append(pack_shard_source(source))
            if len(batch) >= 2048:
                yield from compress_shards(batch)
                batch = []
        yield from compress_shards(batch)
        return
    with WorkerPool(workers) as pool:
        for shards in pool.map("encode_shards", _tasks(sources, [])):
            yield from shards


def _tasks(sources: Iterable[bytes], first: list[bytes]) -> Iterator[list[bytes]]:
    """``sources`` in tasks of about _TASK_BYTES, each starting with ``first``."""
    task: list[bytes] = list(first)
    size = 0
    for source in sources:
        task.append(source)
        size += len(source)
        if size >= _TASK_BYTES:
            yield task
            task, size = list(first), 0
    if len(task) > len(first):
        yield task


def _write(sources: Iterable[bytes], directory: Path, prefix: str, workers: int) -> Iterator[bytes]:
    """Digests of the shards of ``sources``, in order, each written into ``directory`` by
    :func:`write_shard_files`: here with one worker, else in worker processes."""
    if workers <= 1:
        for task in _tasks(sources, []):
            yield from write_shard_files(directory, prefix, task)
        return
    header = os.fsencode(directory) + b"\0" + prefix.encode()  # what the "write_shards" job reads
    with WorkerPool(workers) as pool:
        for digests in pool.map("write_shards", _tasks(sources, [header])):
            yield from digests


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


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
        seconds = best.seconds
        if seconds is not None:
            entry["timestamp"] = int(seconds)
        packages[name] = entry
    doc = {"channeldata_version": 1, "packages": packages, "subdirs": sorted(subdirs)}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
