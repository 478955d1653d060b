"""A conda package record: the raw upstream bytes plus the few fields the filters read.

Records are never re-serialised: ``raw`` holds the record's JSON exactly as upstream served it
(patched fields, key order and unknown keys included) and goes into our repodata.json untouched.
Only the fields declared here are decoded, by msgspec, which keeps a 500,000-record subdir cheap.
"""

from __future__ import annotations

import msgspec

__all__ = ["CondaRecord", "RepodataDocument"]


class CondaRecord(msgspec.Struct, dict=True):
    # Decoded from upstream. Unknown keys are ignored here (they survive in `raw`).
    name: str
    version: str
    build: str = ""
    build_number: int = 0
    depends: list[str] = []
    constrains: list[str] = []
    license: str | None = None
    license_family: str | None = None
    timestamp: float | None = None
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    subdir: str | None = None
    noarch: str | bool | None = None

    # Set by the source after decoding (msgspec Structs are mutable; treat them as frozen after).
    fn: str = ""
    raw: msgspec.Raw = msgspec.Raw(b"{}")
    channel_subdir: str = ""   # the subdir whose repodata listed it (may differ from `subdir`)
    is_conda: bool = False     # listed under "packages.conda" (else "packages")
    source: int = 0            # index into the mirror's sources

    @property
    def key(self) -> str:
        return f"{self.channel_subdir}/{self.fn}"

    @property
    def group(self) -> str:
        return self.channel_subdir

    @property
    def seconds(self) -> float | None:
        # Repodata timestamps are milliseconds since 2017 or so, seconds before: anything past
        # the year 5138 in seconds is taken to be milliseconds.
        if self.timestamp is None:
            return None
        return self.timestamp / 1000.0 if self.timestamp > 1e11 else float(self.timestamp)


class RepodataDocument(msgspec.Struct):
    """The top level of a repodata.json; records stay raw until the filters need them."""

    packages: dict[str, msgspec.Raw] = {}
    packages_conda: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict, name="packages.conda")
    info: dict[str, msgspec.Raw] | None = None
    metadata: dict[str, msgspec.Raw] | None = None  # older/alternative spelling of `info`
    removed: list[str] = []
    repodata_version: int | None = None
