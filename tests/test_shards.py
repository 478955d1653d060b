"""CEP-16 sharded repodata encoder: format checks plus a real client (py-rattler).

The end-to-end tests serve a synthetic channel whose repodata.json files are
empty on purpose, so a solve can only succeed through our shards.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import tarfile
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
import rattler
import rattler.exceptions
import rattler.index
import zstandard
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirrorgen.conda.shards import (
    SHARD_INDEX_FILENAME,
    decode_shard,
    decode_shard_index,
    encode_shard,
    encode_shard_index,
    shard_digest,
    shard_relpath,
)

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def _record(
    name: str, version: str, subdir: str, depends: list[str], **extra: Any
) -> dict[str, Any]:
    blob = f"{name}-{version}-{subdir}".encode()
    record: dict[str, Any] = {"build": "h1234abc_0", "build_number": 0, "depends": depends}
    record |= {"license": "BSD-3-Clause", "md5": hashlib.md5(blob).hexdigest(), "name": name}
    record |= {"sha256": hashlib.sha256(blob).hexdigest(), "size": 4321, "subdir": subdir}
    return record | {"timestamp": 1_700_000_000_000, "version": version} | extra


def _raw(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode()


def test_round_trip_converts_only_digests() -> None:
    conda = _record("libfoo", "1.0", "linux-64", ["python-dummy >=3.11"])
    conda["some_future_key"] = {"nested": [1, "two", None], "flag": True}
    conda["legacy_bz2_md5"] = hashlib.md5(b"bz2").hexdigest().upper()
    tarbz2 = _record("libfoo", "0.9", "linux-64", [], noarch="generic", constrains=["bar <2"])

    shard = decode_shard(
        encode_shard(
            {"libfoo-0.9-h1234abc_0.tar.bz2": _raw(tarbz2)},
            {"libfoo-1.0-h1234abc_0.conda": _raw(conda)},
            removed=["libfoo-0.8-h1234abc_0.conda", "libfoo-0.8-h1234abc_0.conda"],
        )
    )

    assert set(shard) == {"packages", "packages.conda", "removed"}
    assert shard["removed"] == ["libfoo-0.8-h1234abc_0.conda"]
    for original, stored in (
        (tarbz2, shard["packages"]["libfoo-0.9-h1234abc_0.tar.bz2"]),
        (conda, shard["packages.conda"]["libfoo-1.0-h1234abc_0.conda"]),
    ):
        # CEP-16: sha256 and md5 are stored as raw bytes (msgpack bin).
        assert stored["sha256"] == bytes.fromhex(original["sha256"])
        assert stored["md5"] == bytes.fromhex(original["md5"])
        rest = {k: v for k, v in stored.items() if k not in ("sha256", "md5")}
        assert rest == {k: v for k, v in original.items() if k not in ("sha256", "md5")}
    # Not a CEP-16 field: stays the hex string upstream sent (conda's reader
    # would otherwise see bytes; rattler accepts hex str here too).
    stored_conda = shard["packages.conda"]["libfoo-1.0-h1234abc_0.conda"]
    assert stored_conda["legacy_bz2_md5"] == conda["legacy_bz2_md5"]


def test_malformed_entries_are_dropped_not_fatal() -> None:
    bad = _record("libbad", "1.0", "noarch", [], sha256="not-hex", md5="ab" * 15, legacy_bz2_md5=42)
    bad["attestations_sha256"] = None  # null is kept: both readers accept nil
    shard = decode_shard(
        encode_shard(
            {"README.txt": _raw(bad)},
            {"libbad-1.0-h1234abc_0.conda": _raw(bad)},
            removed=["garbage", "libbad-0.1-0.CONDA", "libbad-0.1-h_0.tar.bz2"],
        )
    )
    # Filenames rattler cannot parse would make it reject the whole shard.
    assert shard["packages"] == {}
    assert shard["removed"] == ["libbad-0.1-h_0.tar.bz2"]
    stored = shard["packages.conda"]["libbad-1.0-h1234abc_0.conda"]
    assert not {"sha256", "md5", "legacy_bz2_md5"} & stored.keys()
    assert stored["attestations_sha256"] is None
    assert stored["name"] == "libbad" and stored["size"] == 4321


def test_shard_name_is_sha256_of_compressed_bytes() -> None:
    records = {f"pkg-1.{i}-h_0.conda": _raw(_record("pkg", f"1.{i}", "x", [])) for i in range(4)}
    shard = encode_shard({}, records)
    digest = shard_digest(shard)

    assert digest == hashlib.sha256(shard).digest() and len(digest) == 32
    assert shard_relpath(digest) == f"shards/{hashlib.sha256(shard).hexdigest()}.msgpack.zst"
    # Deterministic: insertion order does not change the bytes, hence the name.
    assert encode_shard({}, dict(reversed(records.items()))) == shard
    with pytest.raises(ValueError):
        shard_relpath(digest[:16])


def test_shard_index_format() -> None:
    digests = {"zlib": hashlib.sha256(b"z").digest(), "numpy": hashlib.sha256(b"n").digest()}
    index = decode_shard_index(encode_shard_index("linux-64", digests))

    assert index["version"] == 1
    assert set(index["info"]) == {"subdir", "base_url", "shards_base_url", "created_at"}
    assert index["info"]["subdir"] == "linux-64"
    assert index["info"]["base_url"] == "./"
    assert index["info"]["shards_base_url"] == "./shards/"
    assert datetime.fromisoformat(index["info"]["created_at"]).utcoffset() is not None
    # Decoded with raw=False, msgpack str -> str and bin -> bytes: names are
    # str, digests bin (CEP-16 "stored as binary data").
    assert index["shards"] == digests and list(index["shards"]) == ["numpy", "zlib"]
    with pytest.raises(ValueError):
        encode_shard_index("linux-64", {"x": b"\x00" * 31})


async def test_matches_rattler_index_output(tmp_path: Path) -> None:
    """Oracle: rattler_index's own shards for the same records decode identically."""
    index_json = _record("libfoo", "1.0", "noarch", ["python-dummy >=3.11"], noarch="python")
    for key in ("md5", "sha256", "size"):
        del index_json[key]  # computed by the indexer from the archive
    # Minimal archive: rattler_index only reads info/index.json from it.
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        data = json.dumps(index_json).encode()
        info = tarfile.TarInfo("info/index.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    archive = tmp_path / "noarch" / "libfoo-1.0-h1234abc_0.tar.bz2"
    archive.parent.mkdir()
    archive.write_bytes(bz2.compress(tar.getvalue()))
    await rattler.index.index_fs(tmp_path, write_shards=True, write_zst=False)

    theirs = decode_shard_index((tmp_path / "noarch" / SHARD_INDEX_FILENAME).read_bytes())
    # rattler_index omits the CEP's "version" and writes base_url "" (same
    # directory as "./"); the rest of the layout is the same as ours.
    assert {"subdir", "base_url", "shards_base_url", "created_at"} == set(theirs["info"])
    assert theirs["info"]["shards_base_url"] == "./shards/"
    assert theirs["info"]["base_url"] in ("", "./")
    digest = theirs["shards"]["libfoo"]
    blob = (tmp_path / "noarch" / shard_relpath(digest)).read_bytes()
    assert shard_digest(blob) == digest  # named by the hash of the compressed bytes
    repodata = json.loads((tmp_path / "noarch" / "repodata.json").read_text())
    ours = encode_shard({fn: _raw(r) for fn, r in repodata["packages"].items()}, {})
    assert decode_shard(ours) == decode_shard(blob)


# -- a real client -----------------------------------------------------------

_CHANNEL: dict[str, dict[str, dict[str, Any]]] = {
    # subdir -> filename -> record
    "linux-64": {
        "python-dummy-3.11.0-h1234abc_0.conda": _record("python-dummy", "3.11.0", "linux-64", []),
    },
    "noarch": {
        "libfoo-1.0-pyh1234abc_0.tar.bz2": _record(
            "libfoo", "1.0", "noarch", ["python-dummy >=3.11"], build="pyh1234abc_0",
            noarch="python",
        ),
        "unrelated-2.0-h1234abc_0.conda": _record("unrelated", "2.0", "noarch", []),
    },
}


def _write_channel(root: Path, records: dict[str, dict[str, dict[str, Any]]]) -> dict[str, str]:
    """Write shards + index per subdir; return package name -> shard URL path."""
    shard_paths: dict[str, str] = {}
    for subdir, by_filename in records.items():
        sub = root / subdir
        (sub / "shards").mkdir(parents=True)
        # Deliberately empty: these names exist only in the shards.
        (sub / "repodata.json").write_text(
            json.dumps({"info": {"subdir": subdir}, "packages": {}, "packages.conda": {}})
        )
        digests: dict[str, bytes] = {}
        for name in sorted({r["name"] for r in by_filename.values()}):
            mine = {fn: _raw(r) for fn, r in by_filename.items() if r["name"] == name}
            shard = encode_shard(
                {fn: raw for fn, raw in mine.items() if fn.endswith(".tar.bz2")},
                {fn: raw for fn, raw in mine.items() if fn.endswith(".conda")},
            )
            digests[name] = shard_digest(shard)
            (sub / shard_relpath(digests[name])).write_bytes(shard)
            shard_paths[name] = f"/{subdir}/{shard_relpath(digests[name])}"
        (sub / SHARD_INDEX_FILENAME).write_bytes(encode_shard_index(subdir, digests))
    return shard_paths


async def _serve(aiohttp_server: ServerFactory, root: Path) -> tuple[str, list[str]]:
    requested: list[str] = []

    @web.middleware
    async def log_paths(request: web.Request, handler: Any) -> web.StreamResponse:
        requested.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[log_paths])
    app.add_routes([web.static("/", root)])
    server = await aiohttp_server(app)
    return str(server.make_url("/")), requested


