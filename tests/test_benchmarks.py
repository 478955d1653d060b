"""The benchmark harness itself: its synthetic upstreams are deterministic and real-shaped, and
benchmark 1 runs end to end at a small size (mirrorgen and the naive floor keep the same records,
which the benchmark checks before it prints a figure)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_metadata, synth
from benchmarks.common import Mirrorgen, REPO


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
