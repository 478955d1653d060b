"""One run of one mirror: read upstream, filter, fetch and verify (active), publish, record.

Publication order is what keeps the tree consistent under any failure: package files first (each
verified before its rename), then the index files, the one clients read first last. A file that
could not be fetched or verified is left out of the published index; the run then exits 1 and
names it. Nothing is deleted except by ``--clean``, after the new index is live.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .config import Config, MirrorConfig
from .errors import ConfigError, MirrorError, UnusableRecord, UsageError, describe_os_error, one_line
from .fetching import fetch_all, plan
from .filters import FilterOutcome, apply_filters
from .manifest import Manifest
from .progress import Progress
from .report import build_report
from .store import COMMIT_GROUP, Store
from .tempfiles import Temp, fsync_path
from .transport import Transport

__all__ = ["RunResult", "sync_mirror", "channel_for", "stray_files"]

T = TypeVar("T")


@dataclass
class RunResult:
    mirror: str
    state: str = "completed"
    dry_run: bool = False
    upstream: int = 0
    kept: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    reused: int = 0
    rehashed: int = 0
    index_files: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    would_download: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    error: str | None = None
    # Seconds per phase (read, filter, check, fetch, publish, clean, record): where a run's time
    # went, for operators tuning a large mirror.
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = round(self.timings.get(phase, 0.0) + time.perf_counter() - start, 3)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def channel_for(mirror: MirrorConfig) -> Any:
    if mirror.type == "conda":
        from .conda.channel import CondaChannel

        return CondaChannel(mirror)
    raise UsageError(f"mirror {mirror.name!r}: {mirror.type} mirrors: not implemented yet")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


async def sync_mirror(config: Config, mirror: MirrorConfig, store: Store, *, dry_run: bool = False,
                      clean: bool = False, progress: bool = True) -> RunResult:
    channel = channel_for(mirror)
    with store.lock(mirror.name, write=not dry_run):
        started = _now()
        status = store.read_state(mirror.name, "status.json") or {}
        if not dry_run:
            if status.get("state") == "running" and isinstance(status.get("temp_tag"), str):
                # The last run was killed (this one holds the lock): its temporary files are
                # garbage, and nothing else would remove them (named ones: shards, index files,
                # downloads where O_TMPFILE cannot be used).
                store.discard_run_temps(mirror.name, status["temp_tag"])
            store.write_state(mirror.name, "status.json", {
                **status, "state": "running", "type": mirror.type, "mode": mirror.mode,
                "last_start": started, "pid": os.getpid(), "temp_tag": store.temp_tag()})
        result = RunResult(mirror.name, dry_run=dry_run)
        try:
            await _run(mirror, store, channel, result, dry_run=dry_run, clean=clean,
                       progress=Progress(mirror.name, enabled=progress), started=started)
        except (asyncio.CancelledError, KeyboardInterrupt):
            if not dry_run:
                _status(store, mirror, "stopped", started, result, "interrupted")
            raise
        except (MirrorError, OSError) as exc:
            why = str(exc) if isinstance(exc, MirrorError) else describe_os_error(exc)
            result.state, result.error = "failed", why
            if not dry_run:
                with contextlib.suppress(OSError):  # the disk that failed the run may refuse this too
                    _status(store, mirror, "failed", started, result, why)
            raise
        except Exception as exc:  # a defect of ours: shown with its traceback, but the run failed
            why = f"internal error: {type(exc).__name__}: {one_line(str(exc))}"
            result.state, result.error = "failed", why
            if not dry_run:
                with contextlib.suppress(OSError):
                    _status(store, mirror, "failed", started, result, why)
            raise
        finally:
            gc.unfreeze()  # the run's records are garbage now; let the collector see all again
        if not dry_run:
            result.state = "failed" if result.failed else "completed"
            _status(store, mirror, result.state, started, result, None)
        return result


def _status(store: Store, mirror: MirrorConfig, state: str, started: str, result: RunResult,
            error: str | None) -> None:
    store.write_state(mirror.name, "status.json", {
        "state": state, "type": mirror.type, "mode": mirror.mode, "last_start": started,
        "last_end": _now(), "error": error,
        "counts": {"upstream": result.upstream, "kept": result.kept, "downloaded": result.downloaded,
                   "failed": len(result.failed), "removed": len(result.removed)},
    })


async def _run(mirror: MirrorConfig, store: Store, channel: Any, result: RunResult, *,
               dry_run: bool, clean: bool, progress: Progress, started: str) -> None:
    async with Transport(retries=mirror.retries, timeout=mirror.timeout,
                         concurrency=mirror.concurrency) as transport:
        with _collector_paused():
            with result.timed("read"):
                records = await channel.read(transport)
            with result.timed("filter"):
                outcome = await asyncio.to_thread(apply_filters, records, mirror.filters, channel.ecosystem)
        # Hundreds of thousands of records, their lists and dicts, all alive until the run ends:
        # out of the cyclic collector's sight from here on, or every collection walks them again.
        gc.freeze()
        result.upstream, result.kept = len(records), len(outcome.kept)
        if not outcome.kept:
            if not records and (rejected := channel.rejected()):  # upstream's fault, not the filters'
                key, why = min(rejected.items())
                files = f"{len(rejected)} package file" + ("s" if len(rejected) != 1 else "")
                raise MirrorError(f"{mirror.name}: upstream lists {files} and none can be mirrored ({key}: {why})")
            raise _empty_result(mirror, outcome)

        with result.timed("check"):
            manifest = Manifest(store, mirror.name).load()
            todo = plan(mirror, store, channel, manifest, outcome.kept, result)

        if dry_run:
            result.would_download = [relpath for _, relpath, _, _ in todo]
            kept, base = outcome.kept, store.mirror_dir(mirror.name)
            if clean and base.is_dir():  # else nothing is there to remove
                state = store.read_state(mirror.name, "index-cache.json")
                # As the real run would publish it: less any record no client could read.
                kept, index_files = await _leaving_out_unusable(
                    lambda records: channel.index_files_after(records, base, state), mirror, channel,
                    kept, result, progress)
                keep = {channel.relpath(r) for r in kept}
                result.removed = stray_files(store, mirror, channel, keep, index_files)
            progress.log(f"{mirror.name}: dry run: {len(todo)} files to fetch, "
                         f"{len(result.removed)} to remove, {len(kept)} records to publish")
            return

        if todo:
            with result.timed("fetch"):
                await fetch_all(mirror, store, channel, transport, manifest, todo, result, progress)

        with result.timed("publish"), _collector_paused():
            publish = ([r for r in outcome.kept if channel.relpath(r) not in result.failed]
                       if result.failed else outcome.kept)
            publish = await _publish_usable(store, mirror, channel, publish, result, progress)
            store.write_state(mirror.name, "index-cache.json", channel.state(store.mirror_dir(mirror.name)),
                              indent=False)

        if clean:
            with result.timed("clean"):
                keep = {channel.relpath(r) for r in publish}
                for relpath in stray_files(store, mirror, channel, keep):
                    store.remove(store.mirror_dir(mirror.name) / relpath)
                    manifest.discard(relpath)
                    result.removed.append(relpath)
        with result.timed("record"):
            manifest.save()
            report = build_report(mirror, outcome, result, channel, started=started, finished=_now())
            store.write_state(mirror.name, "report.json", report)
            if outcome.dependencies is not None:
                store.write_state(mirror.name, "dependencies.json", report["dependencies"])


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a block builds or walks the index: it makes hundreds
    of thousands of objects that live on (a collection would walk them all again, over and over,
    for about 0.5 s at conda-forge scale) and next to no cycles. Downloads run with it on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# How many records no client could read (UnusableRecord) a run leaves out, making the index
# again each time, before it gives up and fails with the last one's message.
MAX_UNUSABLE = 10


async def _leaving_out_unusable(render: Callable[[list[Any]], T], mirror: MirrorConfig,
                                channel: Any, publish: list[Any], result: RunResult,
                                progress: Progress) -> tuple[list[Any], T]:
    """``render(publish)`` on a thread, less any record it finds unusable while that record's shard
    is encoded: such a record fails alone, as a file that could not be fetched does (the run
    exits 1 and names it), and ``render`` runs again without it. The records it last ran with,
    and what it returned.

    Finding one costs a second rendering, but costs nothing when there is none: checking every
    record beforehand would mean decoding each in full, which the metadata path avoids (see
    README, Performance). Past MAX_UNUSABLE such records, the last one's error is raised."""
    left_out = 0
    while True:
        try:
            return publish, await asyncio.to_thread(render, publish)
        except UnusableRecord as exc:
            key = exc.key
            if key is None or key in result.failed or left_out == MAX_UNUSABLE:
                raise
            left_out += 1
            result.failed[key] = f"cannot be published: {exc.reason}"
            progress.log(f"{mirror.name}: {'would fail' if result.dry_run else 'failed'}: {key}: "
                         f"{result.failed[key]}")
            publish = [r for r in publish if channel.relpath(r) != key]


