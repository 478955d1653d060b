"""CEP-16 sharded repodata: per-package-name shards plus a shard index.

Spec: https://github.com/conda/ceps/blob/main/cep-0016.md. The layout below a
subdir directory is::

    <subdir>/repodata_shards.msgpack.zst         the shard index
    <subdir>/shards/<sha256 hex>.msgpack.zst     one shard per package name

Details the CEP leaves open are pinned to what the readers actually do:
rattler (``rattler_repodata_gateway`` / ``rattler_conda_types::Shard``, what
pixi and py-rattler use) and conda (``conda-libmamba-solver`` shards reader),
and to what ``rattler_index`` writes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final

import msgpack
import msgspec
import orjson
import zstandard

from ..errors import UnusableRecord
from ..fdio import write_all

__all__ = [
    "ARCHIVE_SUFFIXES",
    "BINARY_DIGEST_FIELDS",
    "MAX_DECODED_SIZE",
    "SHARDS_DIR",
    "SHARD_INDEX_FILENAME",
    "SHARD_INDEX_VERSION",
    "SHARD_SUFFIX",
    "TEXT_DIGEST_FIELDS",
    "ZSTD_LEVEL",
    "decode_shard",
    "decode_shard_index",
    "compress_shards",
    "encode_shard",
    "encode_shard_index",
    "encode_shard_source",
    "encode_shard_sources",
    "pack_shard",
    "pack_shard_source",
    "shard_source",
    "shard_digest",
    "shard_relpath",
    "write_shard_files",
]

# CEP-16: "The shard index is a file that is stored under
# <subdir>/repodata_shards.msgpack.zst".
SHARD_INDEX_FILENAME: Final = "repodata_shards.msgpack.zst"
# CEP-16: shards live at "<shards_base_url><sha256>.msgpack.zst"; rattler_index
# writes shards_base_url "./shards/", i.e. <subdir>/shards/.
SHARDS_DIR: Final = "shards"
SHARD_SUFFIX: Final = ".msgpack.zst"
# CEP-16 example index: {"version": 1, "info": {...}, "shards": {...}}.
# rattler ignores the key (its ShardedRepodata has no deny_unknown_fields).
SHARD_INDEX_VERSION: Final = 1
# rattler_index writes shards and the index with zstd level 0, i.e. libzstd's
# default (3). A shard's name is the hash of its compressed bytes, so changing
# this renames every shard once (clients then refetch them all, once).
ZSTD_LEVEL: Final = 3
# Refuse to decode more than this (conda caps shards at 16 MiB; the largest
# conda-forge shard is ~2.6 MB and the linux-64 index ~0.6 MB).
MAX_DECODED_SIZE: Final = 64 * 2**20

# CEP-16: "The sha256 and md5 from the original repodata fields are converted
# from their hex representation to bytes." Field -> digest length in bytes.
BINARY_DIGEST_FIELDS: Final[Mapping[str, int]] = {"sha256": 32, "md5": 16}
# rattler also parses these as digests, but the CEP does not convert them and
# conda's reader turns only sha256/md5 back into hex (then json.dumps the
# records), so they stay hex strings; rattler accepts a hex str as well as bin
# for every digest field (checked against py-rattler 0.28).
TEXT_DIGEST_FIELDS: Final[Mapping[str, int]] = {"legacy_bz2_md5": 16, "attestations_sha256": 32}
# Filenames rattler accepts as keys and in "removed" (DistArchiveIdentifier):
# a known suffix (case-sensitive) after a "<name>-<version>-<build>" stem.
ARCHIVE_SUFFIXES: Final = (".tar.bz2", ".conda", ".whl")

_SHA256_SIZE: Final = 32


_MSGPACK: Final = msgspec.msgpack.Encoder()


def _pack(obj: object) -> bytes:
    # str -> msgpack str, bytes -> msgpack bin, so CEP-16 digests are bin and
    # all text is str (as rattler_index writes them). msgspec's encoder writes
    # the same bytes as msgpack.packb(use_bin_type=True) (checked on the real
    # channels in testdata) at twice the speed; msgpack still decodes.
    packed: bytes = _MSGPACK.encode(obj)
    return packed


def _compress(data: bytes) -> bytes:
    # One zstd frame with the content size in its header (readers that use
    # zstandard.decompress() need it; rattler's streaming decoder ignores it).
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def _decompress(data: bytes) -> bytes:
    # Streaming, so frames without a content size (rattler_index writes those)
    # decode too.
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        while chunk := reader.read(2**20):
            out += chunk
            if len(out) > MAX_DECODED_SIZE:
                raise ValueError(f"decoded shard data exceeds {MAX_DECODED_SIZE} bytes")
    return bytes(out)


def _is_archive_filename(filename: str) -> bool:
    for suffix in ARCHIVE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].count("-") >= 2
    return False


def _digest(value: object, size: int) -> bytes | None:
    """The digest in a hex string of exactly ``size`` bytes, else None."""
    if type(value) is not str or len(value) != 2 * size:
        return None
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        return None
    # fromhex skips spaces between byte pairs: such a string yields fewer bytes, and is refused.
    return digest if len(digest) == size else None


_BINARY_DIGEST_ITEMS: Final = tuple(BINARY_DIGEST_FIELDS.items())
_TEXT_DIGEST_ITEMS: Final = tuple(TEXT_DIGEST_FIELDS.items())


def _fix_digests(record: dict[str, Any]) -> None:
    """CEP-16 digests in place: sha256/md5 hex -> bytes; a malformed one is DROPPED.

    Left as-is, rattler fails to parse the shard and with it the whole solve (GatewayError
    "failed to parse digest"); without it only this record loses one checksum. Both readers
    accept an absent or null digest.
    """
    for field, size in _BINARY_DIGEST_ITEMS:
        value = record.get(field)
        if value is not None:
            digest = _digest(value, size)
            if digest is None:
                del record[field]
            else:
                record[field] = digest
    for field, size in _TEXT_DIGEST_ITEMS:  # these stay hex strings, but only well-formed ones
        value = record.get(field)
        if value is not None and _digest(value, size) is None:
            del record[field]


def _joined(records: Mapping[str, Any]) -> list[Any]:
    """Parts of one JSON object ``{filename: raw record, ...}``, sorted, archive names only."""
    parts: list[Any] = []
    for fn in sorted(records):
        if _is_archive_filename(fn):
            parts += (b",", orjson.dumps(fn), b":", records[fn])
    if parts:
        parts[0] = b"{"
        parts.append(b"}")
    else:
        parts.append(b"{}")
    return parts


def shard_source(
    packages: Mapping[str, Any],
    packages_conda: Mapping[str, Any],
    removed: Sequence[str] = (),
) -> bytes:
    """One package name's records as a single JSON document of their raw bytes, unparsed:
    ``[{packages}, {packages.conda}, [removed]]``. This is what :func:`encode_shard_source` (in
    this process or a worker process) turns into the shard; building it is a cheap join.

    ``packages`` / ``packages_conda`` map filename -> the record's raw JSON as upstream served it
    (bytes or a buffer such as msgspec.Raw).
    """
    # A filename rattler cannot parse, as a key or in "removed", makes it
    # reject the shard and so fail the whole solve: such entries are dropped.
    kept_removed = sorted({fn for fn in removed if _is_archive_filename(fn)})
    return b"".join([b"[", *_joined(packages), b",", *_joined(packages_conda), b",",
                     orjson.dumps(kept_removed), b"]"])


def records_source(records: Iterable[Any]) -> bytes:
    """:func:`shard_source` for one name's records as the source read them (CondaRecords, or
    anything with ``fn``, ``raw`` and ``is_conda``), sorted by file name: the same bytes, but
    built with one join and no dict, sort or escaping per record. That holds because the source
    admits only archive file names of ``[A-Za-z0-9_.+!~-]`` (mirrorgen.conda.source), which
    JSON needs no escape for. For 500,000 records: 0.16 s, where the general path took 0.5 s."""
    tar: list[Any] = []
    conda: list[Any] = []
    for record in records:
        (conda if record.is_conda else tar).extend((b',"', record.fn.encode(), b'":', record.raw))
    parts: list[Any] = [b"["]
    for group in (tar, conda):
        if group:
            group[0] = b'{"'
            parts += group
            parts.append(b"}")
        else:
            parts.append(b"{}")
        parts.append(b",")
    parts.append(b"[]]")
    return b"".join(parts)


def pack_shard_source(source: bytes) -> bytes:
    """:func:`shard_source` output -> the shard's msgpack bytes, before compression.

    Every key other than the digests is kept exactly as upstream sent it,
    unknown keys included (CEP-16: "Implementers SHOULD ignore unknown keys").
    The records are decoded in one call: a call per record would cost more
    than the decoding itself.
    """
    try:
        packages, packages_conda, removed = orjson.loads(source)
    except orjson.JSONDecodeError:
        unusable = _unusable(source)
        if unusable is None:  # not a record's fault: the source itself is broken (our defect)
            raise
        raise unusable from None
    for records in (packages, packages_conda):
        for record in records.values():
            if type(record) is dict:  # else: not a record at all; mirror it as upstream served it
                _fix_digests(record)
    # CEP-16 shard keys; all three are always written: rattler requires
    # "packages" (no serde default), conda indexes "packages" and
    # "packages.conda" directly. rattler hides records listed in "removed"
    # (CEP-16: "list of strings of keys (filenames) that were removed").
    return _pack({"packages": packages, "packages.conda": packages_conda, "removed": removed})


def _unusable(source: bytes) -> UnusableRecord | None:
    """Which record of a shard's source orjson refused (a number past a double's range, a lone
    surrogate: JSON that msgspec passed over as raw bytes), as the error to raise; None if none
    did. Rare: only then are the records decoded one by one, each as the bytes upstream sent."""
    try:
        maps = msgspec.json.decode(source, type=tuple[dict[str, msgspec.Raw], dict[str, msgspec.Raw], Any])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    for records in maps[:2]:
        for fn, raw in records.items():
            try:
                orjson.loads(bytes(raw))
            except orjson.JSONDecodeError as exc:
                return UnusableRecord(fn, f"not valid JSON ({exc})")
    return None


def encode_shard_source(source: bytes) -> bytes:
    """:func:`shard_source` output -> the shard file (zstd-compressed msgpack)."""
    return _compress(pack_shard_source(source))


def encode_shard_sources(sources: Sequence[bytes]) -> list[bytes]:
    """Many at once: the unit of work a worker process is given. One compressor for all of
    them: setting one up costs more than compressing a small shard (the output is the same)."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return [compressor.compress(pack_shard_source(source)) for source in sources]


