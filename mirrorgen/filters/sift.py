"""The loop the filters share: keep every record a filter has no reason to drop, and note each
dropped record's reason under the filter's name, for the run's report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["sift"]


def sift(records: Iterable[Any], name: str, why: Callable[[Any], str | None],
         dropped: dict[str, tuple[str, str]]) -> list[Any]:
    """The records of ``records`` that ``why`` gives no reason for, in order; each of the others
    goes into ``dropped`` by its key, as ``(name, reason)``."""
    kept = []
    for record in records:
        reason = why(record)
        if reason is None:
            kept.append(record)
        else:
            dropped[record.key] = (name, reason)
    return kept
