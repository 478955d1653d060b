"""A conda package record: the raw upstream bytes plus the few fields the filters read.

Records are never re-serialised: ``raw`` holds the record's JSON exactly as upstream served it
(patched fields, key order and unknown keys included) and goes into our repodata.json untouched.
Only the fields declared here are decoded, by msgspec, which keeps a 500,000-record subdir cheap:

- ``gc=False``: a record holds only strings, numbers and raw slices, never a cycle, so the garbage
  collector need not walk half a million of them again and again while a subdir is parsed.
- ``depends`` and ``constrains`` stay raw JSON until a filter reads them (python_versions, the
  dependency closure); a license or name filter never pays for a million small strings.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

__all__ = ["CondaRecord", "FileFacts", "RepodataDocument", "RepodataRecords"]

_EMPTY_LIST: Final = msgspec.Raw(b"[]")
_STRINGS: Final = msgspec.json.Decoder(list[str])


class CondaRecord(msgspec.Struct, gc=False):
    # Decoded from upstream. Unknown keys are ignored here (they survive in `raw`).
    name: str
    version: str
    build: str = ""
    build_number: int = 0
    depends_json: msgspec.Raw = msgspec.field(default=_EMPTY_LIST, name="depends")
    constrains_json: msgspec.Raw = msgspec.field(default=_EMPTY_LIST, name="constrains")
    license: str | None = None
    license_family: str | None = None
    timestamp: float | None = None

    # Set by the source after decoding (msgspec Structs are mutable; treat them as frozen after).
    fn: str = ""
    raw: msgspec.Raw = _EMPTY_LIST
    channel_subdir: str = ""   # the subdir whose repodata listed it (may differ from `subdir`)
    is_conda: bool = False     # listed under "packages.conda" (else "packages")
    source: int = 0            # index into the mirror's sources
    # rattler's PackageRecord, built on first use by a MatchSpec (mirrorgen.conda.matchspec).
    # Should an upstream record carry this odd key, its value is ignored: users check the type.
    rattler: Any = msgspec.field(default=None, name="mirrorgen.rattler")

    @property
    def depends(self) -> list[str]:
        return _strings(self.depends_json)

    @property
    def constrains(self) -> list[str]:
        return _strings(self.constrains_json)

    @property
    def key(self) -> str:
        """"<channel_subdir>/<fn>": the record's identity in reports (built when asked: kept on
        every record, these strings would be a tenth of a large subdir's memory)."""
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

    def lists_look_right(self) -> bool:
        """depends/constrains are JSON arrays: the cheap check the source makes on every record.
        (A string there, ``"depends": "python"``, is a real upstream mistake.) Their elements are
        checked when a filter first reads them; see :func:`_strings`."""
        # bytes() of a Raw is a copy of a few dozen bytes: cheaper than a memoryview.
        return bytes(self.depends_json)[0] == 91 and bytes(self.constrains_json)[0] == 91  # "["

    # File facts, read from the raw record when asked: only active mode and MatchSpec matching
    # need them, and decoding them for every record would cost a third of the parse.
    @property
    def files(self) -> FileFacts:
        try:
            return _FILE_FACTS.decode(self.raw)
        except msgspec.DecodeError:
            # A checksum of the wrong JSON type is no checksum: active mode then refuses the file.
            return _NO_FACTS


class FileFacts(msgspec.Struct, gc=False):
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    subdir: str | None = None


_FILE_FACTS: Final = msgspec.json.Decoder(FileFacts)
_NO_FACTS: Final = FileFacts()


def _strings(raw: msgspec.Raw) -> list[str]:
    # An array holding a non-string is read as empty: the record then depends on nothing we can
    # name, which is what the filters can still do with it. Its raw bytes are published unchanged.
    try:
        return _STRINGS.decode(raw)
    except msgspec.DecodeError:
        return []


class RepodataDocument(msgspec.Struct):
    """The top level of a repodata.json; records stay raw until the filters need them."""

    packages: dict[str, msgspec.Raw] = {}
    packages_conda: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict, name="packages.conda")
    info: dict[str, msgspec.Raw] | None = None
    metadata: dict[str, msgspec.Raw] | None = None  # older/alternative spelling of `info`
    removed: list[str] = []
    repodata_version: int | None = None


class RepodataRecords(msgspec.Struct):
    """The same document, every record decoded in one call (the fast path of the source)."""

    packages: dict[str, CondaRecord] = {}
    packages_conda: dict[str, CondaRecord] = msgspec.field(default_factory=dict, name="packages.conda")
