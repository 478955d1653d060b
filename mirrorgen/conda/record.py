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

import re
from typing import Any, Final

import msgspec

__all__ = ["CondaRecord", "FileFacts", "RepodataDocument", "RepodataRecords"]

_EMPTY_LIST: Final = msgspec.Raw(b"[]")
_LAST_SECOND: Final = 253402300799.0  # 9999-12-31T23:59:59Z
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
        # the year 5138 in seconds is taken to be milliseconds. One that is then still not a time
        # between 1970 and 9999 (NaN, 1e300, negative) is no timestamp at all.
        if self.timestamp is None:
            return None
        seconds = self.timestamp / 1000.0 if self.timestamp > 1e11 else float(self.timestamp)
        return seconds if 0.0 <= seconds <= _LAST_SECOND else None

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
            facts = _FILE_FACTS.decode(self.raw)
        except msgspec.DecodeError as exc:
            # A hash or size of the wrong JSON type is not "no hash": the file cannot be checked
            # as upstream meant, so it is refused (never fetched on the size alone).
            return FileFacts(problem=f"upstream's record is unusable: {exc}")
        if facts.sha256 is not None and not _SHA256_RE.fullmatch(facts.sha256):
            facts.problem = "upstream's sha256 for this file is not 64 hex digits"
        elif facts.md5 is not None and not _MD5_RE.fullmatch(facts.md5):
            facts.problem = "upstream's md5 for this file is not 32 hex digits"
        elif facts.size is not None and not 0 <= facts.size < 1 << 63:
            facts.problem = f"upstream's size for this file is out of range: {facts.size}"
        return facts


class FileFacts(msgspec.Struct, gc=False):
    """What upstream says a package file is; ``problem``: why these facts cannot be used to check
    the file (a hash of the wrong type or shape, a negative size), or None. Set by
    :attr:`CondaRecord.files`; should an upstream record carry the odd key it is decoded from, it
    can only make the file refused."""

    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    subdir: str | None = None
    problem: str | None = msgspec.field(default=None, name="mirrorgen.problem")


_FILE_FACTS: Final = msgspec.json.Decoder(FileFacts)
_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_MD5_RE: Final = re.compile(r"[0-9a-fA-F]{32}")


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
