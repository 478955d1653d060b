"""Reads a conda channel's indexes into :class:`CondaRecord` objects.

Per subdir it asks for ``repodata.json.zst`` first, then ``.bz2``, then the plain file (the order
conda and rattler prefer). A source is an http(s) URL, a file:// URL or a directory, and may carry
an anaconda.org token (``/t/<TOKEN>/``): the token is used to fetch and never written anywhere.
"""

from __future__ import annotations

import asyncio
import bz2
import io
import re
from sys import intern
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import orjson
import zstandard

from ..config import MirrorConfig
from ..errors import RepodataError, UpstreamError, one_line
from ..platforms import KNOWN_SUBDIRS
from ..transport import Transport
from ..urls import join_url, local_path, redact
from .record import CondaRecord, RepodataDocument, RepodataRecords

__all__ = ["CondaSource", "SubdirIndex", "ChannelIndex"]

# The three spellings upstream may serve, in the order we prefer them.
_VARIANTS: Final = (("repodata.json.zst", "zst"), ("repodata.json.bz2", "bz2"), ("repodata.json", "json"))
# name-version-build.ext: rattler refuses a whole index whose file names lack the two dashes.
_FILENAME_RE: Final = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_.+!~-]*-[A-Za-z0-9_.+!~]+-[A-Za-z0-9_.+!~]+\.(?:conda|tar\.bz2)")
_MAX_INDEX: Final = 4 << 30

_RECORD_DECODER: Final = msgspec.json.Decoder(CondaRecord)
_DOCUMENT_DECODER: Final = msgspec.json.Decoder(RepodataDocument)
_RECORDS_DECODER: Final = msgspec.json.Decoder(RepodataRecords)


@dataclass
class SubdirIndex:
    subdir: str
    records: list[CondaRecord] = field(default_factory=list)
    info: dict[str, msgspec.Raw] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # key -> why it cannot be mirrored
    fetched_from: list[str] = field(default_factory=list)   # redacted URLs


@dataclass
class ChannelIndex:
    subdirs: dict[str, SubdirIndex]
    channeldata: dict[str, Any] | None  # upstream's channeldata.json, if it has one

    def records(self) -> list[CondaRecord]:
        return [r for s in self.subdirs.values() for r in s.records]


class CondaSource:
    def __init__(self, mirror: MirrorConfig, transport: Transport) -> None:
        self.mirror, self.transport = mirror, transport

    async def read(self) -> ChannelIndex:
        subdirs = self.mirror.subdirs or await self._discover()
        indexes = {s: SubdirIndex(s) for s in subdirs}
        channeldata: dict[str, Any] | None = None
        for number, source in enumerate(self.mirror.sources):
            results = await asyncio.gather(*(self._read_subdir(source, number, s) for s in subdirs))
            for subdir, result in zip(subdirs, results):
                if result is not None:
                    _merge(indexes[subdir], result)
            if channeldata is None:
                channeldata = await self._channeldata(source)
        missing = [s for s, i in indexes.items() if not i.fetched_from and s != "noarch"]
        if missing:
            raise UpstreamError(redact(self.mirror.sources[0]),
                                f"has no repodata for subdir {missing[0]} (check 'subdirs')")
        return ChannelIndex(indexes, channeldata)

    async def _discover(self) -> tuple[str, ...]:
        """Every subdir upstream has: from channeldata.json, else by asking for each known one."""
        found: dict[str, None] = {"noarch": None}
        for source in self.mirror.sources:
            data = await self._channeldata(source)
            listed = data.get("subdirs") if isinstance(data, dict) else None
            if isinstance(listed, list) and listed:
                found.update(dict.fromkeys(s for s in listed if s in KNOWN_SUBDIRS))
                continue
            path = local_path(source)
            if path is not None:
                found.update(dict.fromkeys(sorted(
                    d.name for d in path.iterdir()
                    if d.name in KNOWN_SUBDIRS and any((d / v).exists() for v, _ in _VARIANTS))))
                continue
            probes = sorted(KNOWN_SUBDIRS - {"noarch"})
            # Every probe runs to its end (each bounded by its retries) before the first error,
            # if any, ends the run: none is left behind, still asking upstream.
            heads = await asyncio.gather(*(self._exists(join_url(source, s, "repodata.json")) for s in probes),
                                         return_exceptions=True)
            for answer in heads:
                if isinstance(answer, BaseException):
                    raise answer
            found.update(dict.fromkeys(s for s, ok in zip(probes, heads) if ok))
        return tuple(found)

    async def _exists(self, url: str) -> bool:
        return await self.transport.exists(url)

    async def _channeldata(self, source: str) -> dict[str, Any] | None:
        # Optional: a channel without channeldata.json is still a channel. But an upstream that
        # fails to answer (5xx after the retries, no connection) fails the run: taken for "none",
        # it would publish channeldata without upstream's descriptions, or make discovery guess.
        url = join_url(source, "channeldata.json")
        body = await self.transport.get(url, limit=1 << 30, optional=True)
        if body is None:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    async def _read_subdir(self, source: str, number: int, subdir: str) -> SubdirIndex | None:
        for name, kind in _VARIANTS:
            url = join_url(source, subdir, name)
            body = await self.transport.get(url, limit=_MAX_INDEX)
            if body is None:
                continue
            data = await asyncio.to_thread(_decompress, body, kind, url)
            return await asyncio.to_thread(parse_repodata, data, subdir, number, redact(url))
        return None


