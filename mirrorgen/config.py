"""The configuration file (SPEC §3): YAML in, typed and frozen objects out.

Every problem is reported as a one-line :class:`~mirrorgen.errors.ConfigError` naming the file, the
line and the key. The source documents' keys (cas-sync's ``channels``, ``platforms``, ``pkg_list``,
``blacklist``, ...) are accepted so that an existing file migrates by adding ``type`` and ``root``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from .errors import ConfigError
from .yamlnodes import LocatedDict, LocatedList, load_yaml

__all__ = ["Config", "MirrorConfig", "Filters", "load_config", "parse_config", "valid_mirror_name",
           "MIRROR_TYPES", "MODES"]

MirrorType = Literal["conda", "pypi", "cran"]
Mode = Literal["active", "passive"]
MIRROR_TYPES: Final[tuple[MirrorType, ...]] = ("conda", "pypi", "cran")
MODES: Final[tuple[Mode, ...]] = ("active", "passive")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Keys a mirror entry accepts. The compatibility keys map onto these (see _COMPAT_*).
_MIRROR_KEYS: Final = frozenset({
    "name", "type", "mode", "source", "sources", "subdirs", "filters", "schedule", "concurrency",
    "verify_checksums", "retries", "timeout",
    # pypi
    "package_types", "prereleases", "max_file_size", "projects",
    # cran
    "r_versions", "archive", "dependency_fields",
})
_FILTER_KEYS: Final = frozenset({
    "only", "exclude", "include", "licenses", "python_versions", "latest", "date_from", "date_to",
    "include_dependencies",
})
# cas-sync / anaconda-mirror keys (the source documents) -> what they mean here.
_COMPAT_MIRROR_KEYS: Final = frozenset({
    "channels", "dest_channel", "platforms", "pkg_list", "blacklist", "blocklist", "whitelist",
    "allowlist", "license_blacklist", "license_blocklist", "latest_only", "python_versions",
    "remote_url", "mirror_dir", "verify_checksum",
})
_TOP_KEYS: Final = frozenset({"root", "mirrors"})


@dataclass(frozen=True, slots=True)
class Filters:
    only: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    licenses: tuple[str, ...] = ()
    python_versions: tuple[str, ...] = ()
    latest: int | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    include_dependencies: bool = False
    # Where each filter was written (line, and key as the user spelled it: "mirrors[0].blacklist"
    # for exclude), for errors found later (e.g. "matched nothing").
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    keys: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


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
            raise ConfigError(f"no mirror named {missing[0]!r} (have: {', '.join(known) or 'none'})",
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
    root = _resolve_path(root_value, path)
    if root_key == "root" and "mirror_dir" in data:
        # A cas-sync file migrates by adding root; a mirror_dir left beside it must agree, or
        # the tree would silently go to one of two places the file names.
        other = data["mirror_dir"]
        if not isinstance(other, str) or _resolve_path(other, path) != root:
            raise ConfigError(f"names another directory than root ({root}): give only one of "
                              "root / mirror_dir", file=file, line=data.line_of("mirror_dir"),
                              key="mirror_dir")

    if "mirrors" in data:
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(f"unknown key (top level accepts {', '.join(sorted(_TOP_KEYS))})",
                                  file=file, line=data.line_of(key), key=_join("", key))
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
            raise ConfigError(f"duplicate mirror name {mirror.name!r}", file=file, line=line,
                              key=_join(prefix, "name"))
        seen[mirror.name] = prefix
        mirrors.append(mirror)
    return Config(path=path, root=root, mirrors=tuple(mirrors))


def valid_mirror_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name != ".mirrorgen"


def _join(prefix: str, key: str) -> str:
    from .urls import redact

    # A key is user text: a URL pasted where a key belongs must not leak its token.
    return f"{prefix}.{redact(key)}" if prefix else redact(key)


def _kind(value: Any) -> str:
    """What a YAML value is, in YAML's words (never our internal class names)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "nothing"
    return type(value).__name__


