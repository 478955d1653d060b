"""A conda channel as the sync runner sees it: where each file comes from, what it must hash to,
and which index files to publish, in which order (CEP-16 shards, then repodata.json.zst, then
repodata.json — the file clients read first goes last)."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from ..config import MirrorConfig
from ..errors import UnusableRecord
from ..manifest import hash_file
from ..transport import Transport
from ..urls import join_url
from .matchspec import CondaEcosystem
from .record import CondaRecord, FileFacts
from .shards import SHARDS_DIR
from .source import ChannelIndex, CondaSource
from .writer import ShardPlan, plan_shards, render_channeldata, render_repodata

__all__ = ["CondaChannel", "IndexFile", "Rendering"]

_PACKAGE_RE: Final = re.compile(r"\.(?:conda|tar\.bz2)\Z")


@dataclass(frozen=True, slots=True)
class IndexFile:
    relpath: str
    # bytes, or a document rendered while it is written (``.size`` and ``.chunks()``).
    data: Any
    # Content-addressed files (shards) never change once written: no need to rewrite them.
    immutable: bool = False
    # Also publish ``relpath + ".zst"``, compressed from the same bytes, renamed just before it.
    zst_twin: bool = False
    # ``data`` is a function giving the bytes, which can be called only once every new file
    # (Rendering.new) has been made: a shard index, which names each shard by its hash.
    after_new: bool = False
    # Written already, to this temporary file next to its final name (``data`` is None): a
    # shard its encoder wrote (render's ``temp_prefix``), for the caller to publish.
    staged: Path | None = None


@dataclass(frozen=True, slots=True)
class Rendering:
    """A channel's index files, as :meth:`CondaChannel.render` makes them.

    Publication order: every file of ``new`` (content-addressed shards, not on disk yet) is
    durable first; then ``files``, in their order. Making them need not follow that order:
    ``new`` can be pulled on another thread while ``files`` are written here, except those marked
    ``after_new``, whose content is known once ``new`` is exhausted.

    ``temp_dirs``: where ``new`` writes its temporary files (render's ``temp_prefix``), for the
    caller to sweep if publication fails after some were written but before they were yielded."""

    new: Iterator[IndexFile]
    files: Iterator[IndexFile]
    temp_dirs: tuple[Path, ...] = ()


# Part of every fingerprint: change it when the writer's output changes for the same input.
WRITER_VERSION: Final = b"mirrorgen-conda-writer-1"
# What a subdir ("" is the channel's top) publishes besides shards.
_PUBLISHED_NAMES: Final = {True: ("repodata_shards.msgpack.zst", "repodata.json.zst", "repodata.json"),
                           False: ("channeldata.json",)}


def _fingerprint(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _still_published(mirror_dir: Path | None, subdir: str, fingerprint: str, last: Any) -> bool:
    """Whether last run published exactly this (same fingerprint) and its files are untouched."""
    if mirror_dir is None or not isinstance(last, dict) or last.get("fingerprint") != fingerprint:
        return False
    files = last.get("files")
    if not isinstance(files, dict):
        return False
    for name in _PUBLISHED_NAMES[bool(subdir)]:
        recorded = files.get(name)
        try:
            st = os.stat(mirror_dir / subdir / name)
        except OSError:
            return False
        if recorded != [st.st_size, st.st_mtime_ns]:
            return False
    return True


def _found(problem: str | None) -> Callable[[], str | None]:
    """A check already made (the shard index is read to find the shards it names)."""
    return lambda: problem


def _json_problem(path: Path) -> str | None:
    try:
        orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return "missing"
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON ({exc})"
    return None


def _zst_twin_problem(repodata: Path) -> str | None:
    """Whether repodata.json.zst holds exactly repodata.json's bytes (compared by sha256, in
    pieces: a conda-forge repodata.json is hundreds of MB)."""
    import zstandard

    try:
        with open(repodata.with_name("repodata.json.zst"), "rb") as raw:
            digest = hashlib.sha256()
            with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                while chunk := reader.read(1 << 20):
                    digest.update(chunk)
    except FileNotFoundError:
        return "missing"
    except zstandard.ZstdError as exc:
        return f"not a zstd stream ({exc})"
    if digest.hexdigest() != hash_file(repodata, md5=False)[0]:
        return "does not decompress to repodata.json"
    return None


def _digest_problem(path: Path, sha256: str) -> str | None:
    try:
        got = hash_file(path, md5=False)[0]
    except FileNotFoundError:
        return "missing"
    return None if got == sha256 else f"sha256 {got}, its name says {sha256}"


class CondaChannel:
    type: Final = "conda"

    def __init__(self, mirror: MirrorConfig) -> None:
        self.mirror = mirror
        self.ecosystem = CondaEcosystem()
        self.index: ChannelIndex | None = None

    async def read(self, transport: Transport) -> list[CondaRecord]:
        self.index = await CondaSource(self.mirror, transport).read()
        return self.index.records()

    def rejected(self) -> dict[str, str]:
        assert self.index is not None
        return {k: v for s in self.index.subdirs.values() for k, v in s.rejected.items()}

    def fetched_from(self) -> list[str]:
        assert self.index is not None
        return [u for s in self.index.subdirs.values() for u in s.fetched_from]

    # -- package files ---------------------------------------------------------------------------

    def file_url(self, record: CondaRecord) -> str:
        return join_url(self.mirror.sources[record.source], record.channel_subdir, record.fn)

    @staticmethod
    def relpath(record: CondaRecord) -> str:
        return record.key

    @staticmethod
    def expected(record: CondaRecord) -> FileFacts:
        """What upstream says the record's file is (size, sha256, md5), and, in ``problem``, why
        that cannot be used to check it, if it cannot."""
        return record.files

    @staticmethod
    def is_package_path(relpath: str) -> bool:
        return bool(_PACKAGE_RE.search(relpath)) and relpath.count("/") == 1

    # -- index files -----------------------------------------------------------------------------

    def render(self, kept: Iterable[CondaRecord], mirror_dir: Path | None = None,
               state: dict[str, Any] | None = None, *, temp_prefix: str | None = None) -> Rendering:
        """Index files: new shards, then shard indexes, .zst + .json, channeldata (see Rendering).

        ``mirror_dir`` is where earlier runs published; ``state`` what :meth:`state` returned after
        the last run. Only shards not yet on disk are yielded, and a subdir whose records, info and
        removed list are what they were last run, with its files on disk as that run left them,
        is not rewritten at all: a no-op sync leaves every index file (and its ETag) untouched.

        With ``temp_prefix`` (and ``mirror_dir``), new shards are written as they are encoded,
        by the worker processes where there are any, to temporary files named ``temp_prefix``
        and their digest in each subdir's shards directory: ``new`` then yields them ``staged``.
        """
        index = self.index
        assert index is not None
        by_subdir: dict[str, list[CondaRecord]] = defaultdict(list)
        for record in kept:
            by_subdir[record.channel_subdir].append(record)
        subdirs = sorted(index.subdirs)
        state = state if isinstance(state, dict) else {}
        previous: dict[str, Any] = state["shards"] if isinstance(state.get("shards"), dict) else {}
        published: dict[str, Any] = state["published"] if isinstance(state.get("published"), dict) else {}
        plans: dict[str, ShardPlan] = {}
        for subdir in subdirs:
            on_disk: set[str] = set()
            if mirror_dir is not None and (mirror_dir / subdir / "shards").is_dir():
                on_disk = {f"shards/{n}" for n in os.listdir(mirror_dir / subdir / "shards")}
            cache = previous.get(subdir)
            plans[subdir] = plan_shards(subdir, by_subdir.get(subdir, []),
                                        cache=cache if isinstance(cache, dict) else None, on_disk=on_disk)

        def fingerprint(subdir: str) -> str:
            src = index.subdirs[subdir]
            return _fingerprint(
                WRITER_VERSION, orjson.dumps({k: bytes(v).decode() for k, v in src.info.items()}),
                orjson.dumps(sorted(src.removed)),
                *(f"{name}={key}".encode() for name, key in sorted(plans[subdir].keys.items())))

        def fingerprints() -> dict[str, str]:
            out = {subdir: fingerprint(subdir) for subdir in subdirs}
            out[""] = _fingerprint(WRITER_VERSION, *(out[s].encode() for s in subdirs),
                                   orjson.dumps(index.channeldata, option=orjson.OPT_SORT_KEYS))
            return out

        # A plan with a key still unknown has a name last run did not publish: that subdir and
        # the channel's top are changed, and their fingerprints are taken once the new shards
        # are made (their encoding computes those keys).
        known = {s: fingerprint(s) for s in subdirs if plans[s].complete}
        if len(known) == len(subdirs):
            known = self._fingerprints = fingerprints()
        unchanged = {s for s, f in known.items() if _still_published(mirror_dir, s, f, published.get(s))}

        # Where new shards are written as they are encoded (with temp_prefix): the subdirs that
        # have any.
        temp_dirs = ({s: mirror_dir / s / SHARDS_DIR for s in subdirs if plans[s].misses}
                     if mirror_dir is not None and temp_prefix is not None else None)

        def subdir_shards(subdir: str) -> Iterator[IndexFile]:
            if temp_dirs is not None and temp_prefix is not None:
                directory = temp_dirs.get(subdir)
                if directory is None:
                    return
                directory.mkdir(parents=True, exist_ok=True)
                for relpath, tmp in plans[subdir].write(directory, temp_prefix):
                    yield IndexFile(f"{subdir}/{relpath}", None, immutable=True, staged=tmp)
                return
            for relpath, data in plans[subdir].encode():
                yield IndexFile(f"{subdir}/{relpath}", data, immutable=True)

        def new() -> Iterator[IndexFile]:
            # Yielded as the encoder makes them: each is written while the next is encoded.
            for subdir in subdirs:
                try:
                    yield from subdir_shards(subdir)
                except UnusableRecord as exc:  # the record's key, for the run to leave it out
                    exc.subdir = subdir
                    raise
            self._state = {"shards": {s: plans[s].cache for s in subdirs}}
            self._fingerprints = fingerprints()

        def files() -> Iterator[IndexFile]:
            for subdir in subdirs:
                if subdir not in unchanged:
                    yield IndexFile(f"{subdir}/repodata_shards.msgpack.zst", plans[subdir].index,
                                    after_new=True)
            for subdir in subdirs:
                if subdir not in unchanged:
                    src = index.subdirs[subdir]
                    repodata = render_repodata(subdir, by_subdir.get(subdir, []), src.info, src.removed)
                    yield IndexFile(f"{subdir}/repodata.json", repodata, zst_twin=True)
            if "" not in unchanged:
                yield IndexFile("channeldata.json",
                                render_channeldata(subdirs, (r for rs in by_subdir.values() for r in rs),
                                                   index.channeldata))

        return Rendering(new(), files(), tuple(temp_dirs.values()) if temp_dirs else ())

    def state(self, mirror_dir: Path | None = None) -> dict[str, Any]:
        """What the next run's :meth:`render` wants to know: the shard cache (name -> content key,
        shard), and per subdir the fingerprint of what was published with its files' size and
        mtime as they are now (call this after publishing)."""
        state = dict(getattr(self, "_state", {}))
        if mirror_dir is not None:
            published = {}
            for subdir, fingerprint in getattr(self, "_fingerprints", {}).items():
                names = _PUBLISHED_NAMES[bool(subdir)]
                files = {}
                for name in names:
                    try:
                        st = os.stat(mirror_dir / subdir / name)
                    except OSError:
                        break
                    files[name] = [st.st_size, st.st_mtime_ns]
                else:
                    published[subdir] = {"fingerprint": fingerprint, "files": files}
            state["published"] = published
        return state

    def index_files_after(self, kept: Iterable[CondaRecord], mirror_dir: Path,
                          state: dict[str, Any] | None) -> set[str]:
        """:meth:`published_index_files` as they would be once ``kept`` is published (``sync
        --dry-run --clean``). Nothing is written: each shard last run's cannot stand for is
        encoded in memory, to learn its name."""
        from .shards import shard_relpath

        assert self.index is not None
        rendering = self.render(kept, mirror_dir, state)
        for _ in rendering.new:
            pass
        after = {"channeldata.json"}
        for subdir, cache in self._state["shards"].items():
            after.update(f"{subdir}/{name}" for name in _PUBLISHED_NAMES[True])
            after.update(f"{subdir}/{shard_relpath(bytes.fromhex(digest))}" for _, digest in cache.values())
        # A subdir the new index leaves out keeps what its files on disk reference.
        return after | {relpath for relpath in self.published_index_files(mirror_dir)
                        if relpath.partition("/")[0] not in self.index.subdirs and "/" in relpath}

    # -- reading back what was published (verify, clean) -----------------------------------------

    @staticmethod
    def published_files(mirror_dir: Path) -> dict[str, dict[str, Any]]:
        """relpath -> record for every package file the published repodata.json files list."""
        out: dict[str, dict[str, Any]] = {}
        if not mirror_dir.is_dir():
            return out
        for repodata in sorted(mirror_dir.glob("*/repodata.json")):
            subdir = repodata.parent.name
            try:
                doc = orjson.loads(repodata.read_bytes())
            except (orjson.JSONDecodeError, OSError):
                continue
            for key in ("packages", "packages.conda"):
                for fn, record in (doc.get(key) or {}).items():
                    if isinstance(record, dict):
                        out[f"{subdir}/{fn}"] = record
        return out

    @staticmethod
    def index_checks(mirror_dir: Path) -> Iterator[tuple[str, Callable[[], str | None]]]:
        """Every published index file with a check of it (None: sound; "missing"; or what is
        wrong): JSON that parses, a .zst twin that decompresses to its repodata.json, a shard
        index that decodes, and each shard it names present under the sha256 of its bytes."""
        from .shards import decode_shard_index, shard_relpath

        if (mirror_dir / "channeldata.json").exists():
            yield "channeldata.json", functools.partial(_json_problem, mirror_dir / "channeldata.json")
        for repodata in sorted(mirror_dir.glob("*/repodata.json")):
            subdir = repodata.parent.name
            yield f"{subdir}/repodata.json", functools.partial(_json_problem, repodata)
            yield f"{subdir}/repodata.json.zst", functools.partial(_zst_twin_problem, repodata)
            index = repodata.parent / "repodata_shards.msgpack.zst"
            try:
                doc = decode_shard_index(index.read_bytes())
                shards = doc["shards"]
                assert isinstance(shards, dict)
            except FileNotFoundError:
                yield f"{subdir}/repodata_shards.msgpack.zst", _found("missing")
                continue
            except Exception as exc:  # whatever a damaged file makes msgpack or zstd raise
                yield f"{subdir}/repodata_shards.msgpack.zst", _found(
                    f"does not decode as a CEP-16 shard index ({type(exc).__name__})")
                continue
            yield f"{subdir}/repodata_shards.msgpack.zst", _found(None)
            for digest in shards.values():
                if isinstance(digest, bytes) and len(digest) == 32:
                    relpath = shard_relpath(digest)
                    yield f"{subdir}/{relpath}", functools.partial(
                        _digest_problem, repodata.parent / relpath, digest.hex())

    @staticmethod
    def published_index_files(mirror_dir: Path) -> set[str]:
        """Index files that belong to the published channel (shards referenced by an index)."""
        from .shards import decode_shard_index, shard_relpath

        keep = {"channeldata.json"}
        for index in mirror_dir.glob("*/repodata_shards.msgpack.zst"):
            subdir = index.parent.name
            keep.update({f"{subdir}/repodata.json", f"{subdir}/repodata.json.zst",
                         f"{subdir}/repodata_shards.msgpack.zst"})
            try:
                doc = decode_shard_index(index.read_bytes())
            except Exception:
                continue
            for digest in (doc.get("shards") or {}).values():
                keep.add(f"{subdir}/{shard_relpath(digest)}")
        for repodata in mirror_dir.glob("*/repodata.json"):
            subdir = repodata.parent.name
            keep.update({f"{subdir}/repodata.json", f"{subdir}/repodata.json.zst"})
        return keep