def write_shard_files(directory: str | bytes | os.PathLike[str], prefix: str, sources: Sequence[bytes]) -> list[bytes]:
    """Encode each of ``sources`` (as :func:`encode_shard_sources`) and write its shard to a new
    file ``directory/<prefix><hex digest>``, by the process that encoded it: the digests, in
    order. The files are complete but neither synced nor under their final names; the caller's
    group commit does both. If this fails, the files it made are removed.

    A worker process that writes its own shards spares the parent the bytes on the pipe, a
    file create per shard and the GIL those cost: at conda-forge scale (30,000 shards) the
    parent's feeding and writing, not the encoding, was what a cold run waited for."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    digests: list[bytes] = []
    made: list[str] = []
    try:
        for shard in encode_shard_sources(sources):
            digest = shard_digest(shard)
            digests.append(digest)
            name = prefix + digest.hex()
            try:
                fd = os.open(name, flags, 0o644, dir_fd=dfd)
            except FileExistsError:
                continue  # the same shard twice (same content, same name): written already
            made.append(name)
            try:
                write_all(fd, shard)
            finally:
                os.close(fd)
    except BaseException:
        for name in made:
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
        raise
    finally:
        os.close(dfd)
    return digests


def pack_shard(
    packages: Mapping[str, Any],
    packages_conda: Mapping[str, Any],
    removed: Sequence[str] = (),
) -> bytes:
    """One package name's records -> the shard's msgpack bytes, before compression.
    The output is deterministic (filenames and ``removed`` sorted) so an
    unchanged package keeps its shard name."""
    return pack_shard_source(shard_source(packages, packages_conda, removed))


def encode_shard(
    packages: Mapping[str, Any],
    packages_conda: Mapping[str, Any],
    removed: Sequence[str] = (),
) -> bytes:
    """One package name's records -> zstd-compressed msgpack shard (the file content)."""
    return _compress(pack_shard(packages, packages_conda, removed))


