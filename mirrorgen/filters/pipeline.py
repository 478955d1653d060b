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
from .specs import SpecSet, filter_exclude, filter_only

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
    filter_exclude(passed, exclude, policy)
    restored = []
    if include:
        for record in py_ok:
            if record.key in policy and include.match(record) is not None:
                del policy[record.key]
                restored.append(record.key)
    in_current = {r.key for r in current}
    restored = [k for k in restored if k in in_current]
    after_policy = [r for r in current if r.key not in policy]
    dropped.update((k, v) for k, v in policy.items() if k in in_current)

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
