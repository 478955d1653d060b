"""The benchmark harness itself: its synthetic upstreams are deterministic and real-shaped, and
benchmark 1 runs end to end at a small size (mirrorgen and the naive floor keep the same records,
which the benchmark checks before it prints a figure)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_metadata, common, floors, synth
from benchmarks.common import Mirrorgen, REPO, serve_nginx
from mirrorgen import sink


def test_synthetic_records_are_distinct_deterministic_and_a_prefix_of_larger_runs() -> None:
    small = list(synth.conda_records(3000, seed=7))
    large = list(synth.conda_records(4000, seed=7))
    assert small == large[:3000]
    names = [fn for fn, _ in large]
    assert len(set(names)) == len(names)
    assert len({r["name"] for _, r in large}) < len(large) / 2  # names repeat, as on conda-forge
    assert all({"name", "version", "build", "depends", "sha256"} <= r.keys() for _, r in large)


def test_generated_channel_files_match_their_records(tmp_path: Path) -> None:
    up = synth.generate_conda(tmp_path / "up", 500, files=True)
    doc = json.loads((tmp_path / "up" / "linux-64" / "repodata.json").read_bytes())
    fn, record = next(iter(doc["packages.conda"].items()))
    data = (tmp_path / "up" / "linux-64" / fn).read_bytes()
    assert record["size"] == len(data) and len(up.files) == 500


def test_benchmark_1_runs_and_both_sides_keep_the_same_records(tmp_path: Path) -> None:
    table = bench_metadata.run(tmp_path, [Mirrorgen("now", REPO)], records=3000, repeat=1)
    rows = {row["run"]: row for row in table.rows}
    assert rows["naive floor"]["records"] == rows["mirrorgen now, cold"]["records"] > 0
    assert rows["mirrorgen now, update"]["records"] > rows["mirrorgen now, cold"]["records"]
    assert all(row["wall_s"] > 0 and row["rss_mib"] > 0 for row in table.rows)


def test_floors_check_every_file_and_write_each_in_full(tmp_path: Path) -> None:
    """The floors are figures the README compares mirrorgen against, so they must do the work
    they claim: a file whose bytes are not upstream's sha256 fails ``receive``, ``fetch`` and
    ``both``, and what ``write``, ``fetch`` and ``both`` leave is every file at its size
    (``fetch``: its very bytes)."""
    up = tmp_path / "up"
    synth.generate_conda(up, 40, files=True, size_range=(1, 600 << 10))
    listed = tmp_path / "files.json"
    files = floors.listing(up, ["linux-64", "noarch"], listed)
    assert floors._DIRECT_MIN == sink.DIRECT_MIN  # the floor writes as mirrorgen does
    assert len(files) == 40 and any(size >= floors._DIRECT_MIN for _, size, _ in files)
    with serve_nginx(up, tmp_path / "nginx") as server:
        assert floors.main(["receive", server.base_url, str(listed), "3"]) == 0
        assert floors.main(["fetch", f"{server.base_url},{tmp_path / 'fetched'}", str(listed), "2"]) == 0
        assert floors.main(["write", str(tmp_path / "written"), str(listed), "2"]) == 0
        assert floors.main(["both", f"{server.base_url},{tmp_path / 'both'}", str(listed), "2"]) == 0
        for relpath, size, _ in files:
            assert (tmp_path / "fetched" / relpath).read_bytes() == (up / relpath).read_bytes()
            assert (tmp_path / "written" / relpath).stat().st_size == size
            assert (tmp_path / "both" / relpath).stat().st_size == size

        victim = up / files[7][0]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 1  # same size, other bytes
        victim.write_bytes(data)
        assert floors.main(["receive", server.base_url, str(listed), "3"]) == 1
        assert floors.main(["fetch", f"{server.base_url},{tmp_path / 'again'}", str(listed), "1"]) == 1
        assert floors.main(["both", f"{server.base_url},{tmp_path / 'both2'}", str(listed), "1"]) == 1


def test_memory_backing_runs_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real_run = subprocess.run

    def spy(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(cmd)
        return real_run(cmd, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(common.subprocess, "run", spy)
    monkeypatch.setattr(common, "back_max", 0)
    common.back_memory()
    assert calls == []  # --quick and the tests: nothing touched
    monkeypatch.setattr(common, "back_max", 16 << 20)
    common.back_memory()  # the child maps and populates 16 MiB, then exits 0 (check=True)
    assert len(calls) == 1 and calls[0][-1] == str(16 << 20)
