"""What a run kept and what each filter excluded, and why (seed 002: "details of what was filtered
and why", and the dependency report). Written to ``<root>/.mirrorgen/<mirror>/report.json``."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from .urls import redact

if TYPE_CHECKING:
    from .config import MirrorConfig
    from .filters import FilterOutcome
    from .sync import RunResult

__all__ = ["build_report", "render_text"]

# The order the filters run in, for a report that reads top to bottom.
FILTER_ORDER = ("upstream", "python_versions", "dates", "only", "licenses", "exclude", "latest")


def build_report(mirror: MirrorConfig, outcome: FilterOutcome, result: RunResult, channel: Any, *,
                 started: str, finished: str) -> dict[str, Any]:
    excluded: dict[str, dict[str, Any]] = {}
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    names: dict[str, set[str]] = defaultdict(set)
    for key, (filt, reason) in outcome.dropped.items():
        reasons[filt][reason] += 1
        names[filt].add(_name_of(key))
    for key, reason in channel.rejected().items():
        reasons["upstream"][reason] += 1
        names["upstream"].add(_name_of(key))
    for filt in sorted(reasons, key=lambda f: FILTER_ORDER.index(f) if f in FILTER_ORDER else 99):
        excluded[filt] = {"count": sum(reasons[filt].values()), "reasons": dict(reasons[filt].most_common()),
                          "names": sorted(names[filt])}
    kept_by_subdir = Counter(r.group for r in outcome.kept)
    deps = outcome.dependencies
    return {
        "mirror": mirror.name, "type": mirror.type, "mode": mirror.mode,
        "sources": [redact(s) for s in mirror.sources], "fetched": channel.fetched_from(),
        "started": started, "finished": finished, "state": "failed" if result.failed else "completed",
        "upstream_records": outcome.total,
        "kept": {"count": len(outcome.kept) - len(result.failed), "by_subdir": dict(sorted(kept_by_subdir.items())),
                 "names": sorted({r.name for r in outcome.kept})},
        "excluded": excluded,
        "restored_by_include": sorted(outcome.restored),
        "added_by_dependencies": sorted(deps.added) if deps else [],
        "unused_specs": outcome.unused_specs,
        "failed": dict(sorted(result.failed.items())),
        "downloaded": {"files": result.downloaded, "bytes": result.bytes_downloaded,
                       "reused": result.reused, "rehashed": result.rehashed},
        "removed": result.removed,
        "dependencies": {
            "needs": deps.needs if deps else {},
            "unresolved": deps.unresolved if deps else {},
            "blocked": deps.blocked if deps else {},
            "added": sorted({_name_of(k) for k in deps.added}) if deps else [],
        } if deps else None,
    }


def _name_of(key: str) -> str:
    """The package name in a conda key 'subdir/name-version-build.ext'."""
    fn = key.rsplit("/", 1)[-1]
    parts = fn.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else fn


def render_text(report: dict[str, Any]) -> str:
    lines = [f"{report['mirror']} ({report['type']}, {report['mode']}): {report['state']}, "
             f"finished {report['finished']}",
             f"  upstream records: {report['upstream_records']}",
             f"  kept: {report['kept']['count']} "
             + ", ".join(f"{s}: {n}" for s, n in report["kept"]["by_subdir"].items())]
    for filt, info in report["excluded"].items():
        lines.append(f"  excluded by {filt}: {info['count']}")
        for reason, count in list(info["reasons"].items())[:10]:
            lines.append(f"    {count:>7}  {reason}")
        shown = info["names"][:15]
        more = len(info["names"]) - len(shown)
        lines.append("    names: " + ", ".join(shown) + (f" (+{more} more)" if more > 0 else ""))
    if report["restored_by_include"]:
        lines.append(f"  restored by include: {len(report['restored_by_include'])}: "
                     + ", ".join(report["restored_by_include"][:10]))
    if report["added_by_dependencies"]:
        lines.append(f"  added as dependencies: {len(report['added_by_dependencies'])}")
    for filt, specs in report["unused_specs"].items():
        lines.append(f"  {filt} specs that matched nothing: {', '.join(specs)}")
    if report["failed"]:
        lines.append(f"  FAILED: {len(report['failed'])}")
        for key, why in list(report["failed"].items())[:20]:
            lines.append(f"    {key}: {why}")
    d = report["downloaded"]
    lines.append(f"  downloaded {d['files']} files ({d['bytes']} bytes), {d['reused']} already verified")
    if report["removed"]:
        lines.append(f"  removed: {len(report['removed'])}")
    return "\n".join(lines)
