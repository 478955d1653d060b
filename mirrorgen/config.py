"""The configuration file (SPEC §3): YAML in, typed and frozen objects out.

Every problem is reported as a one-line :class:`~mirrorgen.errors.ConfigError` naming the file, the
line and the key. The source documents' keys (cas-sync's ``channels``, ``platforms``, ``pkg_list``,
``blacklist``, ...) are accepted so that an existing file migrates by adding ``type`` and ``root``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Final, Literal

from .configentry import MirrorEntry, join_key
from .errors import ConfigError, one_line, shown
from .filterconfig import Filters, parse_filters
from .urls import redact
from .yamlnodes import LocatedDict, LocatedList, load_yaml

__all__ = ["Config", "MirrorConfig", "Filters", "load_config", "parse_config", "valid_mirror_name",
           "MIRROR_TYPES", "MODES"]

MirrorType = Literal["conda", "pypi", "cran"]
Mode = Literal["active", "passive"]
MIRROR_TYPES: Final[tuple[MirrorType, ...]] = ("conda", "pypi", "cran")
MODES: Final[tuple[Mode, ...]] = ("active", "passive")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Keys a mirror entry accepts. The compatibility keys map onto these (see _COMPAT_*).
_MIRROR_KEYS: Final = frozenset({
    "name", "type", "mode", "source", "sources", "subdirs", "filters", "schedule", "concurrency",
    "verify_checksums", "retries", "timeout",
    # pypi
    "package_types", "prereleases", "max_file_size", "projects",
    # cran
    "r_versions", "archive", "dependency_fields",
})
# cas-sync / anaconda-mirror keys (the source documents) -> what they mean here.
_COMPAT_MIRROR_KEYS: Final = frozenset({
    "channels", "dest_channel", "platforms", "pkg_list", "blacklist", "blocklist", "whitelist",
    "allowlist", "license_blacklist", "license_blocklist", "latest_only", "python_versions",
    "remote_url", "mirror_dir", "verify_checksum",
})
_TOP_KEYS: Final = frozenset({"root", "mirrors"})
# Past these a setting is a typo, not a choice: a thread per concurrent download, a retry waits
# up to 30 s, a timeout is per request.
_MAX_CONCURRENCY: Final = 256
_MAX_RETRIES: Final = 100
_MAX_TIMEOUT: Final = 86400


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    name: str
    type: MirrorType
    mode: Mode
    sources: tuple[str, ...]
    subdirs: tuple[str, ...] | None  # None: every subdir upstream has
    filters: Filters
    schedule: str | None = None
    concurrency: int = 8
    verify_checksums: bool = True
    retries: int = 4
    timeout: float = 300.0
    extra: dict[str, Any] = field(default_factory=dict)  # type-specific keys (pypi, cran)
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    root: Path
    mirrors: tuple[MirrorConfig, ...]

    def select(self, names: list[str] | None) -> tuple[MirrorConfig, ...]:
        if not names:
            return self.mirrors
        known = {m.name: m for m in self.mirrors}
        missing = [n for n in names if n not in known]
        if missing:
            raise ConfigError(f"no mirror named {shown(missing[0])} (have: {', '.join(known) or 'none'})",
                              file=str(self.path), key="--mirror")
        return tuple(known[n] for n in names)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("configuration file not found (use -c FILE)", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}", file=str(path)) from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    file = str(path)
    data = load_yaml(text, file)
    if not isinstance(data, LocatedDict):
        raise ConfigError("the configuration must be a mapping with 'root' and 'mirrors'", file=file,
                          line=1)
    root_key = "root" if "root" in data else "mirror_dir"
    root_value = data.get(root_key)
    if root_value is None:
        raise ConfigError("missing (the directory the mirror tree is written to)", file=file,
                          line=data.line, key="root")
    if not isinstance(root_value, str) or not root_value.strip():
        raise ConfigError("expected a directory path", file=file, line=data.line_of(root_key),
                          key=root_key)
    try:
        root = _resolve_path(root_value, path)
    except ValueError as exc:
        raise ConfigError(str(exc), file=file, line=data.line_of(root_key), key=root_key) from None
    if root_key == "root" and "mirror_dir" in data:
        # A cas-sync file migrates by adding root; a mirror_dir left beside it must agree, or
        # the tree would silently go to one of two places the file names.
        other = data["mirror_dir"]
        try:
            same = isinstance(other, str) and _resolve_path(other, path) == root
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"names another directory than root ({root}): give only one of "
                              "root / mirror_dir", file=file, line=data.line_of("mirror_dir"),
                              key="mirror_dir")

    if "mirrors" in data:
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(f"unknown key (top level accepts {', '.join(sorted(_TOP_KEYS))})",
                                  file=file, line=data.line_of(key), key=join_key("", key))
        entries = data["mirrors"]
        if entries is None:
            entries = LocatedList()
            entries.line, entries.item_lines = data.line_of("mirrors"), []
        if not isinstance(entries, LocatedList):
            raise ConfigError("expected a list of mirrors", file=file, line=data.line_of("mirrors"),
                              key="mirrors")
        items = [(f"mirrors[{i}]", e, entries.line_of(i)) for i, e in enumerate(entries)]
    else:
        # A source-documents style file: one mirror, written at the top level.
        flat = LocatedDict({k: v for k, v in data.items() if k not in ("root", "mirror_dir")})
        flat.line, flat.key_lines = data.line, data.key_lines
        if "name" not in flat and "dest_channel" not in flat:
            flat["name"] = path.stem
        items = [("", flat, data.line)]

    mirrors = []
    seen: dict[str, str] = {}
    for prefix, entry, line in items:
        mirror = _parse_mirror(entry, prefix, file, line, path)
        if mirror.name in seen:
            raise ConfigError(f"duplicate mirror name {shown(mirror.name)}", file=file, line=line,
                              key=join_key(prefix, "name"))
        seen[mirror.name] = prefix
        mirrors.append(mirror)
    return Config(path=path, root=root, mirrors=tuple(mirrors))


def valid_mirror_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name)) and name != ".mirrorgen"


def _resolve_path(value: str, config_path: Path) -> Path:
    """``value`` as a directory path (``~`` expanded, relative to the configuration file); a
    ValueError saying why it cannot be one (a NUL, an unknown ``~user``, unencodable text)."""
    if "\x00" in value:
        raise ValueError("not a usable path: it holds a NUL character")
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # no such user
        raise ValueError(f"cannot expand {shown(value.split('/', 1)[0])}") from None
    try:
        p = p if p.is_absolute() else (config_path.parent / p).resolve()
        os.fsencode(p)
    except (ValueError, UnicodeError, RuntimeError, OSError) as exc:  # a lone surrogate, a symlink loop
        raise ValueError(f"not a usable path: {one_line(str(exc), 80)}") from None
    return p


def _parse_mirror(data: Any, prefix: str, file: str, line: int, config_path: Path) -> MirrorConfig:
    if not isinstance(data, LocatedDict):
        raise ConfigError("expected a mapping describing one mirror", file=file, line=line,
                          key=prefix or None)
    e = MirrorEntry(data, prefix, file)
    for key in data:
        if key not in _MIRROR_KEYS and key not in _COMPAT_MIRROR_KEYS:
            raise e.err(key, "unknown key")
    if prefix and "mirror_dir" in data:
        raise e.err("mirror_dir", "mirror_dir is the tree's root: give it as root, at the top level")

    mtype = e.string("type")
    if mtype is None:
        raise ConfigError("missing (one of conda, pypi, cran)", file=file, line=data.line,
                          key=join_key(prefix, "type"))
    if mtype not in MIRROR_TYPES:
        raise e.err("type", f"unknown mirror type {shown(mtype)} (one of {', '.join(MIRROR_TYPES)})")
    mode = e.string("mode", "active")
    if mode not in MODES:
        raise e.err("mode", f"unknown mode {shown(mode)} (active or passive)")

    # name beats dest_channel: a cas-sync file migrates by adding name, and keeps dest_channel.
    name_key = "name" if "name" in data or "dest_channel" not in data else "dest_channel"
    name = e.string(name_key)
    if name is None:
        raise ConfigError("missing (the mirror's URL path under root)", file=file, line=data.line,
                          key=join_key(prefix, "name"))
    if not valid_mirror_name(name):
        raise e.err(name_key, f"{shown(name)} is not a valid mirror name (letters, digits, '.', '_', '-')")

    sources = _sources(e, config_path)
    subdirs = _subdirs(e, mtype)
    filters = parse_filters(e, mtype)

    extra: dict[str, Any] = {}
    for key in ("package_types", "r_versions", "dependency_fields"):
        value = e.strings(key)
        if value is not None:
            extra[key] = value
    for key in ("prereleases",):
        if key in data:
            extra[key] = e.boolean(key, False)
    for key in ("max_file_size", "archive"):
        if key in data:
            extra[key] = e.integer(key, None, minimum=0)
    if mtype != "pypi":
        for key in ("package_types", "prereleases", "max_file_size", "projects"):
            if key in data:
                raise e.err(key, f"only pypi mirrors take this key (this one is {mtype})")
    if mtype != "cran":
        for key in ("r_versions", "archive", "dependency_fields"):
            if key in data:
                raise e.err(key, f"only cran mirrors take this key (this one is {mtype})")

    schedule = e.string("schedule")
    if schedule is not None:
        from croniter import croniter  # chosen library for cron syntax

        if not croniter.is_valid(schedule):
            raise e.err("schedule", f"{shown(schedule)} is not a valid cron expression")

    verify = e.boolean(e.one_of("verify_checksums", "verify_checksum") or "verify_checksums", True)
    timeout = data.get("timeout", 300.0)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= _MAX_TIMEOUT):  # NaN fails this too
        raise e.err("timeout", f"expected a number of seconds above 0, at most {_MAX_TIMEOUT}, "
                               f"got {shown(timeout)}")
    return MirrorConfig(
        name=name, type=mtype, mode=mode, sources=sources, subdirs=subdirs, filters=filters,
        schedule=schedule, concurrency=e.integer("concurrency", 8, maximum=_MAX_CONCURRENCY) or 8,
        verify_checksums=verify, retries=e.integer("retries", 4, minimum=0, maximum=_MAX_RETRIES) or 0,
        timeout=float(timeout), extra=extra, file=file, line=data.line,
    )


def _sources(e: MirrorEntry, config_path: Path) -> tuple[str, ...]:
    # cas-sync's remote_url is the server the channels default to; written beside channels it is
    # their base, not a second list of sources, so only a mirror without one reads it.
    key = e.one_of("source", "sources", "channels") or ("remote_url" if "remote_url" in e.data else None)
    if key is None:
        raise ConfigError("missing (the upstream URL or directory to mirror)", file=e.file,
                          line=e.data.line, key=join_key(e.prefix, "source"))
    values = e.strings(key) or ()
    if not values:
        raise e.err(key, "expected at least one upstream URL or directory")
    out = []
    for value in values:
        # Seed 001 writes file://$MIRRORS_ARCHIVE/r/pkgs: environment variables are expanded.
        value = os.path.expandvars(value)
        if not value:
            raise e.err(key, "empty source (give an upstream URL or directory)")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            scheme, rest = value.split("://", 1)
            scheme = scheme.lower()
            if scheme not in ("http", "https", "file"):
                raise e.err(key, f"unsupported URL scheme {shown(scheme)} in {redact(value)}")
            if scheme == "file" and not rest.startswith("/") and not rest.startswith("localhost/"):
                raise e.err(key, f"{redact(value)}: a file:// URL needs an absolute path (file:///path)")
            if scheme != "file" and not rest.split("/", 1)[0]:
                raise e.err(key, f"{redact(value)}: the URL has no host")
            if re.search(r"[\x00-\x20\x7f]", value):
                raise e.err(key, f"{shown(value)}: a URL holds no spaces or control characters")
            try:
                parts = urlsplit(value)
                _ = parts.port  # urllib checks the port when asked
            except ValueError as exc:
                raise e.err(key, f"{redact(value)}: not a valid URL ({one_line(str(exc), 80)})") from None
            if scheme != "file" and not parts.hostname:  # "http://user@/x"
                raise e.err(key, f"{redact(value)}: the URL has no host")
            out.append(f"{scheme}://{rest}")
        else:
            try:
                out.append(str(_resolve_path(value, config_path)))
            except ValueError as exc:
                raise e.err(key, str(exc)) from None
    return tuple(out)



def _subdirs(e: MirrorEntry, mtype: str) -> tuple[str, ...] | None:
    key = e.one_of("subdirs", "platforms") or "subdirs"
    values = e.strings(key)
    if values is None:
        return None
    from .platforms import KNOWN_SUBDIRS

    for value in values:
        if value not in KNOWN_SUBDIRS:
            raise e.err(key, f"unknown subdir {shown(value)} (e.g. linux-64, osx-arm64, win-64, noarch)")
    if not values:
        raise e.err(key, "expected at least one subdir")
    # Seed 003: always include noarch — most platform packages need a noarch dependency, and conda
    # clients refuse a channel without noarch/repodata.json.
    ordered = dict.fromkeys(values)
    ordered.setdefault("noarch")
    return tuple(ordered)
