"""``latest: N``: keep the newest N versions of each package (per subdir), all builds of each.

Versions are ordered by the ecosystem (conda's order via rattler, PEP 440, R's package_version).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Any

from ..records import Ecosystem
from .sift import sift

__all__ = ["filter_latest", "newest_versions"]

NAME = "latest"


def newest_versions(records: Iterable[Any], n: int, eco: Ecosystem) -> set[str]:
    """The keys of the records that carry one of the n newest versions of their group."""
    groups: dict[Hashable, list[Any]] = defaultdict(list)
    for record in records:
        groups[eco.latest_group(record)].append(record)
    keep: set[str] = set()
    for members in groups.values():
        by_version: dict[str, Any] = {}
        for record in members:
            key = eco.version_key(record)
            # The version part of the key (without build number) identifies "a version".
            vkey = key[:-1] if isinstance(key, tuple) else key
            prev = by_version.get(record.version)
            by_version[record.version] = vkey if prev is None or vkey > prev else prev
        # Versions that compare equal (1.0 and 1.0.0) count once.
        distinct = sorted(set(by_version.values()), reverse=True)[:n]
        wanted = set(distinct)
        keep.update(r.key for r in members if by_version[r.version] in wanted)
    return keep


def filter_latest(records: list[Any], n: int | None, eco: Ecosystem,
                  dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if not n:
        return records
    keep = newest_versions(records, n, eco)
    older = f"not among the newest {n} version{'s' if n > 1 else ''}"
    return sift(records, NAME, lambda record: None if record.key in keep else older, dropped)
