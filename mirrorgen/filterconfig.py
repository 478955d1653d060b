"""The ``filters`` of a mirror entry (SPEC §3), and the source documents' keys that feed them
(``pkg_list``, ``blacklist``, ``license_blacklist``, ``latest_only``, ...): checked, each spec in
its mirror type's own syntax, and merged into one :class:`Filters`."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .configentry import MirrorEntry, join_key
from .errors import ConfigError, shown
from .yamlnodes import LocatedDict

__all__ = ["Filters", "FILTER_KEYS", "parse_filters"]

FILTER_KEYS: Final = frozenset({
    "only", "exclude", "include", "licenses", "python_versions", "latest", "date_from", "date_to",
    "include_dependencies",
})


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


def parse_filters(e: MirrorEntry, mtype: str) -> Filters:
    data = e.data.get("filters")
    if data is None:
        data = LocatedDict()
        data.line, data.key_lines = e.data.line, {}
    if not isinstance(data, LocatedDict):
        raise e.err("filters", "expected a mapping of filters")
    fprefix = join_key(e.prefix, "filters")
    for key in data:
        if key not in FILTER_KEYS:
            raise ConfigError("unknown filter", file=e.file, line=data.line_of(key),
                              key=join_key(fprefix, key))

    def fstrings(key: str) -> tuple[str, ...]:
        return e.strings(key, data=data, prefix=fprefix) or ()

    lines = {k: data.line_of(k) for k in data}
    written = {k: join_key(fprefix, k) for k in data}
    only, exclude, include = fstrings("only"), fstrings("exclude"), fstrings("include")
    # Every list of specs as written (key, line), checked one by one below so that an error
    # names the key the user wrote, not the filter a compatibility key merged into.
    spec_lists = [(join_key(fprefix, k), data.line_of(k), v)
                  for k, v in (("only", only), ("exclude", exclude), ("include", include)) if v]
    licenses = fstrings("licenses")
    python_versions = fstrings("python_versions")

    # Compatibility keys, written directly in the mirror entry.
    top = e.data

    def merged(filter_name: str, key: str, specs: tuple[str, ...] = ()) -> None:
        """``key`` feeds ``filter_name``: remember where it was written, check its specs there."""
        lines.setdefault(filter_name, top.line_of(key))
        written.setdefault(filter_name, join_key(e.prefix, key))
        if specs:
            spec_lists.append((join_key(e.prefix, key), top.line_of(key), specs))

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
                                  file=e.file, line=src.line_of(k), key=join_key(e.prefix if src is top else fprefix, k))
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
            raise ConfigError(f"unknown license family {shown(family)} (one of {', '.join(LICENSE_FAMILIES)})",
                              file=e.file, line=src.line_of(k), key=join_key(fprefix if src is data else e.prefix, k))
    for version in python_versions:
        if not re.match(r"^\d+(\.\d+){0,2}$", version):
            k = "python_versions"
            src = data if k in data else top
            raise ConfigError(f"{shown(version)} is not a python version like 3.11", file=e.file,
                              line=src.line_of(k), key=join_key(fprefix if src is data else e.prefix, k))

    latest = _latest(e, data, fprefix)
    if latest is not None and "latest" not in data:
        merged("latest", "latest_only")
    date_from = _date(e, data, fprefix, "date_from")
    date_to = _date(e, data, fprefix, "date_to")
    if date_from and date_to and date_from > date_to:
        raise ConfigError(f"date_from {date_from} is after date_to {date_to}", file=e.file,
                          line=data.line_of("date_from"), key=join_key(fprefix, "date_from"))
    include_deps = data.get("include_dependencies", False)
    if not isinstance(include_deps, bool):
        raise ConfigError(f"expected true or false, got {shown(include_deps)}", file=e.file,
                          line=data.line_of("include_dependencies"),
                          key=join_key(fprefix, "include_dependencies"))

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
        return f"invalid MatchSpec {shown(spec)}: {exc}"
    return None


def _pypi_spec_problem(spec: str) -> str | None:
    from packaging.requirements import InvalidRequirement, Requirement  # PEP 508

    try:
        Requirement(spec)
    except RecursionError:
        return f"invalid requirement {shown(spec)} (PEP 508): nested too deeply"
    except InvalidRequirement as exc:
        return f"invalid requirement {shown(spec)} (PEP 508): {str(exc).splitlines()[0]}"
    return None


# R's dependency syntax, as in a DESCRIPTION's Depends/Imports: a package name (letters, digits
# and dots, starting with a letter, at least two characters, not ending in a dot) and at most one
# version constraint in parentheses. No library parses it; this is the whole grammar.
_CRAN_SPEC_RE: Final = re.compile(
    r"[A-Za-z][A-Za-z0-9.]*[A-Za-z0-9]\s*(?:\(\s*(?:>=|<=|==|!=|>|<)\s*[0-9]+(?:[.-][0-9]+)*\s*\))?")


def _cran_spec_problem(spec: str) -> str | None:
    if _CRAN_SPEC_RE.fullmatch(spec):
        return None
    return f"invalid package spec {shown(spec)} (a name, or a name and a constraint like 'Rcpp (>= 1.0)')"


# What is wrong with a filter spec, in each mirror type's own syntax (None: nothing).
_SPEC_PROBLEM: Final[dict[str, Callable[[str], str | None]]] = {
    "conda": _conda_spec_problem, "pypi": _pypi_spec_problem, "cran": _cran_spec_problem}


def _first(e: MirrorEntry, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The spelling of ``keys`` the entry uses (the first if none) and its strings."""
    key = e.one_of(*keys)
    return key or keys[0], (e.strings(key) or ()) if key else ()


def _latest(e: MirrorEntry, data: LocatedDict, fprefix: str) -> int | None:
    value = data.get("latest")
    if "latest_only" in e.data:
        only = e.boolean("latest_only", False)
        if only and value is None:
            value = 1
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigError(f"expected a whole number from 1 to 1000000, got {shown(value)}", file=e.file,
                          line=data.line_of("latest"), key=join_key(fprefix, "latest"))
    return value


def _date(e: MirrorEntry, data: LocatedDict, fprefix: str, key: str) -> dt.date | None:
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
    raise ConfigError(f"expected a date YYYY-MM-DD, got {shown(value)}", file=e.file,
                      line=data.line_of(key), key=join_key(fprefix, key))