async def _solve(url: str, cache: Path, *, sharded: bool) -> list[rattler.RepoDataRecord]:
    config = rattler.SourceConfig(sharded_enabled=sharded)
    gateway = rattler.Gateway(cache_dir=cache, default_config=config)
    return await rattler.solve(
        sources=[url], specs=["libfoo"], gateway=gateway, platforms=["linux-64", "noarch"]
    )


async def test_rattler_solves_from_our_shards_on_loopback(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    shard_paths = _write_channel(tmp_path / "channel", _CHANNEL)
    url, requested = await _serve(aiohttp_server, tmp_path / "channel")

    # rattler tries <channel>/<subdir>/repodata_shards.msgpack.zst for any
    # http(s) channel when sharded_enabled (no host allow-list; it falls back
    # to repodata.json only on a missing index), so loopback uses shards too.
    records = await _solve(url, tmp_path / "cache", sharded=True)

    by_name = {r.name.normalized: r for r in records}
    assert set(by_name) == {"libfoo", "python-dummy"}
    assert str(by_name["python-dummy"].version) == "3.11.0"
    # base_url "./" is resolved against <channel>/<subdir>/: packages come
    # from the mirror, next to repodata.json.
    assert by_name["libfoo"].url == f"{url}noarch/libfoo-1.0-pyh1234abc_0.tar.bz2"
    assert by_name["python-dummy"].url == f"{url}linux-64/python-dummy-3.11.0-h1234abc_0.conda"
    original = _CHANNEL["noarch"]["libfoo-1.0-pyh1234abc_0.tar.bz2"]
    assert by_name["libfoo"].sha256 == bytes.fromhex(original["sha256"])
    assert by_name["libfoo"].md5 == bytes.fromhex(original["md5"])

    # Both indexes, then only the shards the dependency walk needs.
    indexes = {f"/{subdir}/{SHARD_INDEX_FILENAME}" for subdir in ("linux-64", "noarch")}
    assert indexes <= set(requested)
    assert {shard_paths["libfoo"], shard_paths["python-dummy"]} <= set(requested)
    assert shard_paths["unrelated"] not in requested
    assert not [p for p in requested if "repodata.json" in p]

    # Control: read through the (empty) repodata.json the same channel fails.
    requested.clear()
    with pytest.raises(rattler.exceptions.SolverError):
        await _solve(url, tmp_path / "cache-json", sharded=False)
    assert not [p for p in requested if "shards" in p]


async def test_malformed_digest_costs_one_checksum_not_the_solve(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    filename = "python-dummy-3.11.0-h1234abc_0.conda"
    bad = dict(_CHANNEL["linux-64"][filename], sha256="XYZ-not-a-digest")
    _write_channel(tmp_path / "channel", {**_CHANNEL, "linux-64": {filename: bad}})
    url, _ = await _serve(aiohttp_server, tmp_path / "channel")
    records = {r.name.normalized: r for r in await _solve(url, tmp_path / "cache1", sharded=True)}
    assert records["python-dummy"].sha256 is None and records["python-dummy"].md5 is not None

    # Why the encoder drops it: left in the shard as-is, rattler (py-rattler
    # 0.28) fails the *whole solve* on that one bad digest.
    raw_record = dict(bad, md5=bytes.fromhex(bad["md5"]))
    raw_shard = {"packages": {}, "packages.conda": {filename: raw_record}, "removed": []}
    shard = zstandard.ZstdCompressor().compress(msgpack.packb(raw_shard, use_bin_type=True))
    sub = tmp_path / "channel" / "linux-64"
    (sub / shard_relpath(shard_digest(shard))).write_bytes(shard)
    index = encode_shard_index("linux-64", {"python-dummy": shard_digest(shard)})
    (sub / SHARD_INDEX_FILENAME).write_bytes(index)
    with pytest.raises(rattler.exceptions.GatewayError, match="digest"):
        await _solve(url, tmp_path / "cache2", sharded=True)
