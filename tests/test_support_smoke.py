"""Prove the test harness is real: real packages, real nginx, real client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from rattler.exceptions import GatewayError

from mirrorgen.demo.packages import PackageSpec, build_package, demo_specs, write_channel
from tests.support.nginx import NginxServer, free_port, run_nginx
from tests.support.rattler_client import solve, solve_and_install, solve_and_install_async
from tests.support.upstream import UPSTREAM_CONTROL, UpstreamControl, make_upstream_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def channel_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parent of ``demo/`` (zst, bz2, shards) and ``plain/`` (repodata.json only)."""
    root = tmp_path_factory.mktemp("served")
    write_channel(root / "demo", demo_specs(), shards=True, bz2=True)
    write_channel(root / "plain", demo_specs(), zst=False, shards=False)
    return root


@pytest.fixture(scope="module")
def nginx(channel_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    port = free_port()
    block = f"server {{ listen 127.0.0.1:{port}; root {channel_root}; location / {{ autoindex off; }} }}"
    with run_nginx(block, tmp_path_factory.mktemp("nginx")) as server:
        yield server


def test_write_channel_layout(channel_root: Path) -> None:
    for subdir in ("noarch", "linux-64"):
        d = channel_root / "demo" / subdir
        for name in ("repodata.json", "repodata.json.zst", "repodata.json.bz2", "repodata_shards.msgpack.zst"):
            assert (d / name).is_file(), f"{subdir}/{name} missing"
        assert any((d / "shards").glob("*.msgpack.zst"))
    repodata = json.loads((channel_root / "demo" / "linux-64" / "repodata.json").read_text())
    assert "demo-readline-8.2-h0_0.tar.bz2" in repodata["packages"]
    assert repodata["packages"]["demo-readline-8.2-h0_0.tar.bz2"]["license_family"] == "GPL3"
    assert "demo-base-1.2-h0_0.conda" in repodata["packages.conda"]


def test_noarch_always_indexed(tmp_path: Path) -> None:
    only_linux = [PackageSpec(name="solo", version="1", subdir="linux-64", files={"a.txt": b"a"})]
    write_channel(tmp_path / "ch", only_linux, zst=False)
    noarch = json.loads((tmp_path / "ch" / "noarch" / "repodata.json").read_text())
    assert noarch["packages"] == {} and noarch.get("packages.conda", {}) == {}


def test_build_package_is_reproducible(tmp_path: Path) -> None:
    for spec in demo_specs()[:2]:
        first = build_package(spec, tmp_path / "a").read_bytes()
        assert build_package(spec, tmp_path / "b").read_bytes() == first


def test_unsharded_client_installs_through_nginx(nginx: NginxServer, tmp_path: Path) -> None:
    names = solve_and_install(
        f"{nginx.base_url}/demo", ["demo-cli"], tmp_path / "env", tmp_path / "cache", sharded=False
    )
    assert {"demo-cli", "demo-lib", "demo-base"} <= set(names)
    assert (tmp_path / "env" / "share" / "demo" / "demo-cli.txt").read_text() == "demo-cli: 3.1\n"
    assert (tmp_path / "env" / "share" / "demo" / "demo-base.txt").read_text() == "demo-base: 1.2\n"
    assert nginx.wait_for_request("GET /demo/noarch/demo-cli-3.1-h0_0.conda 200")
    fetched = nginx.requested_paths()
    # Unsharded rattler probes .zst/.bz2 with HEAD, then GETs the .zst.
    assert "HEAD /demo/linux-64/repodata.json.zst 200" in fetched
    assert "GET /demo/linux-64/repodata.json.zst 200" in fetched
    assert "GET /demo/noarch/demo-cli-3.1-h0_0.conda 200" in fetched


def test_sharded_client_fetches_shards_from_loopback(nginx: NginxServer, tmp_path: Path) -> None:
    before = len(nginx.requested_paths())
    names = solve_and_install(
        f"{nginx.base_url}/demo", ["demo-cli"], tmp_path / "env", tmp_path / "cache", sharded=True
    )
    assert {"demo-cli", "demo-lib", "demo-base"} <= set(names)
    assert (tmp_path / "env" / "share" / "demo" / "demo-lib.txt").is_file()
    fetched = nginx.requested_paths()[before:]
    # Finding (py-rattler 0.28 / rattler_repodata_gateway 0.36.5): with
    # sharded_enabled=True the gateway tries repodata_shards.msgpack.zst for
    # ANY http(s) channel, loopback included -- no host allow-list -- and,
    # when it is there, never touches repodata.json* at all (not even HEAD).
    # It then GETs only the shards of the names the solve needs.
    assert "GET /demo/linux-64/repodata_shards.msgpack.zst 200" in fetched
    assert "GET /demo/noarch/repodata_shards.msgpack.zst 200" in fetched
    assert not [line for line in fetched if "/repodata.json" in line]
    shard_gets = [line for line in fetched if "/shards/" in line]
    # demo-cli (noarch), demo-lib and demo-base (linux-64): one shard each.
    assert len(shard_gets) == 3, shard_gets
    assert all(line.startswith("GET ") and line.endswith(".msgpack.zst 200") for line in shard_gets)


def test_sharded_client_falls_back_on_404(nginx: NginxServer, tmp_path: Path) -> None:
    before = len(nginx.requested_paths())
    names = solve_and_install(
        f"{nginx.base_url}/plain", ["demo-cli"], tmp_path / "env", tmp_path / "cache", sharded=True
    )
    assert {"demo-cli", "demo-lib", "demo-base"} <= set(names)
    assert nginx.wait_for_request("GET /plain/noarch/demo-cli-3.1-h0_0.conda 200")
    fetched = nginx.requested_paths()[before:]
    # A 404 on the shard index makes rattler fall back to the classic
    # HEAD-probe + repodata.json path (the 404 is cached in cache_dir).
    assert "GET /plain/linux-64/repodata_shards.msgpack.zst 404" in fetched
    assert "HEAD /plain/linux-64/repodata.json.zst 404" in fetched
    assert "GET /plain/linux-64/repodata.json 200" in fetched


def test_solve_respects_version_pin(nginx: NginxServer, tmp_path: Path) -> None:
    records = solve(f"{nginx.base_url}/demo", ["demo-lib"], tmp_path / "cache", sharded=False)
    versions = {r.name.normalized: str(r.version) for r in records}
    assert versions == {"demo-lib": "2.0", "demo-base": "1.2"}


async def _get(session: aiohttp.ClientSession, url: str, method: str = "GET") -> tuple[int, bytes, str | None]:
    async with session.request(method, url) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Length")


async def test_fake_upstream_controls(aiohttp_server: AiohttpServer, channel_root: Path) -> None:
    control = UpstreamControl()
    server: TestServer = await aiohttp_server(make_upstream_app(channel_root, control))
    assert server.app is not None and server.app[UPSTREAM_CONTROL] is control
    path = "demo/noarch/repodata.json"
    real = (channel_root / path).read_bytes()

    async with aiohttp.ClientSession() as session:
        url = str(server.make_url(f"/{path}"))
        assert await _get(session, url) == (200, real, str(len(real)))

        status, body, length = await _get(session, url, "HEAD")
        assert (status, body, length) == (200, b"", str(len(real)))

        control.fail_first[path] = 2
        assert [(await _get(session, url))[0] for _ in range(3)] == [500, 500, 200]
        assert control.fail_first[path] == 0

        control.corrupt.add(path)
        status, body, length = await _get(session, url)
        assert status == 200 and len(body) == len(real) and body != real and length == str(len(real))
        control.corrupt.clear()

        control.hide.add("demo/linux-64/repodata.json.zst")
        assert (await _get(session, str(server.make_url("/demo/linux-64/repodata.json.zst"))))[0] == 404
        assert (await _get(session, str(server.make_url("/demo/linux-64/repodata.json"))))[0] == 200

        assert (await _get(session, str(server.make_url("/demo/noarch/missing.json"))))[0] == 404
        raw = server.make_url("/demo/%2e%2e/%2e%2e/etc/passwd")
        async with session.get(raw.with_path("/demo/%2e%2e/%2e%2e/etc/passwd", encoded=True)) as resp:
            assert resp.status == 403

        control.token = "s3cret"
        assert (await _get(session, url))[0] == 403
        assert (await _get(session, str(server.make_url("/t/wrong/" + path))))[0] == 403
        assert await _get(session, str(server.make_url("/t/s3cret/" + path))) == (200, real, str(len(real)))

    assert control.requests[0] == f"GET /{path}"
    assert control.requests[1] == f"HEAD /{path}"
    assert control.count(path) >= 6
    assert any("%2e%2e" in line for line in control.requests), control.requests


async def test_async_client_against_fake_upstream(
    aiohttp_server: AiohttpServer, channel_root: Path, tmp_path: Path
) -> None:
    """The awaitable client works against a server on the test's own loop."""
    control = UpstreamControl(hide={"demo/linux-64/repodata.json.zst"})
    server = await aiohttp_server(make_upstream_app(channel_root, control))
    url = str(server.make_url("/demo"))
    names = await solve_and_install_async(url, ["demo-cli"], tmp_path / "env", tmp_path / "cache", sharded=False)
    assert {"demo-cli", "demo-lib", "demo-base"} <= set(names)
    # With .zst hidden, rattler uses the .bz2 it found with HEAD.
    assert control.count("demo/linux-64/repodata.json.bz2") == 1
    assert control.count("demo/linux-64/repodata.json.zst") == 0
    assert control.count("demo/linux-64/repodata.json.zst", "HEAD") == 1


async def test_sharded_client_does_not_survive_index_5xx(
    aiohttp_server: AiohttpServer, channel_root: Path, tmp_path: Path
) -> None:
    """Finding: one 500 on repodata_shards.msgpack.zst fails the whole solve.

    rattler 0.28 neither retries the shard index nor falls back to
    repodata.json on 5xx (only on 404), so a mirror must serve the index
    reliably or not at all.
    """
    control = UpstreamControl(fail_first={"demo/linux-64/repodata_shards.msgpack.zst": 1})
    server = await aiohttp_server(make_upstream_app(channel_root, control))
    with pytest.raises(GatewayError, match="500"):
        await solve_and_install_async(
            str(server.make_url("/demo")), ["demo-cli"], tmp_path / "env", tmp_path / "cache", sharded=True
        )
    assert control.count("demo/linux-64/repodata_shards.msgpack.zst") == 1
    assert control.count("demo/linux-64/repodata.json") == 0
