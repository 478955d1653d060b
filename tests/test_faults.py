"""Failures upstream and on our side: nothing corrupt is published, nothing good is lost."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from mirrorgen.errors import RepodataError, UpstreamError
from mirrorgen.store import Store
from mirrorgen.tempfiles import TEMP_PREFIX, unnamed_temps
from mirrorgen.sync import sync_mirror
from mirrorgen.verify import verify_mirror
from tests.support.cli import cli


def listed(root: Path, subdir: str) -> set[str]:
    doc = orjson.loads((root / "conda-demo" / subdir / "repodata.json").read_bytes())
    return set(doc["packages"]) | set(doc["packages.conda"])


async def test_upstream_500_is_retried_until_it_succeeds(upstream, write_config) -> None:
    package = upstream.files("linux-64")[0]
    upstream.control.fail_first = {f"demo/linux-64/{package}": 2, "demo/noarch/repodata.json.zst": 1}
    config = write_config(upstream.channel_url)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {}
    assert upstream.control.count(f"demo/linux-64/{package}") == 3
    assert upstream.control.count("demo/noarch/repodata.json.zst") == 2
    assert package in listed(config.root, "linux-64")


async def test_a_file_failing_its_sha256_is_not_published_and_the_run_exits_1(upstream, write_config) -> None:
    bad = upstream.files("linux-64")[0]
    upstream.control.corrupt.add(f"demo/linux-64/{bad}")
    config = write_config(upstream.channel_url)
    code, out, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1
    assert bad in err and "sha256 mismatch" in err and "Traceback" not in err
    assert bad not in listed(config.root, "linux-64")
    assert not (config.root / "conda-demo" / "linux-64" / bad).exists()
    assert not list(config.root.rglob(f"{TEMP_PREFIX}*")) and unnamed_temps() == 0
    # Everything else was published, and installs are verified by the client too.
    others = set(upstream.files("linux-64")) - {bad}
    assert others <= listed(config.root, "linux-64")
    assert all((config.root / "conda-demo" / "linux-64" / f).exists() for f in others)
    report = json.loads((await cli("report", "-c", str(config.path), "--json"))[1])
    assert f"linux-64/{bad}" in report["conda-demo"]["failed"]
    status = json.loads((await cli("status", "-c", str(config.path), "--json"))[1])
    assert status["mirrors"][0]["state"] == "failed"

    # Upstream fixed: the next run fetches only that file and publishes it.
    upstream.control.corrupt.clear()
    before = len(upstream.control.requests)
    code, _, _ = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0 and bad in listed(config.root, "linux-64")
    fetched = [r for r in upstream.control.requests[before:] if r.endswith((".conda", ".tar.bz2"))]
    assert fetched == [f"GET /demo/linux-64/{bad}"]


@pytest.mark.parametrize("verify", [True, False])
async def test_verify_checksums_false_admits_a_file_without_a_hash_but_never_one_failing_its_hash(
        upstream, write_config, verify: bool) -> None:
    # seed 001's cas-sync defaults carry `verify_checksum: False`: a migrated file must not turn
    # a mirror into one that publishes corrupt files (SPEC: upstream's hashes are checked before
    # a file is published, in every mode). What it relaxes: a file upstream gives no hash for.
    subdir = upstream.root / "demo" / "linux-64"
    doc = orjson.loads((subdir / "repodata.json").read_bytes())
    unhashed, corrupt = upstream.files("linux-64")[:2]
    for key in ("packages", "packages.conda"):
        if unhashed in doc.get(key, {}):
            for field in ("sha256", "md5"):
                doc[key][unhashed].pop(field, None)
    for name in ("repodata.json.zst", "repodata.json.bz2"):
        (subdir / name).unlink()
    (subdir / "repodata.json").write_bytes(orjson.dumps(doc))
    upstream.control.corrupt.add(f"demo/linux-64/{corrupt}")
    config = write_config(upstream.channel_url, verify_checksums=verify)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and "Traceback" not in err
    assert corrupt in err and "sha256 mismatch" in err
    assert corrupt not in listed(config.root, "linux-64")
    assert not (config.root / "conda-demo" / "linux-64" / corrupt).exists()
    if verify:
        assert "upstream publishes no sha256 or md5" in err
        assert unhashed not in listed(config.root, "linux-64")
    else:
        assert unhashed in listed(config.root, "linux-64")
        assert (config.root / "conda-demo" / "linux-64" / unhashed).read_bytes() == (subdir / unhashed).read_bytes()


async def test_a_rerun_downloads_nothing_that_is_already_verified(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    store = Store(config.root)
    first = await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert first.downloaded == 8
    before = len(upstream.control.requests)
    second = await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert second.downloaded == 0 and second.reused == 8 and second.rehashed == 0
    assert not [r for r in upstream.control.requests[before:] if r.endswith((".conda", ".tar.bz2"))]


async def test_a_run_killed_half_way_completes_on_rerun_without_fetching_verified_files_again(
        upstream, write_config) -> None:
    upstream.control.delay = 0.4
    config = write_config(upstream.channel_url, concurrency=1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrorgen.cli", "sync", "-c", str(config.path), "--quiet",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    journal = config.root / ".mirrorgen" / "conda-demo" / "manifest.journal"
    for _ in range(200):
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 3:
            break
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    verified_before_kill = [orjson.loads(line)[1] for line in journal.read_bytes().splitlines()]
    assert 3 <= len(verified_before_kill) < 8
    # Killed before publishing: no index yet, and no partial file under a final name.
    assert not (config.root / "conda-demo" / "linux-64" / "repodata.json").exists()
    # Every file under its final name is complete and exactly upstream's.
    on_disk = [p for p in (config.root / "conda-demo").rglob("*")
               if p.is_file() and not p.name.startswith(TEMP_PREFIX)]
    assert len(on_disk) >= len(verified_before_kill)
    for path in on_disk:
        relpath = path.relative_to(config.root / "conda-demo").as_posix()
        assert path.read_bytes() == (upstream.root / "demo" / relpath).read_bytes(), relpath

    # The killed run's state says running; no process holds the lock, so status says stopped.
    code, out, _ = await cli("status", "-c", str(config.path), "--json")
    assert code == 0 and json.loads(out)["mirrors"][0]["state"] == "stopped"

    upstream.control.delay = 0
    before = len(upstream.control.requests)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.reused >= len(verified_before_kill)
    refetched = {r.split("/demo/", 1)[1] for r in upstream.control.requests[before:]
                 if r.endswith((".conda", ".tar.bz2"))}
    assert not refetched & set(verified_before_kill)
    assert len(listed(config.root, "linux-64") | listed(config.root, "noarch")) == 8
    assert (await verify_mirror(config.mirrors[0], Store(config.root))).failed is False


async def test_a_failed_upstream_leaves_the_last_published_index_in_place(upstream, write_config) -> None:
    config = write_config(upstream.channel_url, retries=1)
    store = Store(config.root)
    await sync_mirror(config, config.mirrors[0], store, progress=False)
    index = config.root / "conda-demo" / "linux-64" / "repodata.json"
    published = index.read_bytes()
    upstream.control.fail_first = {f"demo/linux-64/repodata.json{ext}": 99 for ext in (".zst", ".bz2", "")}
    with pytest.raises(UpstreamError, match="HTTP 500"):
        await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert index.read_bytes() == published
    assert store.read_state("conda-demo", "status.json")["state"] == "failed"


async def test_malformed_repodata_is_a_clear_error_and_writes_nothing(upstream, write_config) -> None:
    for name in ("repodata.json.zst", "repodata.json.bz2"):
        (upstream.root / "demo" / "linux-64" / name).unlink()
    (upstream.root / "demo" / "linux-64" / "repodata.json").write_text('{"packages": {"a-1-0.conda": ')
    config = write_config(upstream.channel_url)
    with pytest.raises(RepodataError, match="malformed index"):
        await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert not (config.root / "conda-demo").exists()
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "repodata.json: malformed index" in err
    assert "Traceback" not in err


async def test_hostile_file_names_never_write_outside_the_tree(upstream, write_config, tmp_path: Path) -> None:
    subdir = upstream.root / "demo" / "noarch"
    for name in ("repodata.json.zst", "repodata.json.bz2"):
        (subdir / name).unlink()
    doc = orjson.loads((subdir / "repodata.json").read_bytes())
    record = next(iter(doc["packages.conda"].values()))
    for evil in ("../../evil-1.0-0.conda", "/etc/evil-1.0-0.conda", "..", "sub/dir-1.0-0.conda"):
        doc["packages.conda"][evil] = record
    (subdir / "repodata.json").write_bytes(orjson.dumps(doc))
    config = write_config(upstream.channel_url)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.kept == 8
    assert not (tmp_path / "evil-1.0-0.conda").exists() and not (config.root / "evil-1.0-0.conda").exists()
    report = Store(config.root).read_state("conda-demo", "report.json")
    assert report["excluded"]["upstream"]["count"] == 4
    assert not [r for r in upstream.control.requests if "evil" in r or "sub/dir" in r]


async def test_dry_run_writes_nothing_and_clean_removes_what_the_filters_no_longer_keep(
        upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    code, out, _ = await cli("sync", "-c", str(config.path), "--dry-run")
    assert code == 0 and "8 files to fetch" in out
    assert not config.root.exists()  # not even a lock file or a state directory

    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    old_base = next(f for f in upstream.files("linux-64") if f.startswith("demo-base-0.9"))
    # Tighten the filters: the old demo-base is no longer wanted.
    data = yaml.safe_load(config.path.read_text())
    data["mirrors"][0]["filters"] = {"latest": 1}
    config.path.write_text(yaml.safe_dump(data))
    code, out, _ = await cli("sync", "-c", str(config.path))
    assert code == 0 and old_base not in listed(config.root, "linux-64")
    assert (config.root / "conda-demo" / "linux-64" / old_base).exists()  # nothing deleted without --clean

    code, out, _ = await cli("clean", "-c", str(config.path), "--dry-run")
    assert code == 0 and f"linux-64/{old_base}" in out
    assert (config.root / "conda-demo" / "linux-64" / old_base).exists()
    code, out, _ = await cli("clean", "-c", str(config.path))
    assert code == 0 and not (config.root / "conda-demo" / "linux-64" / old_base).exists()
    code, out, _ = await cli("verify", "-c", str(config.path))
    assert code == 0 and "0 missing, 0 corrupt, 0 stray" in out


async def test_verify_reports_corrupt_missing_and_stray_files(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    subdir = config.root / "conda-demo" / "noarch"
    files = sorted(p for p in subdir.iterdir() if p.name.endswith((".conda", ".tar.bz2")))
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].unlink()
    (subdir / "stray-1.0-0.conda").write_bytes(b"x")
    code, out, _ = await cli("verify", "-c", str(config.path), "--json")
    doc = json.loads(out)["mirrors"][0]
    assert code == 1
    assert list(doc["corrupt"]) == [f"noarch/{files[0].name}"]
    assert doc["missing"] == [f"noarch/{files[1].name}"]
    assert doc["stray"] == ["noarch/stray-1.0-0.conda"]
    # A sync repairs both: the manifest no longer trusts the changed and the missing file.
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert (await verify_mirror(config.mirrors[0], Store(config.root))).failed is False


async def test_passive_mode_writes_indexes_only(upstream, write_config) -> None:
    config = write_config(upstream.channel_url, mode="passive")
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.downloaded == 0 and result.kept == 8
    assert len(listed(config.root, "linux-64") | listed(config.root, "noarch")) == 8
    assert not [p for p in (config.root / "conda-demo").rglob("*") if p.name.endswith((".conda", ".tar.bz2"))]
    assert not [r for r in upstream.control.requests if r.endswith((".conda", ".tar.bz2"))]


def test_two_runs_of_one_mirror_never_overlap(tmp_path: Path) -> None:
    from mirrorgen.errors import LockedError

    store = Store(tmp_path)
    with store.lock("m"):
        with pytest.raises(LockedError, match="already being synced"):
            with store.lock("m"):
                pass
    with store.lock("m"):
        pass


@pytest.mark.parametrize("relpath", ["../x", "/etc/passwd", "a/../../x", "a//b", "a\\b", ".mirrorgen/x",
                                     "x\x00y", "a/.", ""])
def test_store_refuses_paths_outside_the_mirror(tmp_path: Path, relpath: str) -> None:
    from mirrorgen.errors import UnsafePath

    with pytest.raises(UnsafePath):
        Store(tmp_path).resolve("m", relpath)


async def test_files_on_disk_but_not_in_the_manifest_are_rehashed_not_downloaded(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    store = Store(config.root)
    await sync_mirror(config, config.mirrors[0], store, progress=False)
    for name in ("manifest.json", "manifest.journal"):
        (config.root / ".mirrorgen" / "conda-demo" / name).unlink(missing_ok=True)
    # One file was damaged meanwhile: it must be fetched again, not trusted.
    damaged = next((config.root / "conda-demo" / "noarch").glob("*.conda"))
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    before = len(upstream.control.requests)
    result = await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert (result.rehashed, result.downloaded, result.failed) == (7, 1, {})
    fetched = [r for r in upstream.control.requests[before:] if r.endswith((".conda", ".tar.bz2"))]
    assert fetched == [f"GET /demo/noarch/{damaged.name}"]
    assert (await verify_mirror(config.mirrors[0], store)).failed is False


async def test_sync_clean_removes_files_no_longer_listed_after_the_new_index_is_live(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    stray = config.root / "conda-demo" / "linux-64" / "gone-1.0-0.tar.bz2"
    stray.write_bytes(b"old")
    data = yaml.safe_load(config.path.read_text())
    data["mirrors"][0]["filters"] = {"exclude": ["demo-bsd"]}
    config.path.write_text(yaml.safe_dump(data))
    noarch = config.root / "conda-demo" / "noarch"
    shards_before = {p.name for p in (noarch / "shards").iterdir()}
    tree_before = sorted(config.root.rglob("*"))
    # The dry run names what the real one removes, the replaced shard included, and touches nothing.
    code, out, _ = await cli("sync", "-c", str(config.path), "--clean", "--dry-run")
    would = sorted(line.split()[1] for line in out.splitlines() if line.startswith("  remove "))
    assert code == 0 and "3 to remove" in out and len(would) == 3
    assert sorted(config.root.rglob("*")) == tree_before
    code, out, _ = await cli("sync", "-c", str(config.path), "--clean", "--quiet")
    # The stray file, the demo-bsd package, and demo-bsd's shard that no index references now.
    assert code == 0 and "3 removed" in out
    assert all(not (config.root / "conda-demo" / relpath).exists() for relpath in would)
    assert [p for p in would if "/shards/" in p] == [f"noarch/shards/{name}" for name in shards_before
                                                     - {p.name for p in (noarch / "shards").iterdir()}]
    assert not stray.exists() and not list(noarch.glob("demo-bsd-*"))
    assert len(shards_before - {p.name for p in (noarch / "shards").iterdir()}) == 1
    assert not [f for f in listed(config.root, "noarch") if f.startswith("demo-bsd-")]
    channeldata = orjson.loads((config.root / "conda-demo" / "channeldata.json").read_bytes())
    assert "demo-bsd" not in channeldata["packages"] and channeldata["subdirs"] == ["linux-64", "noarch"]
    assert channeldata["packages"]["demo-base"] == {**channeldata["packages"]["demo-base"],
                                                    "subdirs": ["linux-64"], "version": "1.2"}


async def test_report_shows_each_filter_and_writes_the_dependency_report(upstream, write_config, tmp_path: Path) -> None:
    config = write_config(upstream.channel_url, filters={"only": ["demo-cli"], "licenses": ["-gpl3"],
                                                         "include_dependencies": True})
    code, _, _ = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0
    assert {f.split("-", 2)[0] + "-" + f.split("-", 2)[1] for f in
            listed(config.root, "linux-64") | listed(config.root, "noarch")} == {"demo-cli", "demo-lib", "demo-base"}
    code, out, _ = await cli("report", "-c", str(config.path))
    assert code == 0 and "excluded by only: 5" in out and "added as dependencies: 2" in out
    code, _, _ = await cli("report", "-c", str(config.path), "--dependencies", str(tmp_path / "deps.json"))
    deps = json.loads((tmp_path / "deps.json").read_text())["conda-demo"]
    assert deps["needs"]["demo-cli"] == ["demo-lib"] and sorted(deps["added"]) == ["demo-base", "demo-lib"]


async def sync_with_file_size_limit(config, limit: int) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    """``mirrorgen sync`` in a subprocess that cannot write a file past ``limit`` bytes (EFBIG,
    standing in for a full disk's ENOSPC): its exit code and stderr lines."""
    def limited() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrorgen.cli", "sync", "-c", str(config.path), "--quiet",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=limited)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, err.decode().splitlines()


async def test_a_run_the_disk_refuses_exits_1_with_one_line_and_keeps_the_last_good_index(
        upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    assert not (await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)).failed
    mirror = config.root / "conda-demo"
    before = {p: p.read_bytes() for p in mirror.rglob("*") if p.is_file()}
    biggest = max(len(data) for path, data in before.items() if "repodata" in path.name)
    # What a full disk does to the index files: their writes fail.
    code, lines = await sync_with_file_size_limit(config, biggest // 2)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("mirrorgen: error: File too large: "), lines
    named = Path(lines[0].split(": ", 3)[3])  # the file it could not write
    assert named.is_relative_to(config.root) and named.parent.is_dir()
    assert {p: p.read_bytes() for p in mirror.rglob("*") if p.is_file()} == before
    status = orjson.loads((config.root / ".mirrorgen" / "conda-demo" / "status.json").read_bytes())
    assert status["state"] == "failed" and status["error"].startswith("File too large")


async def test_a_download_the_disk_refuses_fails_the_run_with_one_line_naming_its_file(
        upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    sizes = {p.name: p.stat().st_size for p in (upstream.root / "demo").rglob("*")
             if p.name.endswith((".conda", ".tar.bz2"))}
    limit = max(sizes.values()) - 1  # the largest package cannot be written whole
    assert limit > 512  # status.json still can
    code, lines = await sync_with_file_size_limit(config, limit)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("mirrorgen: error: File too large: "), lines
    named = Path(lines[0].split(": ", 3)[3])  # the package it was writing
    assert named.is_relative_to(config.root / "conda-demo") and sizes.get(named.name, 0) > limit
    assert not named.exists()  # nothing partial under its name
    assert not (config.root / "conda-demo" / "linux-64" / "repodata.json").exists()


async def test_subdirs_are_discovered_when_none_are_named(upstream, write_config) -> None:
    # No channeldata.json upstream: each known subdir is probed (HEAD of its repodata.json). A
    # 404, and a 403 as S3 gives for a key that is not there, mean it is not there.
    upstream.control.missing_status = 403
    config = write_config(upstream.channel_url, subdirs=[], retries=1)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {}
    assert sorted(p.name for p in (config.root / "conda-demo").iterdir() if p.is_dir()) == ["linux-64", "noarch"]
    assert upstream.control.count("demo/osx-arm64/repodata.json", "HEAD") == 1


async def test_a_subdir_probe_upstream_cannot_answer_fails_the_run_and_loses_nothing(
        upstream, write_config) -> None:
    # Discovery that cannot tell whether upstream has a subdir must not take it for absent: the
    # run would publish a channel without it, and --clean would delete its files.
    config = write_config(upstream.channel_url, subdirs=[], retries=1)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0, err
    packages = sorted((config.root / "conda-demo" / "linux-64").glob("*.conda"))
    assert packages
    before = (config.root / "conda-demo" / "linux-64" / "repodata.json").read_bytes()

    upstream.control.fail_first = {"demo/linux-64/repodata.json": 10}
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet", "--clean")
    assert code == 1, err
    assert "linux-64/repodata.json" in err and "HTTP 500" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (config.root / "conda-demo" / "linux-64" / "repodata.json").read_bytes() == before
    assert all(p.exists() for p in packages)


async def test_channeldata_upstream_cannot_serve_fails_the_run_and_keeps_the_last_one(
        upstream, write_config) -> None:
    # channeldata.json is optional, but "upstream failed to answer" is not "upstream has none":
    # taken for none, the run would publish channeldata without upstream's descriptions.
    summary = "Base package of the demo channel"
    (upstream.root / "demo" / "channeldata.json").write_bytes(orjson.dumps(
        {"channeldata_version": 1, "subdirs": ["linux-64", "noarch"],
         "packages": {"demo-base": {"summary": summary, "home": "https://example.invalid/base"}}}))
    config = write_config(upstream.channel_url, retries=1)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0, err
    published = config.root / "conda-demo" / "channeldata.json"
    before = published.read_bytes()
    assert orjson.loads(before)["packages"]["demo-base"]["summary"] == summary

    upstream.control.fail_first = {"demo/channeldata.json": 10}
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1, err
    assert "channeldata.json" in err and "HTTP 500" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert published.read_bytes() == before
    assert upstream.control.count("demo/channeldata.json") == 1 + 2  # the first run, then 2 attempts


@pytest.mark.parametrize("status", [403, 404])
async def test_a_channel_without_channeldata_is_still_mirrored(upstream, write_config, status: int) -> None:
    # As S3 answers a missing key with 403 to whoever may not list the bucket.
    upstream.control.missing_status = status
    config = write_config(upstream.channel_url, retries=1)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {}
    assert upstream.control.count("demo/channeldata.json") == 1
    channeldata = orjson.loads((config.root / "conda-demo" / "channeldata.json").read_bytes())
    assert channeldata["subdirs"] == ["linux-64", "noarch"] and "demo-base" in channeldata["packages"]


@pytest.mark.parametrize(("filters", "line", "key"), [
    ("    filters:\n      only: [no-such-package]\n", 7, "mirrors[0].filters.only"),
    ("    pkg_list: [no-such-package]\n", 6, "mirrors[0].pkg_list"),
])
async def test_a_mirror_its_filters_leave_empty_exits_2_naming_the_key_and_the_others_still_sync(
        upstream, tmp_path: Path, filters: str, line: int, key: str) -> None:
    path = tmp_path / "mirrorgen.yaml"
    path.write_text(
        f"root: {tmp_path / 'mirror'}\nmirrors:\n"
        f"  - name: empty\n    type: conda\n    source: {upstream.channel_url}\n{filters}"
        f"  - name: good\n    type: conda\n    source: {upstream.channel_url}\n    subdirs: [linux-64, noarch]\n")
    code, out, err = await cli("sync", "-c", str(path), "--quiet")
    assert code == 2
    (message,) = err.strip().splitlines()
    assert message.startswith(f"mirrorgen: error: empty: {path}:{line}: {key}: the filters leave nothing to mirror")
    assert "Traceback" not in err
    assert (tmp_path / "mirror" / "good" / "noarch" / "repodata.json").exists()
    assert not (tmp_path / "mirror" / "empty").exists()
    store = Store(tmp_path / "mirror")
    assert store.read_state("good", "status.json")["state"] == "completed"
    assert store.read_state("empty", "status.json")["state"] == "failed"


async def test_verify_checks_the_index_files_and_a_sync_repairs_them(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    base = config.root / "conda-demo"
    shard = sorted((base / "linux-64" / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (base / "noarch" / "repodata.json.zst").write_bytes(b"garbage")
    (base / "channeldata.json").write_bytes(b'{"packages": ')
    (base / "linux-64" / "notes.txt").write_text("an operator's note")
    code, out, _ = await cli("verify", "-c", str(config.path), "--json")
    doc = json.loads(out)["mirrors"][0]
    assert code == 1
    assert sorted(doc["corrupt"]) == ["channeldata.json", f"linux-64/shards/{shard.name}",
                                      "noarch/repodata.json.zst"]
    assert doc["corrupt"][f"linux-64/shards/{shard.name}"].startswith("sha256 ")
    assert doc["missing"] == [] and doc["stray"] == ["linux-64/notes.txt"]
    # Every package file still checks: the index files were counted besides them.
    assert doc["checked"] > 8 and doc["ok"] == doc["checked"] - 3

    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    after = await verify_mirror(config.mirrors[0], Store(config.root))
    assert (after.failed, after.corrupt, after.missing) == (False, {}, [])
    assert after.stray == ["linux-64/notes.txt"]  # not mirrorgen's to remove


async def test_verify_reports_a_missing_shard(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    shard = sorted((config.root / "conda-demo" / "noarch" / "shards").iterdir())[0]
    shard.unlink()
    result = await verify_mirror(config.mirrors[0], Store(config.root))
    assert result.missing == [f"noarch/shards/{shard.name}"] and result.failed
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert (await verify_mirror(config.mirrors[0], Store(config.root))).failed is False


async def test_verify_and_status_with_only_root_work_on_every_mirror_the_tree_holds(
        upstream, write_config, tmp_path: Path) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    bare = tmp_path / "root-only.yaml"
    bare.write_text(f"root: {config.root}\nmirrors: []\n")
    code, out, _ = await cli("verify", "-c", str(bare), "--json")
    (doc,) = json.loads(out)["mirrors"]
    assert code == 0 and doc["mirror"] == "conda-demo" and doc["ok"] == doc["checked"] > 8
    code, out, _ = await cli("status", "-c", str(bare), "--json")
    (row,) = json.loads(out)["mirrors"]
    assert code == 0 and (row["mirror"], row["state"]) == ("conda-demo", "completed")
    files = sorted((config.root / "conda-demo" / "linux-64").glob("*.conda"))
    files[0].unlink()
    code, out, _ = await cli("verify", "-c", str(bare))
    assert code == 1 and f"MISSING linux-64/{files[0].name}" in out


@pytest.mark.parametrize("command", ["sync", "clean"])
async def test_sync_or_clean_with_no_mirrors_is_a_usage_error(tmp_path: Path, command: str) -> None:
    path = tmp_path / "mirrorgen.yaml"
    path.write_text(f"root: {tmp_path / 'mirror'}\nmirrors: []\n")
    code, out, err = await cli(command, "-c", str(path))
    assert code == 2 and err.strip() == f"mirrorgen: error: {path}: mirrors: no mirrors to {command} (add entries under mirrors)"
    assert not (tmp_path / "mirror").exists()
