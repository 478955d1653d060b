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

__all__ = ["filter_licenses"]

NAME = "licenses"


def filter_licenses(records: Iterable[Any], licenses: Sequence[str], eco: Ecosystem,
                    dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if not licenses:
        return list(records)
    blocked = {normalize_family(x[1:]) for x in licenses if x.startswith("-")}
    allowed = {normalize_family(x) for x in licenses if not x.startswith("-")}
    kept = []
    for record in records:
        families = eco.license_families(record)
        hit = families & blocked
        if hit:
            dropped[record.key] = (NAME, f"license family {sorted(hit)[0]} is blocked")
        elif allowed and not families <= allowed:
            other = sorted(families - allowed)[0]
            dropped[record.key] = (NAME, f"license family {other} is not allowed")
        else:
            kept.append(record)
    return kept
