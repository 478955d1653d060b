"""``python_versions``: keep records usable with one of the configured python versions.

Seed 000: "Mirrors only Anaconda packages built for Python 3.3". A record whose python requirement
admits none of the versions is dropped; a record with no python requirement is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..records import Ecosystem
from .sift import sift

__all__ = ["filter_python_versions"]

NAME = "python_versions"


def filter_python_versions(records: Iterable[Any], versions: Sequence[str], eco: Ecosystem,
                           dropped: dict[str, tuple[str, str]]) -> list[Any]:
    if not versions:
        return list(records)
    other = f"requires a python other than {', '.join(versions)}"
    return sift(records, NAME, lambda record: other if eco.python_admits(record, versions) is False else None,
                dropped)
