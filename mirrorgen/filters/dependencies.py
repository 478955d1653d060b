"""``include_dependencies``: add what the kept packages need, transitively.

SPEC §3: the closure is taken from the same upstream, through the same subdir and python filters,
and never adds what ``exclude``/``licenses`` removed unless ``include`` restores it. With ``latest``
set, each dependency adds only the newest N versions that satisfy it (so ``python >=3.8`` does not
pull every python ever built); without it, every matching record is added.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..records import Ecosystem
from .latest import newest_versions

__all__ = ["DependencyReport", "add_dependencies"]


@dataclass
class DependencyReport:
    added: list[str] = field(default_factory=list)                   # keys added by the closure
    needs: dict[str, list[str]] = field(default_factory=dict)         # package -> dependency specs
    unresolved: dict[str, list[str]] = field(default_factory=dict)    # spec -> who needed it
    blocked: dict[str, str] = field(default_factory=dict)             # spec -> why candidates were refused


def add_dependencies(kept: list[Any], pool: Iterable[Any], refused: dict[str, tuple[str, str]],
                     latest: int | None, eco: Ecosystem) -> tuple[list[Any], DependencyReport]:
    """``pool``: every record that passed the subdir and python filters; ``refused``: keys that
    exclude/licenses removed and include did not restore, with their reason."""
    by_name: dict[str, list[Any]] = defaultdict(list)
    for record in pool:
        by_name[record.name].append(record)
    report = DependencyReport()
    have = {r.key for r in kept}
    out = list(kept)
    queue = deque(kept)
    seen_pairs: set[tuple[str, Any]] = set()
    while queue:
        record = queue.popleft()
        specs = eco.dependencies(record)
        report.needs.setdefault(record.name, sorted({s.text for s in specs}))
        for spec in specs:
            pair = (spec.text, eco.latest_group(record))
            if pair in seen_pairs:
                continue
            seen_pairs.add(pair)
            names = [spec.name] if spec.name is not None else list(by_name)
            candidates = [c for n in names for c in by_name.get(n, ())
                          if eco.can_satisfy(record, c) and spec.matches(c)]
            allowed = [c for c in candidates if c.key not in refused]
            if not allowed:
                who = f"{record.name} {record.version}"
                report.unresolved.setdefault(spec.text, []).append(who)
                if candidates:
                    f, reason = refused[candidates[0].key]
                    report.blocked[spec.text] = f"{f}: {reason}"
                continue
            if latest:
                newest = newest_versions(allowed, latest, eco)
                allowed = [c for c in allowed if c.key in newest]
            for candidate in allowed:
                if candidate.key not in have:
                    have.add(candidate.key)
                    out.append(candidate)
                    report.added.append(candidate.key)
                    queue.append(candidate)
    return out, report
