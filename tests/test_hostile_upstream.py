"""Upstream indexes no honest channel serves: records of the wrong shape, numbers past any range,
bytes that are not UTF-8. Each is refused or reported on one line; none publishes a file its
record cannot vouch for, and none stops the run with a traceback (found by fuzzing the source)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from mirrorgen.errors import UnusableRecord
from mirrorgen.store import Store
from mirrorgen.sync import sync_mirror
from tests.support.cli import cli

MIRROR = "conda-demo"


def rewrite(upstream: Any, subdir: str, edit: Callable[[dict[str, Any]], None], *,
            raw: Callable[[bytes], bytes] | None = None) -> None:
    """Change upstream's ``subdir`` index: ``edit`` on the decoded document, then ``raw`` on its
    bytes (for what JSON encoders refuse to write). Only the plain repodata.json is left."""
    directory = upstream.root / "demo" / subdir
    for name in ("repodata.json.zst", "repodata.json.bz2"):
        (directory / name).unlink(missing_ok=True)
    doc = orjson.loads((directory / "repodata.json").read_bytes())
    edit(doc)
    data = orjson.dumps(doc)
    (directory / "repodata.json").write_bytes(raw(data) if raw else data)


def record_of(doc: dict[str, Any], fn: str) -> dict[str, Any]:
    return (doc["packages"] if fn in doc["packages"] else doc["packages.conda"])[fn]


def published(root: Path, subdir: str) -> dict[str, Any]:
    doc = orjson.loads((root / MIRROR / subdir / "repodata.json").read_bytes())
    return {**doc["packages"], **doc["packages.conda"]}


async def mirrored_without_a_hash(upstream: Any, write_config: Any) -> tuple[str, Any]:
    """A file upstream gives no sha256 or md5 for, mirrored with ``verify_checksums: false``:
    its name and the configuration that mirrored it."""
    victim = upstream.files("linux-64")[0]

    def edit(doc: dict[str, Any]) -> None:
        for field in ("sha256", "md5"):
            record_of(doc, victim).pop(field, None)

    rewrite(upstream, "linux-64", edit)
    config = write_config(upstream.channel_url, verify_checksums=False)
    assert (await cli("sync", "-c", str(config.path), "--quiet"))[0] == 0
    return victim, config


BAD_FACTS = {
    "sha256 a number": {"sha256": 5},
    "sha256 not hex": {"sha256": "z" * 64},
    "sha256 empty": {"sha256": ""},
    "md5 a list": {"md5": []},
    "size a string": {"size": "200"},
    "size negative": {"size": -1},
    "subdir a number": {"subdir": 5},
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "verify_checksums-false"])
@pytest.mark.parametrize("change", BAD_FACTS.values(), ids=BAD_FACTS.keys())
async def test_a_hash_or_size_of_the_wrong_shape_refuses_the_file_whatever_the_setting(
        upstream, write_config, change: dict[str, Any], verify: bool) -> None:
    # Taken for "no hash", such a record let `verify_checksums: false` publish a file checked
    # against nothing: even a file whose bytes the record's other hash contradicts.
    victim = upstream.files("linux-64")[0]
    upstream.control.corrupt.add(f"demo/linux-64/{victim}")

    def edit(doc: dict[str, Any]) -> None:
        record = record_of(doc, victim)
        record.update(change)
        if "md5" not in change:
            record["md5"] = "0" * 32  # what the corrupted bytes cannot match either

    rewrite(upstream, "linux-64", edit)
    config = write_config(upstream.channel_url, verify_checksums=verify)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and "Traceback" not in err
    failed = [line for line in err.splitlines() if victim in line]
    assert len(failed) == 1 and "upstream's" in failed[0], err
    assert not (config.root / MIRROR / "linux-64" / victim).exists()
    assert victim not in published(config.root, "linux-64")
    others = set(upstream.files("linux-64")) - {victim}
    assert others <= set(published(config.root, "linux-64"))
    assert (await cli("verify", "-c", str(config.path)))[0] == 0


async def test_a_file_mirrored_without_a_hash_is_verified_against_the_one_recorded(
        upstream, write_config) -> None:
    victim, config = await mirrored_without_a_hash(upstream, write_config)
    code, out, _ = await cli("verify", "-c", str(config.path))
    assert code == 0, out  # it said "the index gives no hash to check against", and exited 1
    path = config.root / MIRROR / "linux-64" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash tells
    path.write_bytes(bytes(data))
    code, out, _ = await cli("verify", "-c", str(config.path))
    assert code == 1 and f"CORRUPT linux-64/{victim}" in out and "recorded as" in out


async def test_without_hash_or_size_a_file_is_refused_even_with_verify_checksums_false(
        upstream, write_config) -> None:
    victim = upstream.files("linux-64")[0]

    def edit(doc: dict[str, Any]) -> None:
        for field in ("sha256", "md5", "size"):
            record_of(doc, victim).pop(field, None)

    rewrite(upstream, "linux-64", edit)
    config = write_config(upstream.channel_url, verify_checksums=False)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and "no sha256, md5 or size" in err and victim in err
    assert not (config.root / MIRROR / "linux-64" / victim).exists()


@pytest.mark.parametrize("mode", ["active", "passive"])
async def test_a_file_name_ending_in_a_newline_is_refused(
        upstream, write_config, mode: str) -> None:
    # A "$" in the name check matched before a final newline: the name passed, and the passive
    # index writer then failed on it with a traceback.
    victim = upstream.files("linux-64")[0]

    def edit(doc: dict[str, Any]) -> None:
        key = "packages" if victim in doc["packages"] else "packages.conda"
        doc[key][victim + "\n"] = doc[key].pop(victim)

    rewrite(upstream, "linux-64", edit)
    config = write_config(upstream.channel_url, mode=mode)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0 and "Traceback" not in err, err
    assert not any(name.startswith(victim) for name in published(config.root, "linux-64"))
    assert set(upstream.files("linux-64")) - {victim} <= set(published(config.root, "linux-64"))
    report = Store(config.root).read_state(MIRROR, "report.json")
    assert report["excluded"]["upstream"] == {
        "count": 1, "reasons": {"unsafe or unexpected file name": 1}, "names": [victim.rsplit("-", 2)[0]]}


async def test_a_record_under_the_other_map_is_refused(upstream, write_config) -> None:
    # One file name in both maps would be two records for one file; conda lists .tar.bz2 under
    # "packages" and .conda under "packages.conda".
    victim = next(f for f in upstream.files("linux-64") if f.endswith(".conda"))

    def edit(doc: dict[str, Any]) -> None:
        doc["packages"][victim] = doc["packages.conda"].pop(victim)

    rewrite(upstream, "linux-64", edit)
    config = write_config(upstream.channel_url)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and victim not in published(config.root, "linux-64")
    report = Store(config.root).read_state(MIRROR, "report.json")
    assert "listed under packages" in json.dumps(report["excluded"])


@pytest.mark.parametrize("filters", [{"only": ["{name}"]}, {"exclude": ["{name} >=99"]},
                                     {"only": ["{other}"], "include_dependencies": True}],
                         ids=["only", "exclude", "dependencies"])
async def test_a_record_rattler_cannot_read_is_dropped_when_a_spec_must_test_it(
        upstream, write_config, filters: dict[str, Any]) -> None:
    victim = upstream.files("linux-64")[0]
    state: dict[str, Any] = {}

    def edit(doc: dict[str, Any]) -> None:
        record = record_of(doc, victim)
        record["version"] = "1.0 beta"  # conda's version grammar has no spaces
        state["name"] = record["name"]
        # Another package that depends on it, for the closure.
        other = next(r for fn, r in {**doc["packages"], **doc["packages.conda"]}.items()
                     if r["name"] != record["name"])
        other["depends"] = [*other.get("depends", []), record["name"]]
        state["other"] = other["name"]

    rewrite(upstream, "linux-64", edit)
    spec = {k: [s.format(**state) for s in v] if isinstance(v, list) else v for k, v in filters.items()}
    config = write_config(upstream.channel_url, filters=spec, subdirs=["linux-64"])
    code, out, err = await cli("sync", "-c", str(config.path), "--quiet", "--json")
    assert "Traceback" not in err, err
    assert victim not in published(config.root, "linux-64") if code == 0 else code == 2
    report = Store(config.root).read_state(MIRROR, "report.json")
    if code == 0 and "exclude" in filters:
        # Neither shown to match the exclude spec nor shown not to: not published, and said why.
        assert "rattler cannot read it" in json.dumps(report["excluded"])


async def test_a_timestamp_past_any_date_is_no_timestamp(upstream, write_config) -> None:
    def edit(doc: dict[str, Any]) -> None:
        for record in (*doc["packages"].values(), *doc["packages.conda"].values()):
            record["timestamp"] = 1e300  # channeldata shows the newest version's: make it every one

    rewrite(upstream, "linux-64", edit)
    config = write_config(upstream.channel_url, subdirs=["linux-64"])
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0 and "Traceback" not in err, err
    channeldata = orjson.loads((config.root / MIRROR / "channeldata.json").read_bytes())
    assert all(0 <= p.get("timestamp", 0) < 253402300800 for p in channeldata["packages"].values())


def huge_numbers(upstream: Any, victims: list[str]) -> None:
    """Give each of ``victims`` a field whose value is 1e400: msgspec passes over it in a field it
    does not decode; orjson (the shards) and serde (rattler) refuse it. Published, it would
    break every client of the subdir."""
    def edit(doc: dict[str, Any]) -> None:
        for victim in victims:
            record_of(doc, victim)["x-huge"] = 12345

    rewrite(upstream, "linux-64", edit, raw=lambda data: data.replace(b'"x-huge":12345', b'"x-huge":1e400'))


@pytest.mark.parametrize("mode", ["passive", "active"])
async def test_a_record_with_a_number_no_client_can_read_is_left_out_alone(
        upstream, write_config, mode: str) -> None:
    victims = upstream.files("linux-64")[:2]
    huge_numbers(upstream, victims)
    config = write_config(upstream.channel_url, mode=mode, subdirs=["linux-64"])
    code, out, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and "Traceback" not in err, err
    for victim in victims:
        assert f"FAILED linux-64/{victim}: cannot be published: not valid JSON" in err
    kept = published(config.root, "linux-64")  # orjson reads it: no 1e400 left in it
    assert set(kept) == set(upstream.files("linux-64")) - set(victims)
    assert Store(config.root).read_state(MIRROR, "status.json")["state"] == "failed"
    # What clients read first agrees: every shard the index names decodes, none has a victim.
    assert (await cli("verify", "-c", str(config.path)))[0] == 0
    # The next run finds the same records and leaves them out again, nothing else changed.
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and all(victim in err for victim in victims), err
    assert set(published(config.root, "linux-64")) == set(kept)


async def test_a_dry_run_with_clean_names_a_record_no_client_can_read_and_lists_what_the_run_removes(
        upstream, write_config) -> None:
    config = write_config(upstream.channel_url, subdirs=["linux-64"])
    assert (await cli("sync", "-c", str(config.path), "--quiet"))[0] == 0
    victim = upstream.files("linux-64")[0]
    huge_numbers(upstream, [victim])
    tree_before = sorted(config.root.rglob("*"))
    code, out, err = await cli("sync", "-c", str(config.path), "--clean", "--dry-run")
    assert code == 1 and "Traceback" not in err, err
    assert f"WOULD FAIL linux-64/{victim}: cannot be published: not valid JSON" in err
    # Its progress log says so in the same words: nothing failed, since nothing was tried.
    assert f": would fail: linux-64/{victim}" in err and f": failed: linux-64/{victim}" not in err
    would_publish, _, of = out.split("dry run: ", 1)[1].split(" records would be published")[0].partition(" of ")
    assert int(would_publish) == int(of) - 1  # the record left out, as the real run leaves it
    would = sorted(line.split()[1] for line in out.splitlines() if line.startswith("  remove "))
    assert sorted(config.root.rglob("*")) == tree_before  # a dry run writes nothing
    # The real run leaves the record out of the index, so its file goes with --clean, and so does
    # its name's shard, made again without it: what the dry run said.
    code, out, err = await cli("sync", "-c", str(config.path), "--clean", "--json")
    assert code == 1, err
    doc = json.loads(out)["mirrors"][0]
    assert list(doc["failed"]) == [f"linux-64/{victim}"]
    assert f"linux-64/{victim}" in would and any("/shards/" in relpath for relpath in would)
    assert sorted(doc["removed"]) == would
    assert victim not in published(config.root, "linux-64")


async def test_a_record_no_client_can_read_is_left_out_by_the_worker_processes_too(
        upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrorgen.conda.writer

    monkeypatch.setattr(mirrorgen.conda.writer, "POOL_MIN_RECORDS", 1)  # shards encoded by workers
    monkeypatch.setattr(mirrorgen.conda.writer, "_cores", lambda: 2)
    victim = upstream.files("linux-64")[0]
    huge_numbers(upstream, [victim])
    config = write_config(upstream.channel_url, mode="passive", subdirs=["linux-64"])
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert list(result.failed) == [f"linux-64/{victim}"], result.failed
    assert set(published(config.root, "linux-64")) == set(upstream.files("linux-64")) - {victim}


async def test_past_the_limit_unusable_records_fail_the_index_and_the_message_says_what_to_do(
        upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrorgen.sync

    monkeypatch.setattr(mirrorgen.sync, "MAX_UNUSABLE", 1)
    victims = upstream.files("linux-64")[:2]
    huge_numbers(upstream, victims)
    config = write_config(upstream.channel_url, mode="passive", subdirs=["linux-64"])
    with pytest.raises(UnusableRecord) as caught:
        await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert "cannot be published" in str(caught.value) and "exclude that package" in str(caught.value)
    assert not (config.root / MIRROR / "linux-64" / "repodata.json").exists()
    # Doing what the message says mirrors the rest.
    names = [victim.rsplit("-", 2)[0] for victim in victims]
    config = write_config(upstream.channel_url, mode="passive", subdirs=["linux-64"],
                          filters={"exclude": names})
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert not result.failed
    assert not set(victims) & set(published(config.root, "linux-64"))


async def test_a_record_that_is_not_utf8_is_refused_and_the_rest_mirrored(upstream, write_config) -> None:
    victim = upstream.files("linux-64")[0]

    def edit(doc: dict[str, Any]) -> None:
        record_of(doc, victim)["license"] = "MARK"

    rewrite(upstream, "linux-64", edit, raw=lambda data: data.replace(b'"license":"MARK"', b'"license":"M\xffT"'))
    config = write_config(upstream.channel_url, subdirs=["linux-64"])
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 0 and "Traceback" not in err, err
    assert victim not in published(config.root, "linux-64")
    assert set(upstream.files("linux-64")) - {victim} <= set(published(config.root, "linux-64"))
    report = Store(config.root).read_state(MIRROR, "report.json")
    assert "utf-8" in json.dumps(report["excluded"])


async def test_an_index_nested_too_deeply_is_one_line_and_writes_nothing(upstream, write_config) -> None:
    victim = upstream.files("linux-64")[0]

    def edit(doc: dict[str, Any]) -> None:
        record_of(doc, victim)["license"] = "MARK"

    deep = b"[" * 100_000 + b"]" * 100_000
    rewrite(upstream, "linux-64", edit, raw=lambda data: data.replace(b'"license":"MARK"', b'"license":' + deep))
    config = write_config(upstream.channel_url, subdirs=["linux-64"])
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "repodata.json: malformed index: nested too deeply" in err
    assert not (config.root / MIRROR / "linux-64" / "repodata.json").exists()


async def test_a_defect_of_ours_leaves_the_run_failed_not_running(
        upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrorgen.sync

    def broken(*args: Any) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr(mirrorgen.sync, "apply_filters", broken)
    config = write_config(upstream.channel_url)
    with pytest.raises(RuntimeError):
        await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    status = Store(config.root).read_state(MIRROR, "status.json")
    assert status["state"] == "failed" and "internal error: RuntimeError: a defect" in status["error"]


async def test_turning_verify_checksums_back_on_refuses_a_file_mirrored_without_a_hash(
        upstream, write_config) -> None:
    # The manifest vouches for the file on disk, but what it vouches for is only what
    # `verify_checksums: false` allowed: with the check back on, the file is not published.
    victim, config = await mirrored_without_a_hash(upstream, write_config)
    assert victim in published(config.root, "linux-64")
    config = write_config(upstream.channel_url, verify_checksums=True)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet")
    assert code == 1 and victim in err and "no sha256 or md5" in err
    assert victim not in published(config.root, "linux-64")
