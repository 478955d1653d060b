"""Hand-made conda repodata for filter tests, and the real captured indexes in /work/shared.

``rec()`` describes one record, ``channel()`` turns records into parsed CondaRecords through the
real :func:`parse_repodata` (so tests exercise decoding as well), and ``real()`` parses one of the
read-only captured repodata files.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from mirrorgen.conda.record import CondaRecord
from mirrorgen.conda.source import SubdirIndex, parse_repodata

__all__ = ["TESTDATA", "rec", "fn_of", "repodata_bytes", "channel", "real", "real_bytes", "keys",
           "keyset"]

TESTDATA = Path("/work/shared/testdata/conda")


def rec(name: str, version: str, build: str = "0", *, depends: tuple[str, ...] | list[str] = (),
        build_number: int = 0, **extra: Any) -> dict[str, Any]:
    """One repodata record; ``extra`` adds any other key (license_family, timestamp, ...)."""
    return {"name": name, "version": version, "build": build, "build_number": build_number,
            "depends": list(depends), **extra}


def fn_of(record: dict[str, Any]) -> str:
    return f"{record['name']}-{record['version']}-{record['build']}.tar.bz2"


def repodata_bytes(records: list[dict[str, Any]], subdir: str) -> bytes:
    packages = {fn_of(r): r for r in records}
    if len(packages) != len(records):
        raise ValueError("two hand-made records share a file name")
    return json.dumps({"info": {"subdir": subdir}, "packages": packages,
                       "packages.conda": {}, "repodata_version": 1}).encode()


def channel(*records: dict[str, Any], subdir: str = "linux-64") -> list[CondaRecord]:
    index = parse_repodata(repodata_bytes(list(records), subdir), subdir, 0, f"test://{subdir}")
    assert not index.rejected, index.rejected
    return index.records


def keys(*stems: str, subdir: str = "linux-64") -> set[str]:
    """The keys of hand-made records named by file stem: ``keys("a-1-0")``."""
    return {f"{subdir}/{stem}.tar.bz2" for stem in stems}


def keyset(records: list[CondaRecord]) -> set[str]:
    return {r.key for r in records}


@lru_cache(maxsize=None)
def real_bytes(relpath: str) -> bytes:
    return (TESTDATA / relpath).read_bytes()


@lru_cache(maxsize=None)
def _real_index(relpath: str) -> SubdirIndex:
    data = real_bytes(relpath)
    doc = json.loads(data)
    subdir = (doc.get("info") or doc.get("metadata") or {})["subdir"]
    return parse_repodata(data, subdir, 0, f"file://{TESTDATA / relpath}")


def real(relpath: str) -> SubdirIndex:
    """A captured index, parsed once per session (records are read-only for the filters)."""
    return _real_index(relpath)