def compress_shards(packed: Sequence[bytes]) -> list[bytes]:
    """Many packed shards -> their files, byte for byte what :func:`encode_shard` makes, but
    compressed on every core by zstd's own threads, outside the GIL."""
    if not packed:
        return []
    out = zstandard.ZstdCompressor(level=ZSTD_LEVEL).multi_compress_to_buffer(list(packed), threads=-1)
    return [out[i].tobytes() for i in range(len(out))]


def shard_digest(shard: bytes) -> bytes:
    """CEP-16: the shard's name is the sha256 of the compressed shard (32 raw bytes).

    This is what rattler_index hashes (the zstd output), so the name is also
    the checksum of exactly the bytes a client downloads.
    """
    return hashlib.sha256(shard).digest()


def shard_relpath(digest: bytes) -> str:
    """``shards/<hex>.msgpack.zst``, relative to the subdir directory.

    CEP-16: "<sha256> is the lower-case hex representation of the bytes from
    the index".
    """
    if len(digest) != _SHA256_SIZE:
        raise ValueError(f"shard digest must be {_SHA256_SIZE} bytes, got {len(digest)}")
    return f"{SHARDS_DIR}/{digest.hex()}{SHARD_SUFFIX}"


def encode_shard_index(
    subdir: str,
    shards: Mapping[str, bytes],
    *,
    base_url: str = "./",
    shards_base_url: str = "./shards/",
) -> bytes:
    """package name -> digest, -> zstd-compressed msgpack content of repodata_shards.msgpack.zst.

    CEP-16: "Both the base_url and the shards_base_url can be absolute or a
    relative url. The urls are relative to the shard index." rattler joins
    them onto ``<channel>/<subdir>/`` and conda onto the index URL, which is
    the same directory, so the defaults put packages next to repodata.json
    and shards in ``<subdir>/shards/``.
    """
    for name, digest in shards.items():
        if len(digest) != _SHA256_SIZE:
            raise ValueError(f"digest for {name!r} must be {_SHA256_SIZE} bytes")
    index = {
        "version": SHARD_INDEX_VERSION,
        # rattler's ShardedSubdirInfo requires subdir, base_url and
        # shards_base_url; created_at is optional there and parsed as an
        # RFC 3339 timestamp string (jiff::Timestamp).
        "info": {
            "subdir": subdir,
            "base_url": base_url,
            "shards_base_url": shards_base_url,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        # CEP-16: "the hashes are stored as binary data" -> msgpack bin.
        "shards": {name: bytes(shards[name]) for name in sorted(shards)},
    }
    return _compress(_pack(index))


def _decode(data: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(_decompress(data), raw=False)
    if not isinstance(value, dict):
        raise ValueError(f"expected a msgpack map, got {type(value).__name__}")
    return value


def decode_shard_index(data: bytes) -> dict[str, Any]:
    """repodata_shards.msgpack.zst content -> dict; digests stay raw bytes."""
    return _decode(data)


def decode_shard(data: bytes) -> dict[str, Any]:
    """Shard file content -> dict; sha256/md5 stay raw bytes (CEP-16 encoding)."""
    return _decode(data)
