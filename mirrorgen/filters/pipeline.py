"""The filters in the source documents' order (SPEC §3).

subdirs are chosen by the source; then ``python_versions``, dates and ``only`` narrow; ``licenses``
then ``exclude`` remove; ``include`` restores what those two removed; then ``latest``; then
``include_dependencies`` adds the closure of what is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Filters
from ..records import Ecosystem
from .dates import filter_dates
from .dependencies import DependencyReport, add_dependencies
from .latest import filter_latest
from .licenses import filter_licenses
from .python_versions import filter_python_versions
from .specs import SpecSet, filter_exclude, filter_only, filter_unreadable

__all__ = ["FilterOutcome", "apply_filters"]


@dataclass
class FilterOutcome:
    kept: list[Any]
    # key -> (filter, reason) for every record that is not published.
    dropped: dict[str, tuple[str, str]]
    restored: list[str] = field(default_factory=list)      # keys `include` put back
    dependencies: DependencyReport | None = None
    unused_specs: dict[str, list[str]] = field(default_factory=dict)  # filter -> specs matching nothing
    total: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(f for f, _ in self.dropped.values()))


def apply_filters(records: Sequence[Any], filters: Filters, eco: Ecosystem) -> FilterOutcome:
    dropped: dict[str, tuple[str, str]] = {}
    only = SpecSet(filters.only, eco)
    exclude = SpecSet(filters.exclude, eco)
    include = SpecSet(filters.include, eco)

    py_ok = filter_python_versions(records, filters.python_versions, eco, dropped)
    current = filter_dates(py_ok, filters.date_from, filters.date_to, eco, dropped)
    current = filter_only(current, only, dropped)

    # Policy: licenses first, then exclude "as a supplemental modifier" (seed 000); include puts
    # back what those two removed. The verdict covers every record that passed the python filter,
    # not only what `only` kept: the dependency closure draws from that pool and must honour it.
    policy: dict[str, tuple[str, str]] = {}
    passed = filter_licenses(py_ok, filters.licenses, eco, policy)
    passed = filter_exclude(passed, exclude, policy)
    if not include and len(current) == len(py_ok):
        # Nothing to put back and nothing narrowed (the filters above only remove, in order):
        # what passed the policy is what is kept, and all it refused is dropped. The general
        # path below costs four passes over every record (a quarter of a second at 500,000).
        restored: list[str] = []
        after_policy = passed
        dropped.update(policy)
    else:
        restored, after_policy = _apply_policy(py_ok, current, passed, include, policy, dropped)

    if only or exclude or include:  # records a spec could not be tested against (they never match)
        after_policy = filter_unreadable(after_policy, eco, dropped)
    kept = filter_latest(after_policy, filters.latest, eco, dropped)

    report = None
    if filters.include_dependencies:
        refused = dict(policy)
        kept, report = add_dependencies(kept, py_ok, refused, filters.latest, eco)
        for key in report.added:
            dropped.pop(key, None)

    unused = {name: s.unused() for name, s in (("only", only), ("exclude", exclude), ("include", include))
              if s and s.unused()}
    return FilterOutcome(kept=kept, dropped=dropped, restored=restored, dependencies=report,
                         unused_specs=unused, total=len(records))


def _apply_policy(py_ok: Sequence[Any], current: list[Any], passed: list[Any], include: SpecSet,
                  policy: dict[str, tuple[str, str]], dropped: dict[str, tuple[str, str]]
                  ) -> tuple[list[str], list[Any]]:
    """``include`` puts back what the policy refused; the records of ``current`` it then allows,
    and the keys it restored; the policy's verdicts on ``current`` go into ``dropped``."""
    # Membership by identity: a record's key is a string built on demand, and half a million of
    # them only to test membership would cost more than the filters themselves.
    allowed = {id(r) for r in passed}
    put_back = []
    if include:
        for record in py_ok:
            if id(record) not in allowed and include.match(record) is not None:
                del policy[record.key]
                allowed.add(id(record))
                put_back.append(record)
    in_current = {id(r) for r in current}
    restored = [r.key for r in put_back if id(r) in in_current]
    after_policy = [r for r in current if id(r) in allowed]
    if policy:
        refused_here = {r.key for r in current if id(r) not in allowed}
        dropped.update((k, v) for k, v in policy.items() if k in refused_here)
    return restored, after_policy
