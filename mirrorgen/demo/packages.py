"""Build real, installable conda packages and index them into a channel.

Only the standard library (``tarfile``, ``zipfile``, ``hashlib``, ``json``)
plus ``zstandard`` is used to write the archives, so the demo channel and the
test fixtures never need conda-build.  The archives follow the conda package
format:

``<name>-<version>-<build>.tar.bz2``
    A bzip2 tarball holding the payload files plus ``info/index.json``,
    ``info/paths.json`` (``paths_version`` 1, every entry a ``hardlink`` with
    ``sha256`` and ``size_in_bytes``) and ``info/files``.

``<name>-<version>-<build>.conda``
    A zip archive whose members are *stored* (not deflated, because the inner
    tarballs are already zstd-compressed and clients may read them with range
    requests): ``metadata.json`` (``{"conda_pkg_format_version": 2}``),
    ``pkg-<stem>.tar.zst`` (the payload) and ``info-<stem>.tar.zst`` (the
    ``info/`` directory).

:func:`write_channel` indexes the channel with py-rattler's real indexer,
``rattler.index.index_fs``.  With py-rattler 0.28 that writes, per subdir:

* ``repodata.json`` (always),
* ``repodata.json.zst`` (when ``write_zst``),
* ``repodata_shards.msgpack.zst`` plus ``shards/<sha256-hex>.msgpack.zst``, one
  shard per package name (when ``write_shards``).  The index holds
  ``info.shards_base_url = "./shards/"``, ``info.base_url = ""`` and
  ``shards: {name: sha256}`` where the sha256 is of the *compressed* shard
  file, which is also its file name.

Every record gets ``indexed_timestamp`` = wall-clock time of indexing (plus
top-level ``repodata_version: 1`` and an empty ``v3`` section), so repodata
bytes differ between runs even though the package archives are
byte-for-byte reproducible.

It never writes ``repodata.json.bz2``, ``current_repodata.json`` or
``channeldata.json``; :func:`write_channel` adds ``repodata.json.bz2`` itself
when asked.  ``noarch/`` is always created first: conda clients (and the
indexer itself) require every channel to have a ``noarch`` subdir, even an
empty one.
"""

from __future__ import annotations

import asyncio
import bz2 as bz2_module
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

import zstandard

__all__ = [
    "run_blocking",
    "DEFAULT_TIMESTAMP_MS",
    "PackageSpec",
    "build_package",
    "demo_specs",
    "write_channel",
]

# 2023-11-14T22:13:20Z.  A fixed build time keeps archives (and therefore their
# sha256) byte-for-byte reproducible between runs.
DEFAULT_TIMESTAMP_MS = 1_700_000_000_000

PackageFormat = Literal["tar.bz2", "conda"]

# conda's own (subdir -> arch) naming in index.json; "platform" is the prefix.
_ARCH_BY_SUFFIX: Mapping[str, str] = {
    "64": "x86_64",
    "32": "x86",
    "aarch64": "aarch64",
    "arm64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}

_T = TypeVar("_T")


@dataclass(frozen=True)
class PackageSpec:
    """Everything needed to write one conda package archive."""

    name: str
    version: str
    build: str = "0"
    build_number: int = 0
    depends: tuple[str, ...] = ()
    subdir: str = "noarch"
    noarch: str | None = None
    license: str | None = None
    license_family: str | None = None
    timestamp: int = DEFAULT_TIMESTAMP_MS
    files: Mapping[str, bytes] = field(default_factory=dict)
    format: PackageFormat = "tar.bz2"

    @property
    def stem(self) -> str:
        return f"{self.name}-{self.version}-{self.build}"

    @property
    def filename(self) -> str:
        return f"{self.stem}.{self.format}"

    def index_json(self) -> dict[str, Any]:
        """The ``info/index.json`` document the indexer copies into repodata."""
        doc: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "build": self.build,
            "build_number": self.build_number,
            "depends": list(self.depends),
            "subdir": self.subdir,
            "timestamp": self.timestamp,
        }
        if self.subdir != "noarch":
            platform, _, suffix = self.subdir.partition("-")
            doc["platform"] = platform
            doc["arch"] = _ARCH_BY_SUFFIX.get(suffix, suffix)
        if self.noarch is not None:
            doc["noarch"] = self.noarch
        if self.license is not None:
            doc["license"] = self.license
        if self.license_family is not None:
            doc["license_family"] = self.license_family
        return doc


def _check_payload_path(path: str) -> None:
    # A payload path escaping the prefix, or shadowing info/, would make a
    # package that real clients reject or, worse, install outside the prefix.
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"payload path must be relative and inside the prefix: {path!r}")
    if pure.parts[0] == "info":
        raise ValueError(f"payload path may not live under info/: {path!r}")


