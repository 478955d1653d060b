"""Upstreams over https, and through the HTTP proxy a firewalled mirror host must use.

The proxy comes from the environment, as for curl, pip and conda: ``http_proxy``,
``https_proxy``, ``no_proxy``. A private CA (a TLS-inspecting firewall's) is trusted through
``SSL_CERT_FILE``, as OpenSSL reads it. Everything here is real: a forward proxy and an https
upstream on loopback (certificates from ``trustme``), the mirror synced by the real transport.
"""

from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import trustme
from aiohttp import web

from mirrorgen import http1, transport
from mirrorgen.errors import UpstreamError
from mirrorgen.httpproxy import _bypassed
from mirrorgen.store import Store
from mirrorgen.sync import sync_mirror
from tests.conftest import Upstream
from tests.support.cli import cli
from tests.support.forward_proxy import ForwardProxy, run_forward_proxy
from tests.support.upstream import UpstreamControl, make_upstream_app

PACKAGES = (".conda", ".tar.bz2")


@pytest.fixture(autouse=True)
def fresh_tls_context() -> Iterator[None]:
    """The TLS context is made once per process: here once per test, each with its SSL_CERT_FILE.
    (No proxy variable from the machine reaches a test: see conftest.)"""
    http1.ssl_context.cache_clear()
    yield
    http1.ssl_context.cache_clear()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_upstream(demo_channel_template: Path, tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Upstream]:
    """The demo channel over https on 127.0.0.1, its certificate signed by ``ca``."""
    root = tmp_path / "tls-upstream"
    shutil.copytree(demo_channel_template, root)
    control = UpstreamControl()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    runner = web.AppRunner(make_upstream_app(root, control))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Upstream(root, control, f"https://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def package_requests(lines: list[str]) -> list[str]:
    return [line for line in lines if line.endswith(PACKAGES)]


def published(config_root: Path) -> set[str]:
    names: set[str] = set()
    for subdir in ("linux-64", "noarch"):
        doc = orjson.loads((config_root / "conda-demo" / subdir / "repodata.json").read_bytes())
        names |= set(doc["packages"]) | set(doc["packages.conda"])
    return names


async def test_an_http_upstream_is_mirrored_through_the_proxy_and_never_directly(
        upstream: Upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_forward_proxy(ForwardProxy()) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        config = write_config(upstream.channel_url)
        result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.downloaded == 8
    # Each request the upstream answered came through the proxy, in absolute form.
    assert len(proxy.log) == len(upstream.control.requests)
    assert all(line.split(" ")[1].startswith(upstream.base + "/demo/") for line in proxy.log)
    assert sorted(line.rsplit("/", 1)[1] for line in package_requests(proxy.log)) == sorted(
        upstream.files("linux-64") + upstream.files("noarch"))
    assert published(config.root) == set(upstream.files("linux-64") + upstream.files("noarch"))


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "example.com,127.0.0.0/8", "*"])
async def test_no_proxy_names_the_upstreams_reached_directly(
        upstream: Upstream, write_config, monkeypatch: pytest.MonkeyPatch, no_proxy: str) -> None:
    async with run_forward_proxy(ForwardProxy()) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        config = write_config(upstream.channel_url)
        result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.downloaded == 8
    assert proxy.log == []