def _resolve_path(value: str, config_path: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (config_path.parent / p).resolve()


class _Entry:
    """Reads one mirror mapping, remembering which keys were consumed and where they were."""

    def __init__(self, data: LocatedDict, prefix: str, file: str) -> None:
        self.data, self.prefix, self.file = data, prefix, file

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.data.line_of(key),
                           key=_join(self.prefix, key))

    def one_of(self, *keys: str) -> str | None:
        return _one_of(self.data, keys, self.file, self.prefix)

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.err(key, f"expected a string, got {_kind(value)}")
        return value

    def strings(self, key: str, *, data: LocatedDict | None = None, prefix: str | None = None
                ) -> tuple[str, ...] | None:
        data = self.data if data is None else data
        if key not in data or data[key] is None:
            return None
        value = data[key]
        where = _join(self.prefix if prefix is None else prefix, key)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"expected a list of strings, got {_kind(value)}",
                              file=self.file, line=data.line_of(key), key=where)
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                line = value.line_of(i) if isinstance(value, LocatedList) else data.line_of(key)
                raise ConfigError(f"item {i}: expected a string, got {_kind(item)}",
                                  file=self.file, line=line, key=where)
            out.append((getattr(item, "text", None) or str(item)).strip())
        return tuple(out)

    def integer(self, key: str, default: int | None, *, minimum: int = 1) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.err(key, f"expected a whole number >= {minimum}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.err(key, f"expected true or false, got {value!r}")
        return value


def _parse_mirror(data: Any, prefix: str, file: str, line: int, config_path: Path) -> MirrorConfig:
    if not isinstance(data, LocatedDict):
        raise ConfigError("expected a mapping describing one mirror", file=file, line=line,
                          key=prefix or None)
    e = _Entry(data, prefix, file)
    for key in data:
        if key not in _MIRROR_KEYS and key not in _COMPAT_MIRROR_KEYS:
            raise e.err(key, "unknown key")
    if prefix and "mirror_dir" in data:
        raise e.err("mirror_dir", "mirror_dir is the tree's root: give it as root, at the top level")

    mtype = e.string("type")
    if mtype is None:
        raise ConfigError("missing (one of conda, pypi, cran)", file=file, line=data.line,
                          key=_join(prefix, "type"))
    if mtype not in MIRROR_TYPES:
        raise e.err("type", f"unknown mirror type {mtype!r} (one of {', '.join(MIRROR_TYPES)})")
    mode = e.string("mode", "active")
    if mode not in MODES:
        raise e.err("mode", f"unknown mode {mode!r} (active or passive)")

    # name beats dest_channel: a cas-sync file migrates by adding name, and keeps dest_channel.
    name_key = "name" if "name" in data or "dest_channel" not in data else "dest_channel"
    name = e.string(name_key)
    if name is None:
        raise ConfigError("missing (the mirror's URL path under root)", file=file, line=data.line,
                          key=_join(prefix, "name"))
    if not valid_mirror_name(name):
        raise e.err(name_key, f"{name!r} is not a valid mirror name (letters, digits, '.', '_', '-')")

    sources = _sources(e, config_path)
    subdirs = _subdirs(e, mtype)
    filters = _filters(e, mtype)

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
            raise e.err("schedule", f"{schedule!r} is not a valid cron expression")

    verify = e.boolean(e.one_of("verify_checksums", "verify_checksum") or "verify_checksums", True)
    timeout = data.get("timeout", 300.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise e.err("timeout", f"expected a positive number of seconds, got {timeout!r}")
    return MirrorConfig(
        name=name, type=mtype, mode=mode, sources=sources, subdirs=subdirs, filters=filters,
        schedule=schedule, concurrency=e.integer("concurrency", 8) or 8,
        verify_checksums=verify, retries=e.integer("retries", 4, minimum=0) or 0,
        timeout=float(timeout), extra=extra, file=file, line=data.line,
    )


def _sources(e: _Entry, config_path: Path) -> tuple[str, ...]:
    # cas-sync's remote_url is the server the channels default to; written beside channels it is
    # their base, not a second list of sources, so only a mirror without one reads it.
    key = e.one_of("source", "sources", "channels") or ("remote_url" if "remote_url" in e.data else None)
    if key is None:
        raise ConfigError("missing (the upstream URL or directory to mirror)", file=e.file,
                          line=e.data.line, key=_join(e.prefix, "source"))
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
                raise e.err(key, f"unsupported URL scheme {scheme!r} in {_redact(value)}")
            if scheme == "file" and not rest.startswith("/") and not rest.startswith("localhost/"):
                raise e.err(key, f"{_redact(value)}: a file:// URL needs an absolute path (file:///path)")
            if scheme != "file" and not rest.split("/", 1)[0]:
                raise e.err(key, f"{_redact(value)}: the URL has no host")
            out.append(f"{scheme}://{rest}")
        else:
            out.append(str(_resolve_path(value, config_path)))
    return tuple(out)


def _redact(url: str) -> str:
    from .urls import redact

    return redact(url)


def _subdirs(e: _Entry, mtype: str) -> tuple[str, ...] | None:
    key = e.one_of("subdirs", "platforms") or "subdirs"
    values = e.strings(key)
    if values is None:
        return None
    from .platforms import KNOWN_SUBDIRS

    for value in values:
        if value not in KNOWN_SUBDIRS:
            raise e.err(key, f"unknown subdir {value!r} (e.g. linux-64, osx-arm64, win-64, noarch)")
    if not values:
        raise e.err(key, "expected at least one subdir")
    # Seed 003: always include noarch — most platform packages need a noarch dependency, and conda
    # clients refuse a channel without noarch/repodata.json.
    ordered = dict.fromkeys(values)
    ordered.setdefault("noarch")
    return tuple(ordered)


def _filters(e: _Entry, mtype: str) -> Filters:
    data = e.data.get("filters")
    if data is None:
        data = LocatedDict()
        data.line, data.key_lines = e.data.line, {}
    if not isinstance(data, LocatedDict):
        raise e.err("filters", "expected a mapping of filters")
    fprefix = _join(e.prefix, "filters")
    for key in data:
        if key not in _FILTER_KEYS:
            raise ConfigError("unknown filter", file=e.file, line=data.line_of(key),
                              key=_join(fprefix, key))

    def fstrings(key: str) -> tuple[str, ...]:
        return e.strings(key, data=data, prefix=fprefix) or ()

    lines = {k: data.line_of(k) for k in data}
    written = {k: _join(fprefix, k) for k in data}
    only, exclude, include = fstrings("only"), fstrings("exclude"), fstrings("include")
    # Every list of specs as written (key, line), checked one by one below so that an error
    # names the key the user wrote, not the filter a compatibility key merged into.
    spec_lists = [(_join(fprefix, k), data.line_of(k), v)
                  for k, v in (("only", only), ("exclude", exclude), ("include", include)) if v]
    licenses = fstrings("licenses")
    python_versions = fstrings("python_versions")

    # Compatibility keys, written directly in the mirror entry.
    top = e.data

    def merged(filter_name: str, key: str, specs: tuple[str, ...] = ()) -> None:
        """``key`` feeds ``filter_name``: remember where it was written, check its specs there."""
        lines.setdefault(filter_name, top.line_of(key))
        written.setdefault(filter_name, _join(e.prefix, key))
        if specs:
            spec_lists.append((_join(e.prefix, key), top.line_of(key), specs))

    pkg_key = "pkg_list" if "pkg_list" in top else "projects"
    pkg_list = e.strings(pkg_key) or ()
    block_key, blocklist = _first(e, ("blacklist", "blocklist"))
    allow_key, allowlist = _first(e, ("whitelist", "allowlist"))
    license_key, license_block = _first(e, ("license_blacklist", "license_blocklist"))
    if pkg_list:
        # Seed 000: pkg_list "cannot be used with the blocklist, allowlist or license_blocklist
        # arguments — it can only be combined with platform-specific and version-specific mirroring".
        for keys, value in ((("blacklist", "blocklist"), blocklist), (("whitelist", "allowlist"), allowlist),
                            (("license_blacklist", "license_blocklist"), license_block),
                            (("exclude",), exclude), (("include",), include), (("licenses",), licenses)):
            if value:
                k = next(k for k in keys if k in top or k in data)
                src = top if k in top else data
                raise ConfigError(f"cannot be combined with {pkg_key} "
                                  "(a package list may only be combined with platforms and python_versions)",
                                  file=e.file, line=src.line_of(k), key=_join(e.prefix if src is top else fprefix, k))
        only = only + pkg_list
        merged("only", pkg_key, pkg_list)
    if blocklist:
        exclude = exclude + blocklist
        merged("exclude", block_key, blocklist)
    if allowlist:
        include = include + allowlist
        merged("include", allow_key, allowlist)
    if license_block:
        licenses = licenses + tuple(f"-{x.lstrip('-')}" for x in license_block)
        merged("licenses", license_key)
    if "python_versions" in top:
        python_versions = python_versions + (e.strings("python_versions") or ())
        merged("python_versions", "python_versions")

    from .licenses import LICENSE_FAMILIES

    for item in licenses:
        family = item[1:] if item.startswith("-") else item
        if family.lower().replace("-", "_") not in LICENSE_FAMILIES:
            k = "licenses" if "licenses" in data else next(
                (k for k in ("license_blacklist", "license_blocklist") if k in top), "licenses")
            src = data if k == "licenses" else top
            raise ConfigError(f"unknown license family {family!r} (one of {', '.join(LICENSE_FAMILIES)})",
                              file=e.file, line=src.line_of(k), key=_join(fprefix if src is data else e.prefix, k))
    for version in python_versions:
        if not re.match(r"^\d+(\.\d+){0,2}$", version):
            k = "python_versions"
            src = data if k in data else top
            raise ConfigError(f"{version!r} is not a python version like 3.11", file=e.file,
                              line=src.line_of(k), key=_join(fprefix if src is data else e.prefix, k))

    latest = _latest(e, data, fprefix)
    if latest is not None and "latest" not in data:
        merged("latest", "latest_only")
    date_from = _date(e, data, fprefix, "date_from")
    date_to = _date(e, data, fprefix, "date_to")
    if date_from and date_to and date_from > date_to:
        raise ConfigError(f"date_from {date_from} is after date_to {date_to}", file=e.file,
                          line=data.line_of("date_from"), key=_join(fprefix, "date_from"))
    include_deps = data.get("include_dependencies", False)
    if not isinstance(include_deps, bool):
        raise ConfigError(f"expected true or false, got {include_deps!r}", file=e.file,
                          line=data.line_of("include_dependencies"),
                          key=_join(fprefix, "include_dependencies"))

    for where, line, specs in spec_lists:
        for spec in specs:
            problem = _SPEC_PROBLEM[mtype](spec)
            if problem is not None:
                raise ConfigError(problem, file=e.file, line=line, key=where)
    return Filters(only=only, exclude=exclude, include=include, licenses=licenses,
                   python_versions=python_versions, latest=latest, date_from=date_from,
                   date_to=date_to, include_dependencies=include_deps, lines=lines, keys=written)


def _conda_spec_problem(spec: str) -> str | None:
    from .conda.matchspec import parse_matchspec

    try:
        parse_matchspec(spec)
    except ValueError as exc:
        return f"invalid MatchSpec {spec!r}: {exc}"
    return None


def _pypi_spec_problem(spec: str) -> str | None:
    from packaging.requirements import InvalidRequirement, Requirement  # PEP 508

    try:
        Requirement(spec)
    except InvalidRequirement as exc:
        return f"invalid requirement {spec!r} (PEP 508): {str(exc).splitlines()[0]}"
    return None


# R's dependency syntax, as in a DESCRIPTION's Depends/Imports: a package name (letters, digits
# and dots, starting with a letter, at least two characters, not ending in a dot) and at most one
# version constraint in parentheses. No library parses it; this is the whole grammar.
_CRAN_SPEC_RE: Final = re.compile(
    r"^[A-Za-z][A-Za-z0-9.]*[A-Za-z0-9]\s*(?:\(\s*(?:>=|<=|==|!=|>|<)\s*[0-9]+(?:[.-][0-9]+)*\s*\))?$")


def _cran_spec_problem(spec: str) -> str | None:
    if _CRAN_SPEC_RE.match(spec):
        return None
    return f"invalid package spec {spec!r} (a name, or a name and a constraint like 'Rcpp (>= 1.0)')"


# What is wrong with a filter spec, in each mirror type's own syntax (None: nothing).
_SPEC_PROBLEM: Final[dict[str, Callable[[str], str | None]]] = {
    "conda": _conda_spec_problem, "pypi": _pypi_spec_problem, "cran": _cran_spec_problem}


def _one_of(data: LocatedDict, keys: tuple[str, ...], file: str, prefix: str) -> str | None:
    """Which of several spellings of one setting the entry uses (None: none); two is an error,
    not a silent choice of one."""
    present = sorted((k for k in keys if k in data), key=data.line_of)
    if len(present) > 1:  # named where the second spelling is written
        raise ConfigError(f"give only one of {' / '.join(keys)}", file=file,
                          line=data.line_of(present[1]), key=_join(prefix, present[1]))
    return present[0] if present else None


def _first(e: _Entry, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The spelling of ``keys`` the entry uses (the first if none) and its strings."""
    key = e.one_of(*keys)
    return key or keys[0], (e.strings(key) or ()) if key else ()


def _latest(e: _Entry, data: LocatedDict, fprefix: str) -> int | None:
    value = data.get("latest")
    if "latest_only" in e.data:
        only = e.boolean("latest_only", False)
        if only and value is None:
            value = 1
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"expected a whole number >= 1, got {value!r}", file=e.file,
                          line=data.line_of("latest"), key=_join(fprefix, "latest"))
    return value


def _date(e: _Entry, data: LocatedDict, fprefix: str, key: str) -> dt.date | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"expected a date YYYY-MM-DD, got {value!r}", file=e.file,
                      line=data.line_of(key), key=_join(fprefix, key))
