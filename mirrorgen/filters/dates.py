"""``date_from`` / ``date_to``: keep records built or uploaded inside the window (both ends
inclusive, whole UTC days). A record without a timestamp cannot be shown to be inside the window
and is dropped, with its own reason in the report."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from ..records import Ecosystem
from .sift import sift

__all__ = ["filter_dates"]

NAME = "dates"


def _epoch(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp()


def filter_dates(records: Iterable[Any], date_from: dt.date | None, date_to: dt.date | None,
                 eco: Ecosystem, dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if date_from is None and date_to is None:
        return list(records)
    low = _epoch(date_from) if date_from else float("-inf")
    high = _epoch(date_to + dt.timedelta(days=1)) if date_to else float("inf")

    def why(record: Any) -> str | None:
        seconds = eco.timestamp(record)
        if seconds is None:
            return "has no timestamp"
        if seconds < low:
            return f"built before {date_from}"
        if seconds >= high:
            return f"built after {date_to}"
        return None

    return sift(records, NAME, why, dropped)