async def test_an_https_upstream_goes_through_a_tunnel_and_the_proxy_credentials_stay_with_the_proxy(
        tls_upstream: Upstream, write_config, ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    async with run_forward_proxy(ForwardProxy(credentials="mirror:s3cret pass")) as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # for http only: never used here
        config = write_config(tls_upstream.channel_url)
        result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.downloaded == 8
    assert proxy.refused == 0 and proxy.log
    host = tls_upstream.base.removeprefix("https://")
    # Only tunnels: the proxy saw no request and no file, just where to connect.
    assert set(proxy.log) == {f"CONNECT {host}"}
    assert len(package_requests(tls_upstream.control.requests)) == 8
    assert tls_upstream.control.proxy_authorizations == 0
    assert published(config.root) == set(tls_upstream.files("linux-64") + tls_upstream.files("noarch"))


async def test_wrong_proxy_credentials_fail_the_run_at_once(
        upstream: Upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_forward_proxy(ForwardProxy(credentials="mirror:right")) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url.replace("mirror:right", "mirror:wrong"))
        config = write_config(upstream.channel_url, retries=2)
        with pytest.raises(UpstreamError, match="HTTP 407"):
            await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert upstream.control.requests == []
    assert not (config.root / "conda-demo" / "linux-64" / "repodata.json").exists()


@pytest.mark.parametrize(("status", "attempts"), [(407, 1), (403, 1), (502, 3)])
async def test_a_proxy_refusing_the_tunnel_is_named_and_retried_only_when_that_can_help(
        tls_upstream: Upstream, write_config, ca_file: str, monkeypatch: pytest.MonkeyPatch,
        status: int, attempts: int) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    async with run_forward_proxy(ForwardProxy(connect_status=status)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.port}")  # no scheme: http, as curl reads it
        async with transport.Transport(retries=2, backoff=0.01) as upstream:
            with pytest.raises(UpstreamError) as raised:
                await upstream.get(tls_upstream.channel_url + "/noarch/repodata.json")
    message = str(raised.value)
    assert f"127.0.0.1:{proxy.port}" in message and f"HTTP {status}" in message, message
    assert "\n" not in message
    assert proxy.count("CONNECT") == attempts
    assert tls_upstream.control.requests == []


async def test_a_proxy_that_cannot_be_reached_is_named_in_the_error(
        upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.nginx import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("http_proxy", dead)
    async with transport.Transport(retries=1, backoff=0.01) as client:
        with pytest.raises(UpstreamError, match=f"proxy {dead}: .*refused.*after 2 attempts"):
            await client.get(upstream.channel_url + "/noarch/repodata.json")
    assert upstream.control.requests == []


async def test_an_https_upstream_direct_with_a_private_ca(
        tls_upstream: Upstream, write_config, ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    config = write_config(tls_upstream.channel_url)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.downloaded == 8
    assert published(config.root) == set(tls_upstream.files("linux-64") + tls_upstream.files("noarch"))


async def test_an_upstream_certificate_nobody_trusts_is_a_one_line_error(
        tls_upstream: Upstream, write_config) -> None:
    config = write_config(tls_upstream.channel_url, retries=0)
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet", env=env)
    assert code == 1, err
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("https_proxy", "socks5://127.0.0.1:1080", "only http:// proxies"),
    ("HTTP_PROXY", "http://127.0.0.1:99999", "not a proxy URL"),
    ("all_proxy", "http://user:hunter2@proxy.example/path", "not a proxy URL"),
])
async def test_a_proxy_variable_mirrorgen_cannot_use_is_a_usage_error(
        upstream: Upstream, write_config, variable: str, value: str, says: str) -> None:
    config = write_config(upstream.channel_url)
    code, _, err = await cli("sync", "-c", str(config.path), "--quiet", env={**os.environ, variable: value})
    assert code == 2, err
    assert variable.lower() in err.lower() and says in err, err
    assert "hunter2" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert upstream.control.requests == []


@pytest.mark.parametrize(("host", "port", "patterns", "bypassed"), [
    ("repo.example.com", 443, ["example.com"], True),
    ("repo.example.com", 443, [".example.com"], True),
    ("example.com", 443, [".example.com"], True),
    ("badexample.com", 443, ["example.com"], False),
    ("REPO.Example.com.", 443, ["example.com"], True),
    ("repo.example.com", 443, ["example.com:8443"], False),
    ("repo.example.com", 8443, ["example.com:8443"], True),
    ("10.1.2.3", 80, ["10.0.0.0/8"], True),
    ("10.1.2.3", 80, ["10.1.2.4"], False),
    ("::1", 80, ["::1"], True),
    ("::1", 80, ["[::1]:81"], False),
    ("anything", 1, ["*"], True),
    ("anything", 1, [], False),
])
def test_no_proxy_patterns_match_as_curl_reads_them(host: str, port: int, patterns: list[str],
                                                   bypassed: bool) -> None:
    assert _bypassed(host, port, patterns) is bypassed
