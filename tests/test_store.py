"""Staged files with no name (O_TMPFILE, mirrorgen.tempfiles.OpenTemp) and the named fallback: what
the tree shows before and after a group commit, and that no descriptor is left open."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirrorgen import tempfiles
from mirrorgen.store import Store
from mirrorgen.tempfiles import TEMP_PREFIX, OpenTemp, unnamed_temps


def named_temps(root: Path) -> list[Path]:
    return list(root.rglob(f"{TEMP_PREFIX}*"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def items(root: Path, count: int, tag: bytes = b"") -> list[tuple[Path, bytes]]:
    return [(root / "m" / "shards" / f"s{i}.msgpack.zst", b"shard %d %s" % (i, tag)) for i in range(count)]


@pytest.fixture(autouse=True)
def no_unnamed_temps_left() -> None:
    yield
    assert unnamed_temps() == 0


def test_unnamed_temps_show_nowhere_until_published_then_under_their_final_names(tmp_path: Path) -> None:
    store = Store(tmp_path)
    wanted = items(tmp_path, 50)
    temps = store.stage_batch(wanted)
    assert all(isinstance(tmp, OpenTemp) for tmp, _ in temps)
    assert unnamed_temps() == 50
    shards = tmp_path / "m" / "shards"
    assert os.listdir(shards) == []  # neither a temporary nor a final name yet
    assert temps[7][0].read_bytes() == b"shard 7 "
    store.publish_temps(temps)
    assert unnamed_temps() == 0 and not named_temps(tmp_path)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == {f.name: d for f, d in wanted}


def test_publishing_an_unnamed_temp_over_a_file_replaces_it(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.publish_temps(store.stage_batch(items(tmp_path, 3, b"old")))
    inode = (tmp_path / "m" / "shards" / "s1.msgpack.zst").stat().st_ino
    store.publish_temps(store.stage_batch(items(tmp_path, 3, b"new")))
    path = tmp_path / "m" / "shards" / "s1.msgpack.zst"
    assert path.read_bytes() == b"shard 1 new" and path.stat().st_ino != inode
    assert sorted(os.listdir(path.parent)) == [f"s{i}.msgpack.zst" for i in range(3)]


def test_discarded_unnamed_temps_leave_nothing_and_close_their_descriptors(tmp_path: Path) -> None:
    store = Store(tmp_path)
    # The first use opens /proc/self/fd, kept for the process.
    Store.discard_temps(store.stage_batch(items(tmp_path, 1)))
    before = open_fds()
    temps = store.stage_batch(items(tmp_path, 40))
    assert open_fds() == before + 40
    Store.discard_temps(temps)
    Store.discard_temps(temps)  # again: nothing (never another file's descriptor)
    assert open_fds() == before and os.listdir(tmp_path / "m" / "shards") == []


def test_past_the_descriptor_limit_files_get_temporary_names(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    Store.discard_temps(store.stage_batch(items(tmp_path, 1)))  # sets the limit
    monkeypatch.setattr(tempfiles.ANONYMOUS, "limit", 5)
    temps = store.stage_batch(items(tmp_path, 12))
    kinds = [isinstance(tmp, OpenTemp) for tmp, _ in temps]
    assert kinds == [True] * 5 + [False] * 7
    assert len(named_temps(tmp_path)) == 7
    store.publish_temps(temps)
    assert not named_temps(tmp_path) and unnamed_temps() == 0
    assert len(os.listdir(tmp_path / "m" / "shards")) == 12


def test_without_o_tmpfile_files_get_temporary_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfiles, "_O_TMPFILE", 0)
    store = Store(tmp_path)
    temps = store.stage_batch(items(tmp_path, 4))
    assert all(isinstance(tmp, Path) for tmp, _ in temps) and len(named_temps(tmp_path)) == 4
    store.publish_temps(temps)
    assert not named_temps(tmp_path) and len(os.listdir(tmp_path / "m" / "shards")) == 4


def test_the_descriptor_limit_leaves_most_descriptors_to_the_rest() -> None:
    import resource

    limit = tempfiles._AnonymousFiles()._init_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 0 < limit <= min(16384, soft // 2)


@pytest.mark.parametrize("way", ["by-descriptor", "through-proc", "os-functions"])
def test_linking_and_closing_unnamed_temps_with_and_without_ctypes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    calls = tempfiles._HeldCalls()
    if way == "through-proc":  # as after a kernel refused linkat(fd, "", AT_EMPTY_PATH)
        calls._by_fd = False
    if way == "os-functions":  # no ctypes or no libc
        calls._linkat = calls._close = None
    assert (calls._linkat is not None) is (way != "os-functions")
    monkeypatch.setattr(tempfiles, "_HELD", calls)
    store = Store(tmp_path)
    before = open_fds()
    store.publish_temps(store.stage_batch(items(tmp_path, 6)))
    store.publish_temps(store.stage_batch(items(tmp_path, 6, b"again")))  # over the first ones
    assert open_fds() == before
    shards = tmp_path / "m" / "shards"
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == {
        f"s{i}.msgpack.zst": b"shard %d again" % i for i in range(6)}

    # An error names the file, as os.link's would, and the caller can still discard the rest.
    temps = store.stage_batch(items(tmp_path / "gone", 2))
    os.rmdir(tmp_path / "gone" / "m" / "shards")  # unnamed files: the directory is empty
    by_fd = calls._by_fd  # False after "by-descriptor" only where the kernel refuses it
    with pytest.raises(FileNotFoundError) as info:
        store.publish_temps(temps)
    assert str(tmp_path / "gone" / "m" / "shards" / "s0.msgpack.zst") in str(info.value)
    assert calls._by_fd is by_fd  # an error both ways have does not change the way
    Store.discard_temps(temps)
    assert open_fds() == before
