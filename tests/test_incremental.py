"""What makes a re-run cheap must never make it wrong: unchanged index files are left alone,
changed ones are rewritten, and the fast paths (shard cache, worker processes, streamed .zst,
the manifest) give exactly what the slow ones would."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from mirrorgen.conda.shards import decode_shard, decode_shard_index
from mirrorgen.conda.source import parse_repodata
from mirrorgen.conda.writer import plan_shards, render_repodata, render_shards
from mirrorgen.config import Config, MirrorConfig
from mirrorgen.manifest import Manifest
from mirrorgen.store import Store
from mirrorgen.sync import RunResult, sync_mirror
from mirrorgen.workers import WorkerError, WorkerPool

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "conda"
INDEX_NAMES = ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst")


def snapshot(mirror: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every index file (not package files, not shards)."""
    out = {}
    for path in sorted(mirror.rglob("*")):
        if path.is_file() and (path.name in INDEX_NAMES or path.name == "channeldata.json"):
            out[path.relative_to(mirror).as_posix()] = (path.stat().st_mtime_ns, path.read_bytes())
    return out


def shards(mirror: Path, subdir: str) -> set[str]:
    return {p.name for p in (mirror / subdir / "shards").iterdir()}


def patch_upstream(channel: Path, subdir: str, fn: str, *, copy_of: str | None = None,
                   **changes: object) -> None:
    """Change one record upstream, as a repodata hotfix does, or add ``fn`` as a copy of the
    record ``copy_of`` and its file (same bytes, same hash); drop the compressed copies so the
    plain file is what gets read."""
    path = channel / subdir / "repodata.json"
    doc = json.loads(path.read_bytes())
    key = "packages.conda" if fn.endswith(".conda") else "packages"
    if copy_of is not None:
        doc[key][fn] = dict(doc[key][copy_of])
        shutil.copyfile(channel / subdir / copy_of, channel / subdir / fn)
    doc[key][fn].update(changes)
    path.write_text(json.dumps(doc))
    for suffix in (".zst", ".bz2"):
        (channel / subdir / f"repodata.json{suffix}").unlink(missing_ok=True)


@dataclass
class Synced:
    """A mirror of the demo upstream after its first sync."""

    config: Config
    store: Store
    mirror: MirrorConfig
    root: Path
    first: RunResult

    @classmethod
    async def first_sync(cls, upstream, write_config) -> Synced:
        config = write_config(upstream.channel_url)
        store, mirror = Store(config.root), config.mirrors[0]
        first = await sync_mirror(config, mirror, store, progress=False)
        return cls(config, store, mirror, store.mirror_dir(mirror.name), first)

    async def again(self) -> RunResult:
        return await sync_mirror(self.config, self.mirror, self.store, progress=False)


# What a change to one linux-64 record rewrites: that subdir's index files and the channel's top.
LINUX_64_REWRITTEN = {"linux-64/repodata.json", "linux-64/repodata.json.zst",
                      "linux-64/repodata_shards.msgpack.zst", "channeldata.json"}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if after[k] != before.get(k)}


async def test_a_no_op_sync_leaves_every_index_file_and_the_manifest_untouched(upstream, write_config) -> None:
    synced = await Synced.first_sync(upstream, write_config)
    assert synced.first.index_files > 0
    before = snapshot(synced.root)
    manifest = synced.store.state_dir(synced.mirror.name) / "manifest.json"
    manifest_mtime = manifest.stat().st_mtime_ns

    second = await synced.again()

    assert second.index_files == 0 and second.downloaded == 0 and second.reused == synced.first.downloaded
    assert snapshot(synced.root) == before
    assert manifest.stat().st_mtime_ns == manifest_mtime


async def test_a_changed_record_rewrites_its_subdir_and_re_encodes_only_its_shard(upstream, write_config) -> None:
    synced = await Synced.first_sync(upstream, write_config)
    root = synced.root
    before = snapshot(root)
    shards_before = {s: shards(root, s) for s in ("linux-64", "noarch")}
    doc = json.loads((root / "linux-64" / "repodata.json").read_bytes())
    fn, record = next(iter(doc["packages.conda"].items()))

    patch_upstream(upstream.root / "demo", "linux-64", fn, depends=[*record["depends"], "hotfix-added"])
    await synced.again()

    assert changed(before, snapshot(root)) == LINUX_64_REWRITTEN
    published = json.loads((root / "linux-64" / "repodata.json").read_bytes())
    assert published["packages.conda"][fn]["depends"][-1] == "hotfix-added"
    # Exactly one new shard (the patched name's); the others are the files of the first run.
    assert len(shards(root, "linux-64") - shards_before["linux-64"]) == 1
    assert shards(root, "noarch") == shards_before["noarch"]