def _info_files(spec: PackageSpec) -> dict[str, bytes]:
    paths = sorted(spec.files)
    paths_json = {
        "paths": [
            {
                "_path": p,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(spec.files[p]).hexdigest(),
                "size_in_bytes": len(spec.files[p]),
            }
            for p in paths
        ],
        "paths_version": 1,
    }
    return {
        "info/index.json": _json_bytes(spec.index_json()),
        "info/paths.json": _json_bytes(paths_json),
        "info/files": "".join(f"{p}\n" for p in paths).encode(),
    }


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _tar_bytes(members: Mapping[str, bytes], mtime: int, *, bzip2: bool) -> bytes:
    buf = io.BytesIO()
    tar = (
        tarfile.open(fileobj=buf, mode="w:bz2", format=tarfile.PAX_FORMAT)
        if bzip2
        else tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    )
    with tar:
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    # A fixed date keeps the zip reproducible; ZIP_STORED as conda requires.
    info = zipfile.ZipInfo(name, date_time=(2023, 11, 14, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_package(spec: PackageSpec, out_dir: Path) -> Path:
    """Write ``spec`` as a package archive into ``out_dir``; return its path."""
    for path in spec.files:
        _check_payload_path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / spec.filename
    mtime = spec.timestamp // 1000
    info = _info_files(spec)
    payload = dict(spec.files)

    if spec.format == "tar.bz2":
        target.write_bytes(_tar_bytes({**payload, **info}, mtime, bzip2=True))
    elif spec.format == "conda":
        cctx = zstandard.ZstdCompressor(level=19)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
            # metadata.json first, info last (as conda-package-handling does):
            # a reader that only wants metadata can fetch the archive's tail.
            _zip_member(zf, "metadata.json", json.dumps({"conda_pkg_format_version": 2}).encode())
            _zip_member(zf, f"pkg-{spec.stem}.tar.zst", cctx.compress(_tar_bytes(payload, mtime, bzip2=False)))
            _zip_member(zf, f"info-{spec.stem}.tar.zst", cctx.compress(_tar_bytes(info, mtime, bzip2=False)))
    else:
        raise ValueError(f"unknown package format {spec.format!r}")
    return target


def run_blocking(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from sync code, even inside a running loop.

    ``asyncio.run`` refuses to nest, and async tests call :func:`write_channel`
    from inside pytest's loop, so in that case the coroutine gets a private
    loop on a short-lived thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[_T] = []
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=runner, name="mirrorgen-demo-index")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def write_channel(
    channel_dir: Path,
    specs: Iterable[PackageSpec],
    *,
    zst: bool = True,
    bz2: bool = False,
    shards: bool = False,
) -> None:
    """Build every package into ``channel_dir/<subdir>/`` and index the channel.

    Blocking; safe to call from inside a running event loop (the indexer then
    runs on a helper thread).
    """
    from rattler.index import index_fs  # imported lazily: heavy native module

    channel_dir.mkdir(parents=True, exist_ok=True)
    (channel_dir / "noarch").mkdir(exist_ok=True)
    for spec in specs:
        build_package(spec, channel_dir / spec.subdir)
    # Explicit write_zst/write_shards so a user's rattler index-config cannot
    # change what the tests see; force so a re-run re-indexes every subdir.
    run_blocking(index_fs(channel_dir, write_zst=zst, write_shards=shards, force=True))
    if bz2:
        for repodata in sorted(channel_dir.glob("*/repodata.json")):
            compressed = bz2_module.compress(repodata.read_bytes(), compresslevel=9)
            (repodata.parent / "repodata.json.bz2").write_bytes(compressed)


def _demo(name: str, version: str, fmt: PackageFormat, *, subdir: str = "noarch", **kw: Any) -> PackageSpec:
    """A demo spec whose payload is one ``share/demo/<name>.txt`` file."""
    files = {f"share/demo/{name}.txt": f"{name}: {version}\n".encode()}
    noarch = "generic" if subdir == "noarch" else None
    return PackageSpec(name=name, version=version, subdir=subdir, noarch=noarch, files=files, format=fmt, **kw)


def demo_specs() -> list[PackageSpec]:
    """A small, realistic channel: a dependency chain, licenses, both formats.

    ``demo-cli -> demo-lib -> demo-base >=1.0`` spans noarch and linux-64 so a
    solve for ``demo-cli`` on linux-64 needs both subdirs; ``demo-base`` has an
    old 0.9 that the ``>=1.0`` pin must skip.  Each package installs
    ``share/demo/<name>.txt`` containing ``"<name>: <version>\n"``.
    """
    bsd3 = {"license": "BSD-3-Clause", "license_family": "BSD"}
    mit = {"license": "MIT", "license_family": "MIT"}
    linux = "linux-64"
    return [
        _demo("demo-base", "0.9", "tar.bz2", subdir=linux, build="h0_0",
              timestamp=DEFAULT_TIMESTAMP_MS - 86_400_000, **bsd3),
        _demo("demo-base", "1.2", "conda", subdir=linux, build="h0_0", **bsd3),
        _demo("demo-lib", "2.0", "tar.bz2", subdir=linux, build="h0_1", build_number=1,
              depends=("demo-base >=1.0",), **mit),
        _demo("demo-cli", "3.1", "conda", build="h0_0", depends=("demo-lib",), **mit),
        _demo("demo-readline", "8.2", "tar.bz2", subdir=linux, build="h0_0",
              license="GPL-3.0-only", license_family="GPL3"),
        _demo("demo-mit", "1.0", "tar.bz2", **mit),
        _demo("demo-bsd", "4.5", "conda", license="BSD-2-Clause", license_family="BSD"),
        _demo("demo-data", "2024.1", "conda", depends=("demo-bsd >=4",),
              license="CC0-1.0", license_family="Public-Domain"),
    ]
