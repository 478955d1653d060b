"""Conda's semantics for the filters: MatchSpec, version order and dependencies, all from py-rattler.

Nothing here re-implements conda's rules; it adapts rattler's ``MatchSpec``, ``VersionSpec`` and
``Version`` to the :class:`mirrorgen.records.Ecosystem` interface and caches what repeats (the same
dependency string appears on thousands of records).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from rattler import BuildString, MatchSpec, PackageRecord, Version, VersionSpec

from ..licenses import families_of
from .record import CondaRecord

__all__ = ["CondaSpec", "CondaEcosystem", "parse_matchspec", "conda_version"]

_VERSION_LITERAL_RE: Final = re.compile(r"\d+(?:\.[0-9A-Za-z_]+)*")
_DEP_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]+")
_BUILD_NUMBER_OVERFLOW_RE: Final = re.compile(r"build_number[^\]]*?\d{20}")


@dataclass(frozen=True, slots=True)
class CondaSpec:
    text: str
    spec: MatchSpec = field(repr=False)
    name: str | None

    def matches(self, record: CondaRecord) -> bool:
        """Whether the spec matches ``record``; False for a record rattler cannot read (a version
        or build it refuses), which is then marked so (:meth:`CondaEcosystem.unreadable`)."""
        if self.name is not None and record.name != self.name:
            return False
        built = _package_record(record)
        return built is not None and self.spec.matches(built)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Put in a record's ``rattler`` slot when rattler refused to build it: why."""
    reason: str


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` is rattler refusing its input: one of its exceptions, or a panic in its Rust
    code (pyo3's PanicException derives from BaseException, so ``except Exception`` misses it)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


@lru_cache(maxsize=65536)
def parse_matchspec(text: str) -> CondaSpec:
    """Parse a MatchSpec the way conda does (globs allowed in names); ValueError if invalid."""
    if "build_number" in text and _BUILD_NUMBER_OVERFLOW_RE.search(text):
        # rattler panics on this one (an unwrap in its build_number parser), and its panic hook
        # prints the panic, with a backtrace, to stderr before Python sees the exception.
        raise ValueError("a build_number larger than any build number (2**64)")
    try:
        spec = MatchSpec(text, exact_names_only=False)
    except BaseException as exc:  # rattler raises its own InvalidMatchSpecError (not a ValueError)
        if not _refused(exc):
            raise
        raise ValueError(_first_line(exc)) from None
    exact = spec.name.as_package_name() if spec.name is not None else None
    return CondaSpec(text=text, spec=spec, name=exact.normalized if exact is not None else None)


@lru_cache(maxsize=262144)
def conda_version(text: str) -> Version | None:
    try:
        return Version(text)
    except BaseException as exc:  # an unparsable upstream version sorts first, not a stopped run
        if not _refused(exc):
            raise
        return None


def _package_record(record: CondaRecord) -> PackageRecord | None:
    """The record as rattler sees it, or None if rattler refuses it (upstream's name, version,
    build or numbers are not what conda allows). Built lazily, only for records a spec's name
    selects, and kept on the record (or why it could not be built: :class:`Unreadable`)."""
    cached = record.rattler
    if isinstance(cached, Unreadable):
        return None
    if not isinstance(cached, PackageRecord):
        def hexbytes(value: str | None, length: int) -> bytes | None:
            try:
                return bytes.fromhex(value) if value and len(value) == length else None
            except ValueError:
                return None

        facts = record.files
        try:
            cached = PackageRecord(
                name=record.name, version=record.version, build=BuildString(record.build),
                build_number=record.build_number, subdir=facts.subdir or record.channel_subdir,
                depends=list(record.depends), constrains=list(record.constrains),
                sha256=hexbytes(facts.sha256, 64), md5=hexbytes(facts.md5, 32), size=facts.size,
                license=record.license, license_family=record.license_family,
            )
        except BaseException as exc:
            if not _refused(exc):
                raise
            record.rattler = Unreadable(f"rattler cannot read it: {_first_line(exc)}")
            return None
        record.rattler = cached
    return cached


@lru_cache(maxsize=65536)
def _python_dependency(dep: str) -> VersionSpec | None | bool:
    """The version constraint of a ``python ...`` dependency: None if unconstrained, False if the
    dependency is not on python, the VersionSpec otherwise."""
    # The name ends where the version begins, with or without a space ("python>=3.12").
    match = _DEP_NAME_RE.match(dep)
    if match is None or match.group(0) != "python":
        return False
    try:
        version = MatchSpec(dep).version
    except BaseException as exc:
        if not _refused(exc):
            raise
        return None
    return VersionSpec(version) if version else None


@lru_cache(maxsize=65536)
def _admits_series(spec_text: str, series: str) -> bool:
    """Whether a python version constraint admits any release of ``series`` (e.g. "3.11").

    A version constraint is a union of intervals whose bounds are the literals written in it, so
    testing the series' first and last release, and each literal inside the series together with a
    point just above it, finds any overlap between the two.
    """
    spec = VersionSpec(spec_text)
    candidates = {series, f"{series}.0", f"{series}.0.0", f"{series}.9999", f"{series}.9999.9999"}
    for literal in _VERSION_LITERAL_RE.findall(spec_text):
        if literal == series or literal.startswith(series + "."):
            candidates.update({literal, f"{literal}.1", f"{literal}.9999"})
    return any(spec.matches(Version(c)) for c in candidates)


class CondaEcosystem:
    name: Final = "conda"

    def parse_spec(self, text: str) -> CondaSpec:
        return parse_matchspec(text)

    def version_key(self, record: CondaRecord) -> Any:
        # rattler's Version implements conda's ordering; build_number breaks ties between builds.
        version = conda_version(record.version)
        return (version is not None, version if version is not None else _NO_VERSION, record.build_number)

    def python_admits(self, record: CondaRecord, versions: Sequence[str]) -> bool | None:
        if record.name == "python":
            # The interpreter itself: keep only the configured series.
            return any(record.version == v or record.version.startswith(v + ".") for v in versions)
        # A python pin in `constrains` (python_abi, many noarch records) rules a record out just as
        # surely as one in `depends`: it cannot be installed alongside the other pythons.
        for dep in (*record.depends, *record.constrains):
            constraint = _python_dependency(dep)
            if constraint is False:
                continue
            if constraint is None:
                return True
            text = MatchSpec(dep).version or ""
            return any(_admits_series(text, v) for v in versions)
        return None

    def timestamp(self, record: CondaRecord) -> float | None:
        return record.seconds

    def license_families(self, record: CondaRecord) -> frozenset[str]:
        return families_of(record.license_family, record.license)

    def dependencies(self, record: CondaRecord) -> Sequence[CondaSpec]:
        out = []
        for dep in record.depends:
            if dep.startswith("__"):  # virtual packages (__glibc, __osx) are not in any channel
                continue
            try:
                out.append(parse_matchspec(dep))
            except ValueError:
                continue
        return out

    def can_satisfy(self, dependent: CondaRecord, candidate: CondaRecord) -> bool:
        if candidate.channel_subdir == "noarch" or dependent.channel_subdir == "noarch":
            return True
        return candidate.channel_subdir == dependent.channel_subdir

    def latest_group(self, record: CondaRecord) -> Hashable:
        return (record.name, record.channel_subdir)

    def unreadable(self, record: CondaRecord) -> str | None:
        cached = record.rattler
        return cached.reason if isinstance(cached, Unreadable) else None


_NO_VERSION: Final = Version("0")
