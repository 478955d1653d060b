"""Shared fixtures: a real upstream conda channel of installable packages, served on loopback by an
aiohttp app with fault injection, and a helper that writes a mirrorgen config for it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final
from pathlib import Path

import pytest
import yaml
from pytest_aiohttp import AiohttpServer

from mirrorgen.config import Config, load_config
from mirrorgen.demo.packages import demo_specs, write_channel
from tests.support.upstream import UpstreamControl, make_upstream_app


# Proxy settings of the machine running the tests: every upstream here is on loopback.
PROXY_VARIABLES: Final = tuple(n for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
                               for n in (name, name.upper()))


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine() -> Iterator[None]:
    """A machine whose shell sets http_proxy would send the tests' loopback requests (and the
    subprocesses' they start) to its proxy: each test starts without them, and sets its own.
    A patch of its own, so that a test's ``monkeypatch.undo()`` does not bring them back."""
    with pytest.MonkeyPatch.context() as patch:
        for name in PROXY_VARIABLES:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def demo_channel_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once: <dir>/demo/{linux-64,noarch}/ with real packages, repodata .json/.zst/.bz2."""
    root = tmp_path_factory.mktemp("upstream-template")
    write_channel(root / "demo", demo_specs(), zst=True, bz2=True, shards=False)
    return root


@dataclass
class Upstream:
    root: Path          # parent of the channel directory "demo"
    control: UpstreamControl
    base: str           # http://127.0.0.1:PORT (with /t/<token> when a token is set)

    @property
    def channel_url(self) -> str:
        return f"{self.base}/demo"

    def files(self, subdir: str) -> list[str]:
        return sorted(p.name for p in (self.root / "demo" / subdir).iterdir()
                      if p.name.endswith((".conda", ".tar.bz2")))


@pytest.fixture
async def upstream(demo_channel_template: Path, tmp_path: Path, aiohttp_server: AiohttpServer) -> Upstream:
    root = tmp_path / "upstream"
    shutil.copytree(demo_channel_template, root)
    control = UpstreamControl()
    server = await aiohttp_server(make_upstream_app(root, control))
    return Upstream(root, control, str(server.make_url("")).rstrip("/"))


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Config]:
    def write(source: str, *, name: str = "conda-demo", mode: str = "active",
              subdirs: list[str] | None = None, filters: dict | None = None, **extra: object) -> Config:
        """``subdirs``: None for linux-64 and noarch, [] for none named (every subdir upstream has)."""
        mirror = {"name": name, "type": "conda", "mode": mode, "source": source,
                  "subdirs": ["linux-64", "noarch"] if subdirs is None else subdirs, "concurrency": 4,
                  **extra}
        if not mirror["subdirs"]:
            del mirror["subdirs"]
        if filters:
            mirror["filters"] = filters
        path = tmp_path / "mirrorgen.yaml"
        path.write_text(yaml.safe_dump({"root": str(tmp_path / "mirror"), "mirrors": [mirror]}))
        return load_config(path)

    return write