async def _publish_usable(store: Store, mirror: MirrorConfig, channel: Any, publish: list[Any],
                          result: RunResult, progress: Progress) -> list[Any]:
    """:func:`_publish`, less any record no client could read (:func:`_leaving_out_unusable`): the
    records published. A failed rendering leaves the published index as it was."""
    published, _ = await _leaving_out_unusable(
        lambda records: _publish(store, mirror, channel, records, result), mirror, channel, publish,
        result, progress)
    return published


def _publish(store: Store, mirror: MirrorConfig, channel: Any, publish: list[Any], result: RunResult) -> None:
    """Write the index files, then publish them in the order the channel gives (Rendering).

    New shards are made and published by a second thread (their encoding runs in worker
    processes, their file creates and the filesystem sync outside the GIL) while this one writes
    repodata.json, its .zst and channeldata.json under temporary names, and a third starts
    flushing those to disk. Nothing else is renamed until every new shard is durable under its
    name; then the rest go in their order, by one group commit. An error anywhere leaves every
    published file as it was, or the new shards only, and no temporary file behind."""
    state = store.read_state(mirror.name, "index-cache.json")
    mirror_dir = store.mirror_dir(mirror.name)
    prefix = store.temp_prefix()
    rendering = channel.render(publish, mirror_dir, state, temp_prefix=prefix)
    stop = threading.Event()

    def new_groups() -> Iterator[list[tuple[Temp | None, Path]]]:
        group: list[tuple[Temp | None, Path]] = []
        try:
            for item in rendering.new:
                if stop.is_set():
                    raise _Stopped()
                final = store.resolve(mirror.name, item.relpath)
                if item.staged is not None:
                    group.append((item.staged, final))
                else:
                    group += store.stage_batch([(final, item.data)])
                if len(group) >= COMMIT_GROUP:
                    yield group
                    group = []
        except BaseException:
            store.discard_temps(group)
            raise
        if group:
            yield group

    def new_files() -> int:
        try:
            return store.publish_groups(new_groups())
        except BaseException:
            # Shards a worker wrote whose digests never came back are known by the prefix only;
            # closing the rendering first stops its workers, so none writes after the sweep.
            close = getattr(rendering.new, "close", None)
            if close is not None:
                close()
            for directory in rendering.temp_dirs:
                store.discard_prefixed(directory, prefix)
            raise

    staged: list[tuple[Any, list[tuple[Path, Path]]]] = []
    flushes: list[concurrent.futures.Future[None]] = []
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mirrorgen-publish") as pool:
        shards = pool.submit(new_files)
        try:
            for index_file in rendering.files:
                if index_file.after_new:
                    staged.append((index_file, []))
                    continue
                pairs = _stage(store, mirror, index_file)
                staged.append((index_file, pairs))
                # Written back while the rest is made: the commit's sync has less left to do.
                flushes += [pool.submit(fsync_path, tmp) for tmp, _ in pairs]
            result.index_files += shards.result()
            for i, (index_file, pairs) in enumerate(staged):
                if index_file.after_new:
                    staged[i] = (index_file, _stage(store, mirror, index_file))
            for flush in flushes:
                flush.result()
            temps = [pair for _, pairs in staged for pair in pairs]
            store.publish_temps(temps)
            result.index_files += len(temps)
        except BaseException:
            stop.set()
            futures: list[concurrent.futures.Future[Any]] = [shards, *flushes]
            for future in futures:
                with contextlib.suppress(BaseException):
                    future.result()
            for _, pairs in staged:
                store.discard_temps(pairs)
            raise