def _decompress(body: bytes, kind: str, url: str) -> bytes:
    try:
        if kind == "zst":
            # Streaming: upstream .zst files often have no content size in the frame header.
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
                out = bytearray()
                while chunk := reader.read(1 << 24):
                    out += chunk
                    if len(out) > _MAX_INDEX:
                        raise RepodataError(redact(url), "decompresses to more than 4 GiB")
                return bytes(out)
        if kind == "bz2":
            return bz2.decompress(body)
    except (zstandard.ZstdError, OSError, ValueError, EOFError) as exc:
        raise RepodataError(redact(url), f"cannot decompress: {exc}") from None
    return body


def parse_repodata(data: bytes, subdir: str, source: int, url: str) -> SubdirIndex:
    """Parse one repodata.json; records stay raw, with only the fields filters read decoded.

    Two passes over the bytes, both in msgspec's C code: one keeps every record as a raw slice of
    ``data``, the other decodes every record's few typed fields. Only when that second pass meets a
    malformed record does the slow path decode record by record, to reject just that one.
    """
    try:
        doc = _DOCUMENT_DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the second for bad UTF-8
        raise RepodataError(url, str(exc)) from None
    except RecursionError:
        raise RepodataError(url, "nested too deeply") from None
    try:
        typed: RepodataRecords | None = _RECORDS_DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        typed = None
    index = SubdirIndex(subdir, fetched_from=[url])
    info = doc.info if doc.info is not None else (doc.metadata or {})
    index.info = info
    index.removed = [r for r in doc.removed if isinstance(r, str) and _FILENAME_RE.fullmatch(r)]
    records, rejected, match = index.records, index.rejected, _FILENAME_RE.fullmatch
    lists_look_right = CondaRecord.lists_look_right
    prefix = f"{subdir}/"
    for is_conda, packages, decoded in (
            (False, doc.packages, typed.packages if typed else None),
            (True, doc.packages_conda, typed.packages_conda if typed else None)):
        for fn, raw in packages.items():
            if len(fn) > 255 or not match(fn):
                rejected[one_line(prefix + fn)] = "unsafe or unexpected file name"
                continue
            if fn.endswith(".conda") is not is_conda:  # one name in both maps would be two files
                rejected[prefix + fn] = ("a .tar.bz2 file listed under packages.conda" if is_conda
                                         else "a .conda file listed under packages")
                continue
            if decoded is not None:
                record = decoded[fn]
            else:
                try:
                    record = _RECORD_DECODER.decode(raw)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    rejected[prefix + fn] = f"malformed record: {exc}"
                    continue
                except RecursionError:
                    rejected[prefix + fn] = "malformed record: nested too deeply"
                    continue
            if not lists_look_right(record):
                rejected[prefix + fn] = "malformed record: depends/constrains is not a list"
                continue
            record.fn, record.raw = fn, raw
            # Names and licenses repeat across a channel's records: one string each, not one per
            # record (a sixth of a large subdir's memory).
            record.name = intern(record.name)
            if record.license is not None:
                record.license = intern(record.license)
            if record.license_family is not None:
                record.license_family = intern(record.license_family)
            record.channel_subdir, record.is_conda, record.source = subdir, is_conda, source
            records.append(record)
    return index


def _merge(into: SubdirIndex, new: SubdirIndex) -> None:
    """Several sources into one channel: the first source that lists a file name wins."""
    have = {r.fn for r in into.records}
    into.records.extend(r for r in new.records if r.fn not in have)
    for key, reason in new.rejected.items():
        into.rejected.setdefault(key, reason)
    if not into.info:
        into.info = new.info
    into.removed.extend(r for r in new.removed if r not in into.removed)
    into.fetched_from.extend(new.fetched_from)