async def test_a_new_name_rewrites_its_subdir_only_and_the_next_sync_is_a_no_op(upstream, write_config) -> None:
    # A name last run did not publish gets its content key only when its shard is encoded; the
    # subdir's fingerprint must then be taken after that, or the next run would rewrite it again.
    synced = await Synced.first_sync(upstream, write_config)
    root = synced.root
    before = snapshot(root)
    noarch_shards = shards(root, "noarch")
    fn = next(iter(json.loads((root / "linux-64" / "repodata.json").read_bytes())["packages.conda"]))
    patch_upstream(upstream.root / "demo", "linux-64", "brandnew-1.0-0.conda", copy_of=fn,
                   name="brandnew", version="1.0", build="0")

    second = await synced.again()

    assert not second.failed and second.downloaded == 1
    after = snapshot(root)
    assert changed(before, after) == LINUX_64_REWRITTEN
    assert shards(root, "noarch") == noarch_shards
    assert "brandnew-1.0-0.conda" in json.loads(after["linux-64/repodata.json"][1])["packages.conda"]

    third = await synced.again()

    assert third.index_files == 0 and snapshot(root) == after


@pytest.mark.parametrize("damage", ["truncate", "delete-zst", "lose-state"])
async def test_a_damaged_index_file_or_lost_state_is_repaired_by_the_next_sync(
        upstream, write_config, damage: str) -> None:
    synced = await Synced.first_sync(upstream, write_config)
    root = synced.root
    good = snapshot(root)
    if damage == "truncate":
        (root / "noarch" / "repodata.json").write_bytes(b'{"packages": {}}')
    elif damage == "delete-zst":
        (root / "noarch" / "repodata.json.zst").unlink()
    else:
        (synced.store.state_dir(synced.mirror.name) / "index-cache.json").unlink()

    result = await synced.again()

    assert result.index_files > 0
    repaired = snapshot(root)
    for relpath in ("noarch/repodata.json", "noarch/repodata.json.zst"):
        assert repaired[relpath][1] == good[relpath][1], relpath
    assert zstandard.ZstdDecompressor().decompress(repaired["noarch/repodata.json.zst"][1]) \
        == repaired["noarch/repodata.json"][1]


def real(relpath: str):
    path = TESTDATA / relpath
    return parse_repodata(path.read_bytes(), path.parent.name if "/" in relpath else "linux-64", 0, str(path))


def test_shards_from_worker_processes_are_byte_identical_to_in_process_ones() -> None:
    index = real("subchannel-demo/linux-64/repodata.json")
    here = render_shards("linux-64", index.records, workers=1)
    pooled = render_shards("linux-64", index.records, workers=2)
    assert here.encoded == pooled.encoded == len({r.name for r in index.records})
    assert here.new == pooled.new and here.cache == pooled.cache
    decoded = [decode_shard(data) for data in pooled.new.values()]
    assert sum(len(d["packages"]) + len(d["packages.conda"]) for d in decoded) == len(index.records)


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_written_by_their_encoder_are_the_bytes_encode_makes(tmp_path: Path, workers: int) -> None:
    index = real("rattler_pytorch_linux-64_repodata.json")
    expected = render_shards("linux-64", index.records, workers=1)
    plan = plan_shards("linux-64", index.records)
    written = dict(plan.write(tmp_path, ".mirrorgen-tmp-test-", workers=workers))
    assert set(written) == set(expected.new) and len(written) == len({r.name for r in index.records})
    for relpath, tmp in written.items():
        assert tmp.parent == tmp_path and tmp.name == f".mirrorgen-tmp-test-{relpath[7:71]}"
        assert tmp.read_bytes() == expected.new[relpath], relpath
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in written.values())
    # Each index says when it was made (created_at, to the second: the two may straddle one).
    made, wanted = decode_shard_index(plan.index()), decode_shard_index(expected.index)
    assert made["info"].pop("created_at") and wanted["info"].pop("created_at")
    assert made == wanted