class _Stopped(Exception):
    """The shard thread is told to stop: the run failed elsewhere."""


def _stage(store: Store, mirror: MirrorConfig, index_file: Any) -> list[tuple[Path, Path]]:
    path = store.resolve(mirror.name, index_file.relpath)
    data = index_file.data() if index_file.after_new else index_file.data
    if index_file.zst_twin:
        return store.stage_with_zst(path, data.chunks(), data.size)
    return [store.stage(path, data)]


def _empty_result(mirror: MirrorConfig, outcome: FilterOutcome) -> ConfigError:
    counts = outcome.counts()
    culprit = max(counts, key=counts.__getitem__) if counts else None
    key = culprit or ""  # a filter's name is its key, but for the date window's two
    if key == "dates":
        key = "date_from" if "date_from" in mirror.filters.keys else "date_to"
    why = f" ('{culprit}' removed {counts[culprit]} of {outcome.total})" if culprit else ""
    # Named as the configuration's own errors are: by the key as written, where it was written.
    return ConfigError(f"the filters leave nothing to mirror{why}", file=mirror.file,
                       line=mirror.filters.lines.get(key, mirror.line),
                       key=mirror.filters.keys.get(key, mirror.name))


def stray_files(store: Store, mirror: MirrorConfig, channel: Any, keep: set[str],
                index_files: set[str] | None = None) -> list[str]:
    """Files in the mirror's tree that the index no longer lists: package files (not in
    ``keep``), shards (not in ``index_files``, by default those the published index files
    reference), and temporary files left by a killed run."""
    base = store.mirror_dir(mirror.name)
    if not base.is_dir():
        return []
    if index_files is None:
        index_files = channel.published_index_files(base)
    out = []
    for path in sorted(base.rglob("*")):
        if not path.is_file():
            continue
        relpath = path.relative_to(base).as_posix()
        if path.name.startswith(".mirrorgen-tmp-"):
            out.append(relpath)
        elif channel.is_package_path(relpath) and relpath not in keep:
            out.append(relpath)
        elif "/shards/" in relpath and relpath not in index_files:
            out.append(relpath)
    return out
