"""The common record model that every filter works on, and what an ecosystem must supply.

A *record* is one distributable file as an upstream index describes it. Each ecosystem (conda, PyPI,
CRAN) has its own record class; the filters only ever touch the attributes of :class:`Record` and
ask the :class:`Ecosystem` everything else (how a spec matches, how versions order, what a record
depends on). That is how a new ecosystem plugs in without touching ``mirrorgen/filters/``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

__all__ = ["Record", "Spec", "Ecosystem"]


class Record(Protocol):
    key: str      # unique within one mirror: the file's path relative to the mirror root
    name: str     # the package (project) name, normalised the ecosystem's way
    version: str  # as upstream spells it
    group: str    # the unit `latest` counts within: the subdir (conda), platform, ...


class Spec(Protocol):
    text: str
    # The one package name the spec can match, or None when it may match several (a glob): lets
    # filters look candidates up by name instead of testing every record.
    name: str | None

    def matches(self, record: Any) -> bool: ...


class Ecosystem(Protocol):
    name: str

    def parse_spec(self, text: str) -> Spec:
        """Parse a user's spec; raises ValueError with a readable reason."""

    def version_key(self, record: Any) -> Any:
        """A key that sorts the records of one package from oldest to newest version."""

    def python_admits(self, record: Any, versions: Sequence[str]) -> bool | None:
        """Whether the record can be used with one of the python versions; None if it has no python
        requirement at all."""

    def timestamp(self, record: Any) -> float | None:
        """Upload/build time in seconds since the epoch, if upstream says."""

    def license_families(self, record: Any) -> frozenset[str]:
        """The record's license families (see mirrorgen.licenses)."""

    def dependencies(self, record: Any) -> Sequence[Spec]:
        """What the record needs installed with it (virtual packages left out)."""

    def can_satisfy(self, dependent: Any, candidate: Any) -> bool:
        """Whether ``candidate`` may be installed alongside ``dependent`` at all (platform fit)."""

    def latest_group(self, record: Any) -> Hashable:
        """Records compared by `latest` share this key (name and subdir for conda)."""

    def unreadable(self, record: Any) -> str | None:
        """Why a spec could not be tested against the record (upstream wrote a version or name
        the ecosystem's rules refuse), once a spec tried; else None. Such a record is dropped:
        it can be neither shown to match an ``only`` spec nor shown not to match an ``exclude``."""
