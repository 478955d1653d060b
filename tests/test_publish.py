"""Publishing index files on several threads at once keeps the order the tree needs: new shards
durable before anything that names them, nothing renamed when a step fails, and no temporary file
left behind either way. Disk faults are injected at the one call that writes a file."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mirrorgen.conda import writer
from mirrorgen.store import Store
from mirrorgen.tempfiles import TEMP_PREFIX, unnamed_temps
from mirrorgen.sync import sync_mirror
from mirrorgen.workers import WorkerPool

INDEX_NAMES = ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst", "channeldata.json")


def index_files(mirror: Path) -> dict[str, bytes]:
    return {p.relative_to(mirror).as_posix(): p.read_bytes()
            for p in sorted(mirror.rglob("*")) if p.is_file() and p.name in INDEX_NAMES}


def temporaries(root: Path) -> list[str]:
    """Staged files not published: named ones in ``root``, and unnamed ones this process holds."""
    return [*(p.as_posix() for p in root.rglob(f"{TEMP_PREFIX}*")), *["(unnamed)"] * unnamed_temps()]


def hotfix(channel: Path) -> None:
    """Change one record of every subdir upstream (a repodata hotfix): each subdir gets a new
    shard, a new repodata.json and a new shard index."""
    for subdir in ("linux-64", "noarch"):
        path = channel / subdir / "repodata.json"
        doc = json.loads(path.read_bytes())
        for key in ("packages.conda", "packages"):
            if doc.get(key):
                fn = sorted(doc[key])[0]
                doc[key][fn]["depends"] = [*doc[key][fn].get("depends", []), "hotfix-added >=1"]
                break
        path.write_text(json.dumps(doc))
        for suffix in (".zst", ".bz2"):
            (channel / subdir / f"repodata.json{suffix}").unlink(missing_ok=True)


def fail_when(monkeypatch: pytest.MonkeyPatch, method: str, predicate: Any) -> list[str]:
    """Make ``Store.<method>(final, ...)`` raise ENOSPC for the paths ``predicate`` picks."""
    original = getattr(Store, method)
    hits: list[str] = []

    def faulty(self: Store, final: Path, *args: Any, **kwargs: Any) -> Any:
        if predicate(final):
            hits.append(final.name)
            raise OSError(28, "No space left on device", str(final))
        return original(self, final, *args, **kwargs)

    monkeypatch.setattr(Store, method, faulty)
    return hits


def fail_writing_shards(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The encoder writes the first shard of a batch, then finds the disk full: that shard's
    temporary file is left for the caller, which knows it by the prefix only."""
    original = writer.write_shard_files
    hits: list[str] = []

    def faulty(directory: Any, prefix: str, sources: Any) -> list[bytes]:
        original(directory, prefix, sources[:1])
        hits.append(prefix)
        raise OSError(28, "No space left on device", str(directory))

    monkeypatch.setattr(writer, "write_shard_files", faulty)
    return hits


