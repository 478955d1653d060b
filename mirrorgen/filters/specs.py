"""``only``, ``exclude`` and ``include``: the spec lists (conda MatchSpec, PEP 508, CRAN).

Seed 004: --only_spec keeps what matches, --exclude_spec drops what matches, --include_spec puts
back "a package, or a specific version of a package, that would otherwise be excluded".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..records import Ecosystem, Spec
from .sift import sift

__all__ = ["SpecSet", "filter_only", "filter_exclude", "filter_unreadable"]


class SpecSet:
    """Several specs, looked up by package name first so that most records cost a dict probe."""

    def __init__(self, texts: Sequence[str], eco: Ecosystem) -> None:
        self.by_name: dict[str, list[Spec]] = defaultdict(list)
        self.any_name: list[Spec] = []
        self.specs = [eco.parse_spec(t) for t in texts]
        self.used: set[str] = set()
        for spec in self.specs:
            (self.by_name[spec.name] if spec.name is not None else self.any_name).append(spec)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def match(self, record: Any) -> Spec | None:
        for spec in self.by_name.get(record.name, ()):
            if spec.matches(record):
                self.used.add(spec.text)
                return spec
        for spec in self.any_name:
            if spec.matches(record):
                self.used.add(spec.text)
                return spec
        return None

    def unused(self) -> list[str]:
        return [s.text for s in self.specs if s.text not in self.used]


def filter_only(records: Iterable[Any], only: SpecSet, dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if not only:
        return list(records)
    return sift(records, "only", lambda record: "matches no 'only' spec" if only.match(record) is None else None,
                dropped)


def filter_exclude(records: Iterable[Any], exclude: SpecSet, dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if not exclude:
        return list(records)

    def why(record: Any) -> str | None:
        spec = exclude.match(record)
        return None if spec is None else f"matches {spec.text!r}"

    return sift(records, "exclude", why, dropped)


def filter_unreadable(records: Iterable[Any], eco: Ecosystem, dropped: dict[str, tuple[str, str]]) -> list[Any]:
    """``records`` less those a spec could not be tested against (see Ecosystem.unreadable): run
    after the spec filters, which mark them as they try."""
    return sift(records, "malformed", eco.unreadable, dropped)