def test_the_shard_cache_skips_unchanged_names_only_while_their_files_exist() -> None:
    index = real("rattler_pytorch_linux-64_repodata.json")
    first = render_shards("linux-64", index.records, workers=1)
    on_disk = set(first.new)
    again = render_shards("linux-64", index.records, cache=first.cache, on_disk=on_disk, workers=1)
    assert again.encoded == 0 and again.reused == first.encoded and not again.new
    assert again.cache == first.cache
    # One shard file gone: that name is encoded again, to the same bytes.
    gone = sorted(on_disk)[0]
    third = render_shards("linux-64", index.records, cache=first.cache, on_disk=on_disk - {gone}, workers=1)
    assert third.encoded == 1 and third.new == {gone: first.new[gone]}
    # A changed record changes its name's content key: a cache hit is impossible.
    stale = {name: ("0" * 64, digest) for name, (_, digest) in first.cache.items()}
    fourth = render_shards("linux-64", index.records, cache=stale, on_disk=on_disk, workers=1)
    assert fourth.encoded == first.encoded


def test_streamed_repodata_is_exact_and_its_zst_records_the_content_size(tmp_path: Path) -> None:
    index = real("davhau_intel_linux-64_2023-08-28.json")
    repodata = render_repodata("linux-64", index.records, index.info, ["gone-1-0.tar.bz2"])
    data = repodata.render()
    assert len(data) == repodata.size
    doc = json.loads(data)
    assert len(doc["packages"]) + len(doc["packages.conda"]) == len(index.records)
    assert doc["removed"] == ["gone-1-0.tar.bz2"]
    store = Store(tmp_path)
    store.write_with_zst(tmp_path / "m" / "repodata.json", repodata.chunks(per_chunk=7), repodata.size)
    zst = (tmp_path / "m" / "repodata.json.zst").read_bytes()
    assert zstandard.frame_content_size(zst) == len(data)
    assert zstandard.ZstdDecompressor().decompress(zst) == data == (tmp_path / "m" / "repodata.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["repodata.json", "repodata.json.zst"]


def test_write_batch_publishes_every_file_and_leaves_no_temporary_one(tmp_path: Path) -> None:
    store = Store(tmp_path)
    items = [(tmp_path / "m" / "a" / "shards" / f"{i:064x}.msgpack.zst", bytes([i]) * (i * 1000))
             for i in range(1, 40)]
    assert store.write_batch(items) == len(items)
    for path, data in items:
        assert path.read_bytes() == data
    assert [p.name for p in (tmp_path / "m" / "a" / "shards").iterdir() if p.name.startswith(".")] == []


def test_a_corrupt_manifest_trusts_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (store.state_dir("m")).mkdir(parents=True)
    (store.state_dir("m") / "manifest.json").write_bytes(b'{"version": 1, "files": {"a/b.conda": [1, 2]')
    manifest = Manifest(store, "m").load()
    assert manifest.entries == {}


def test_worker_errors_reach_the_caller() -> None:
    with WorkerPool(1) as pool:
        with pytest.raises(WorkerError, match="JSONDecodeError|unexpected"):
            list(pool.map("encode_shards", [[b"[not json"]]))
    with WorkerPool(1) as pool, pytest.raises(ValueError, match="unknown job"):
        list(pool.map("rm -rf", [[b""]]))


def test_depends_with_a_non_string_reads_as_empty_and_the_record_stays_raw() -> None:
    record = (b'{"name":"odd","version":"1","build":"0","build_number":0,'
              b'"depends":["python >=3.9", 7],"constrains":[]}')
    data = b'{"packages":{"odd-1-0.tar.bz2":' + record + b'}}'
    index = parse_repodata(data, "noarch", 0, "test://odd")
    (odd,) = index.records
    assert odd.depends == [] and bytes(odd.raw) == record


def test_shards_packed_by_msgspec_are_the_bytes_msgpack_would_write() -> None:
    import msgpack

    from mirrorgen.conda.shards import pack_shard_source, shard_source

    index = real("davhau_intel_linux-64_2023-08-28.json")
    groups: dict[str, list] = {}
    for r in index.records:
        groups.setdefault(r.name, []).append(r)
    for group in groups.values():
        source = shard_source({r.fn: r.raw for r in group if not r.is_conda},
                              {r.fn: r.raw for r in group if r.is_conda})
        packed = pack_shard_source(source)
        assert msgpack.packb(msgpack.unpackb(packed, raw=False), use_bin_type=True) == packed


@pytest.mark.parametrize("relpath", sorted(p.name for p in TESTDATA.glob("*.json")))
def test_a_shard_source_built_from_records_is_the_general_one(relpath: str) -> None:
    from mirrorgen.conda.shards import records_source, shard_source

    index = real(relpath)
    plan = plan_shards("linux-64", index.records)
    assert plan.misses and not plan.complete
    for name, group in plan.misses:
        assert records_source(group) == shard_source({r.fn: r.raw for r in group if not r.is_conda},
                                                     {r.fn: r.raw for r in group if r.is_conda}), name