@pytest.mark.parametrize("fault", ["shard", "repodata", "channeldata"])
async def test_a_failed_publish_leaves_the_last_good_index_and_no_temporary_file(
        upstream, write_config, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    config = write_config(upstream.channel_url, mode="passive")
    store, mirror = Store(config.root), config.mirrors[0]
    await sync_mirror(config, mirror, store, progress=False)
    mirror_dir = store.mirror_dir(mirror.name)
    before = index_files(mirror_dir)
    hotfix(upstream.root / "demo")

    if fault == "shard":  # the disk fills up while the encoder writes the new shards
        hits = fail_writing_shards(monkeypatch)
    elif fault == "repodata":  # the new linux-64/repodata.json cannot be written
        hits = fail_when(monkeypatch, "open_temp", lambda final: final.name == "repodata.json"
                         and final.parent.name == "linux-64")
    else:
        hits = fail_when(monkeypatch, "stage", lambda final: final.name == "channeldata.json")
    with pytest.raises(OSError, match="No space left"):
        await sync_mirror(config, mirror, store, progress=False)

    assert hits
    assert index_files(mirror_dir) == before  # every index file as the last good run left it
    assert temporaries(config.root) == []

    monkeypatch.undo()  # the disk is fine again: the next run publishes the hotfix
    await sync_mirror(config, mirror, store, progress=False)
    after = index_files(mirror_dir)
    assert after["linux-64/repodata.json"] != before["linux-64/repodata.json"]
    assert b"hotfix-added" in after["linux-64/repodata.json"]
    assert temporaries(config.root) == []


async def test_new_shards_are_durable_before_anything_else_is_renamed(
        upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(upstream.channel_url, mode="passive")
    store, mirror = Store(config.root), config.mirrors[0]
    renamed: list[str] = []
    original = Store.publish_temps

    def watch(self: Store, items: Any) -> None:
        original(self, items)
        mirror_dir = store.mirror_dir(mirror.name)
        renamed.extend(final.relative_to(mirror_dir).as_posix() for _, final in items
                       if final.is_relative_to(mirror_dir))  # not the state files

    slow_stage = Store.stage_batch

    def stage_batch(self: Store, items: Any) -> Any:
        staged = slow_stage(self, items)
        time.sleep(0.3)  # the shards come last by far: the rest must wait for them all the same
        return staged

    monkeypatch.setattr(Store, "publish_temps", watch)
    monkeypatch.setattr(Store, "stage_batch", stage_batch)
    await sync_mirror(config, mirror, store, progress=False)

    shards = [p for p in renamed if "/shards/" in p]
    others = [p for p in renamed if "/shards/" not in p]
    assert shards and others
    assert max(renamed.index(p) for p in shards) < min(renamed.index(p) for p in others)
    # and among the rest, the order the channel gives: shard index, .zst, .json, channeldata last
    for subdir in ("linux-64", "noarch"):
        order = [others.index(f"{subdir}/{n}") for n in
                 ("repodata_shards.msgpack.zst", "repodata.json.zst", "repodata.json")]
        assert order == sorted(order)
    assert others[-1] == "channeldata.json"


def test_write_batch_commits_group_by_group_and_a_failure_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    directory = tmp_path / "m" / "linux-64" / "shards"
    items = [(directory / f"{i:064x}.msgpack.zst", bytes([i]) * 100) for i in range(10)]
    assert store.write_batch(items, group=3) == 10
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p, _ in items)

    def failing() -> Any:
        for i in range(10, 20):
            if i == 17:
                raise OSError(28, "No space left on device")
            yield directory / f"{i:064x}.msgpack.zst", b"x"

    with pytest.raises(OSError):
        store.write_batch(failing(), group=3)
    names = {p.name for p in directory.iterdir()}
    assert not [n for n in names if n.startswith(TEMP_PREFIX)]
    # The groups before the failure are published (shards are named by their content: an
    # unreferenced one is harmless); the group the failure hit is not.
    assert {f"{i:064x}.msgpack.zst" for i in range(10, 16)} <= names
    assert f"{16:064x}.msgpack.zst" not in names


def test_worker_pool_raises_what_making_a_task_raised() -> None:
    def tasks() -> Any:
        yield [b"[{},{},[]]"]
        raise RuntimeError("cannot make the second task")

    with WorkerPool(2) as pool:
        results = pool.map("encode_shards", tasks())
        assert len(next(results)) == 1
        with pytest.raises(RuntimeError, match="second task"):
            next(results)


def test_worker_pool_map_left_early_stops_drawing_tasks_and_closes() -> None:
    drawn = []

    def tasks() -> Any:
        for i in range(10_000):
            drawn.append(i)
            yield [b"[{},{},[]]"]

    before = threading.active_count()
    with WorkerPool(2) as pool:
        results = pool.map("encode_shards", tasks(), depth=2)
        next(results)
        results.close()  # the consumer is gone: the dispatcher stops, nothing hangs
    assert len(drawn) < 100
    assert threading.active_count() <= before


def test_worker_processes_run_this_copy_of_mirrorgen_whatever_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another copy of mirrorgen in the current directory (a second checkout, say) whose worker
    # answers differently: the pool must not start that one.
    fake = tmp_path / "mirrorgen"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "workers.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    with WorkerPool(1) as pool:
        assert list(pool.map("encode_shards", [[b"[{},{},[]]"]])) == [[zstd_of_empty_shard()]]


def zstd_of_empty_shard() -> bytes:
    from mirrorgen.conda.shards import encode_shard

    return encode_shard({}, {})
