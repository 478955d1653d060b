"""Active mode over real upstream indexes (shared/testdata) with small stand-in package files whose
size and hashes the fixture writes into the records: every real quirk goes through the whole path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from mirrorgen.store import Store
from mirrorgen.sync import sync_mirror
from mirrorgen.verify import verify_mirror
from tests.support.upstream import UpstreamControl, make_upstream_app

TESTDATA = Path(__file__).parents[2] / "shared" / "testdata" / "conda"


def stand_in_channel(root: Path, subdir: str, source: Path) -> dict:
    """Copy a real repodata.json, giving each record a small file and rewriting only the hashes
    and size that upstream published for it (records with only md5 keep only md5)."""
    doc = orjson.loads(source.read_bytes())
    (root / subdir).mkdir(parents=True)
    for key in ("packages", "packages.conda"):
        for fn, record in (doc.get(key) or {}).items():
            data = f"stand-in for {fn}\n".encode()
            (root / subdir / fn).write_bytes(data)
            record["size"] = len(data)
            if "sha256" in record:
                record["sha256"] = hashlib.sha256(data).hexdigest()
            record["md5"] = hashlib.md5(data).hexdigest()
    (root / subdir / "repodata.json").write_bytes(orjson.dumps(doc))
    (root / "noarch").mkdir(exist_ok=True)
    if not (root / "noarch" / "repodata.json").exists():
        (root / "noarch" / "repodata.json").write_bytes(b'{"info":{"subdir":"noarch"},"packages":{}}')
    return doc


@pytest.mark.parametrize("fixture, subdir", [
    ("davhau_intel_noarch_2023-08-28.json", "noarch"),        # md5 only, binstar/features keys
    ("conda_main_noarch_repodata.json", "noarch"),            # conda's cache keys (_etag, _url)
])
async def test_active_mirror_of_real_repodata_verifies_every_file(
        fixture: str, subdir: str, tmp_path: Path, aiohttp_server: AiohttpServer, write_config) -> None:
    doc = stand_in_channel(tmp_path / "up" / "ch", subdir, TESTDATA / fixture)
    total = len(doc.get("packages") or {}) + len(doc.get("packages.conda") or {})
    control = UpstreamControl()
    server = await aiohttp_server(make_upstream_app(tmp_path / "up", control))
    config = write_config(str(server.make_url("/ch")), subdirs=[subdir], concurrency=8)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.downloaded == total == result.kept

    mine = orjson.loads((config.root / "conda-demo" / subdir / "repodata.json").read_bytes())
    for key in ("packages", "packages.conda"):
        assert mine[key] == (doc.get(key) or {})  # every record, every key, as upstream had it
    assert not any(k.startswith("_") for k in mine)
    check = await verify_mirror(config.mirrors[0], Store(config.root))
    names = len({r["name"] for key in ("packages", "packages.conda") for r in (doc.get(key) or {}).values()})
    # every package file, and the index files: channeldata, repodata.json, its .zst, the shard
    # index and a shard per name
    assert check.ok == check.checked == total + 4 + names and not check.failed and not check.stray


async def test_a_record_without_any_hash_is_not_published_when_checksums_are_verified(
        tmp_path: Path, aiohttp_server: AiohttpServer, write_config) -> None:
    doc = stand_in_channel(tmp_path / "up" / "ch", "noarch", TESTDATA / "davhau_intel_noarch_2023-08-28.json")
    fn, record = next(iter(doc["packages"].items()))
    del record["md5"]
    record.pop("sha256", None)
    (tmp_path / "up" / "ch" / "noarch" / "repodata.json").write_bytes(orjson.dumps(doc))
    server = await aiohttp_server(make_upstream_app(tmp_path / "up", UpstreamControl()))
    config = write_config(str(server.make_url("/ch")), subdirs=["noarch"])
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert list(result.failed) == [f"noarch/{fn}"]
    mine = orjson.loads((config.root / "conda-demo" / "noarch" / "repodata.json").read_bytes())
    assert fn not in mine["packages"] and len(mine["packages"]) == len(doc["packages"]) - 1
