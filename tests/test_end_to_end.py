"""A conda channel mirrored end to end: fake upstream -> mirrorgen sync -> real nginx configured by
`mirrorgen nginx` -> py-rattler solves and installs from it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest

from mirrorgen.nginx import render_server_block
from mirrorgen.store import Store
from mirrorgen.sync import sync_mirror
from tests.support.nginx import free_port, run_nginx
from tests.support.rattler_client import solve_and_install_async, solve_async

pytestmark = pytest.mark.slow

TOKEN = "SECRET-TOKEN-12345"


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "monolithic"])
async def test_rattler_installs_with_dependencies_from_the_mirror_served_by_nginx(
        upstream, write_config, tmp_path: Path, sharded: bool) -> None:
    upstream.control.token = TOKEN
    config = write_config(f"{upstream.base}/t/{TOKEN}/demo", filters={"licenses": ["-gpl3"]})
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.downloaded == result.kept == 7

    port = free_port()
    block = render_server_block(config, listen=f"127.0.0.1:{port}")
    with run_nginx(block, tmp_path / "nginx") as nginx:
        names = await solve_and_install_async(f"{nginx.base_url}/conda-demo", ["demo-cli"],
                                              tmp_path / "prefix", tmp_path / "cache", sharded=sharded)
        assert {"demo-cli", "demo-lib", "demo-base"} <= set(names)
        assert (tmp_path / "prefix" / "share" / "demo" / "demo-lib.txt").read_text().startswith("demo-lib")
        # The GPL-3 package was filtered out: the client cannot find it.
        with pytest.raises(Exception, match="demo-readline"):
            await solve_async(f"{nginx.base_url}/conda-demo", ["demo-readline"], tmp_path / "cache2",
                              sharded=sharded)
        nginx.wait_for_request("/conda-demo/linux-64/")
        requested = " ".join(nginx.requested_paths())
        if sharded:
            # rattler reads CEP-16 shards when the channel has them, and never repodata.json.
            assert "/conda-demo/linux-64/repodata_shards.msgpack.zst" in requested
            assert "/shards/" in requested and "repodata.json" not in requested
        else:
            assert "repodata_shards" not in requested
            assert "/conda-demo/linux-64/repodata.json" in requested

    # The token was used to fetch, and was written nowhere.
    for path in config.root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


async def test_nginx_serves_packages_immutable_and_indexes_short_lived(upstream, write_config, tmp_path: Path) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    port = free_port()
    with run_nginx(render_server_block(config, listen=f"127.0.0.1:{port}"), tmp_path / "nginx") as nginx:
        def head(path: str) -> tuple[int, dict[str, str]]:
            try:
                with urllib.request.urlopen(f"{nginx.base_url}{path}") as resp:
                    return resp.status, dict(resp.headers)
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers)

        package = next(p for p in upstream.files("linux-64"))
        status, headers = await asyncio.to_thread(head, f"/conda-demo/linux-64/{package}")
        assert status == 200 and "immutable" in headers["Cache-Control"]
        status, headers = await asyncio.to_thread(head, "/conda-demo/linux-64/repodata.json")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert "max-age=60" in headers["Cache-Control"]
        status, _ = await asyncio.to_thread(head, "/.mirrorgen/conda-demo/manifest.json")
        assert status == 404


async def test_published_records_are_upstreams_bytes_without_base_url(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    mine = orjson.loads((config.root / "conda-demo" / "linux-64" / "repodata.json").read_bytes())
    theirs = orjson.loads((upstream.root / "demo" / "linux-64" / "repodata.json").read_bytes())
    assert mine["info"]["subdir"] == "linux-64" and "base_url" not in mine["info"]
    for key in ("packages", "packages.conda"):
        assert mine[key] == theirs[key]


async def test_upstream_zst_is_preferred_then_bz2_then_plain_json(upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    store = Store(config.root)
    await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert upstream.control.count("demo/linux-64/repodata.json.zst") == 1
    assert upstream.control.count("demo/linux-64/repodata.json") == 0
    assert upstream.control.count("demo/linux-64/repodata.json.bz2") == 0

    upstream.control.hide.add("demo/linux-64/repodata.json.zst")
    await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert upstream.control.count("demo/linux-64/repodata.json.bz2") == 1
    assert upstream.control.count("demo/linux-64/repodata.json") == 0

    upstream.control.hide.add("demo/linux-64/repodata.json.bz2")
    result = await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert upstream.control.count("demo/linux-64/repodata.json") == 1
    assert result.kept == 8


async def test_demo_command_builds_mirrors_and_serves_a_channel_rattler_installs_from(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrorgen.cli", "demo", "--dir", str(tmp_path / "demo"), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output = b""
        while b"Serving" not in output:
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            assert line, output.decode()
            output += line
        assert b"conda create" in output and b"pixi" in output
        names = await solve_and_install_async(f"http://127.0.0.1:{port}/conda-demo", ["demo-cli"],
                                              tmp_path / "prefix", tmp_path / "cache", sharded=True)
        assert {"demo-cli", "demo-lib", "demo-base"} <= set(names)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)


def test_readme_opens_with_the_demo_and_test_commands() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    commands = [line for line in readme.split("```", 2)[1].splitlines()[1:] if line.strip()]
    assert "mirrorgen demo" in commands[0]
    assert ".ci/run" in commands[1] or "pytest" in commands[1]
    assert os.path.exists(Path(__file__).parent.parent / ".ci" / "run")


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "monolithic"])
async def test_rattler_solves_python_from_a_filtered_real_conda_forge_extract(
        write_config, tmp_path: Path, sharded: bool) -> None:
    # 12,132 real conda-forge records, top-level `metadata` with an upstream base_url; passive
    # mode, so only the indexes are written and the solve needs no package files. `latest: 2` alone
    # would drop the libzlib 1.2 that python 3.9 needs: the dependency closure puts it back.
    import shutil

    source = tmp_path / "conda-forge-extract"
    shutil.copytree(Path(__file__).parents[2] / "shared" / "testdata" / "conda" / "subchannel-demo", source)
    config = write_config(str(source), mode="passive", subdirs=["linux-64"],
                          filters={"python_versions": ["3.9"], "licenses": ["-gpl3"], "latest": 2,
                                   # seed 000: the allowlist restores GPL-3 readline (and the
                                   # other GPL-3 libraries cpython needs: the dependency report
                                   # names them under "blocked" when they are missing).
                                   "include": ["readline", "ld_impl_linux-64", "gdbm", "libgcc-ng",
                                               "libstdcxx-ng", "libgomp"],
                                   "include_dependencies": True})
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and 0 < result.kept < result.upstream
    port = free_port()
    with run_nginx(render_server_block(config, listen=f"127.0.0.1:{port}"), tmp_path / "nginx") as nginx:
        records = await solve_async(f"{nginx.base_url}/conda-demo", ["python 3.9.*", "pip"],
                                    tmp_path / "cache", sharded=sharded)
    by_name = {r.name.normalized: r for r in records}
    assert str(by_name["python"].version).startswith("3.9.")
    assert "pip" in by_name, sorted(by_name)
    assert "readline" in by_name  # GPL-3, restored by include
    report = Store(config.root).read_state("conda-demo", "report.json")
    assert report["excluded"]["licenses"]["count"] > 0
    assert any(k.startswith("linux-64/readline-") for k in report["restored_by_include"])
    # Packages resolve to the mirror, never to upstream's base_url.
    assert all(str(r.url).startswith(f"http://127.0.0.1:{port}/conda-demo/") for r in records)
