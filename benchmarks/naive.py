"""The naive floor for benchmark 1: what a short Python script does with one repodata.json.

orjson load, a dict-comprehension filter, orjson dump, zstd level 3. The filter is mirrorgen's
own license-family predicate, so both sides keep exactly the same records.

    python -m benchmarks.naive IN_REPODATA OUT_DIR -gpl3 -agpl
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import zstandard

from mirrorgen.licenses import families_of, normalize_family


def main(argv: list[str]) -> int:
    source, out, *licenses = argv
    blocked = {normalize_family(x.lstrip("-")) for x in licenses}
    doc = orjson.loads(Path(source).read_bytes())
    for key in ("packages", "packages.conda"):
        doc[key] = {fn: r for fn, r in (doc.get(key) or {}).items()
                    if not families_of(r.get("license_family"), r.get("license")) & blocked}
    data = orjson.dumps(doc)
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "repodata.json").write_bytes(data)
    Path(out, "repodata.json.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
