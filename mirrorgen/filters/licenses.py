"""``licenses``: ``"-x"`` drops a license family, bare names keep only those families.

Seed 000: license_blocklist is evaluated before the blocklist. A record with several families (an
SPDX expression naming more than one) is dropped if any of them is dropped — the conservative
reading a compliance policy expects — and, with an allow list, kept only if all of them are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..licenses import normalize_family
from ..records import Ecosystem
from .sift import sift

__all__ = ["filter_licenses"]

NAME = "licenses"


def filter_licenses(records: Iterable[Any], licenses: Sequence[str], eco: Ecosystem,
                    dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if not licenses:
        return list(records)
    blocked = {normalize_family(x[1:]) for x in licenses if x.startswith("-")}
    allowed = {normalize_family(x) for x in licenses if not x.startswith("-")}
    # A channel has a few dozen distinct family sets: each one's verdict is worked out once.
    verdicts: dict[frozenset[str], str | None] = {}

    def why(record: Any) -> str | None:
        families = eco.license_families(record)
        try:
            return verdicts[families]
        except KeyError:
            reason = verdicts[families] = _verdict(families, blocked, allowed)
            return reason

    return sift(records, NAME, why, dropped)


def _verdict(families: frozenset[str], blocked: set[str], allowed: set[str]) -> str | None:
    """Why a record of these families is dropped, or None if it is kept."""
    hit = families & blocked
    if hit:
        return f"license family {sorted(hit)[0]} is blocked"
    if allowed and not families <= allowed:
        return f"license family {sorted(families - allowed)[0]} is not allowed"
    return None
