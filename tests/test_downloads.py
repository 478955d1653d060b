"""Package downloads: fetched by the download threads, verified, published by group commit.

What must hold whatever happens: nothing partial or unverified under a final name; a file is in the
manifest only once it is durable under its final name; a killed run leaves at most temporary files,
and the next run neither fetches again what was committed nor trusts what was not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiohttp import web

import mirrorgen.direct as direct_module
import mirrorgen.sink as sink_module
from mirrorgen.errors import SizeMismatch, UpstreamError
from mirrorgen.direct import is_direct
from mirrorgen.manifest import Manifest
from mirrorgen.store import Store
from mirrorgen.tempfiles import TEMP_PREFIX, unnamed_temps
from mirrorgen.sync import sync_mirror
from mirrorgen.sink import BUFFER
from mirrorgen.transport import FetchRequest, GroupCommit, Staged, Transport
from mirrorgen.verify import verify_mirror


def packages(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.name.endswith((".conda", ".tar.bz2")) and not p.name.startswith(TEMP_PREFIX)}


def temps(root: Path) -> list[str]:
    """Staged files not published: under temporary names in ``root``, and unnamed ones (O_TMPFILE)
    this process holds."""
    return [*(p.as_posix() for p in root.rglob(f"{TEMP_PREFIX}*")), *["(unnamed)"] * unnamed_temps()]


def journal(config) -> list[str]:  # type: ignore[no-untyped-def]
    path = config.root / ".mirrorgen" / "conda-demo" / "manifest.journal"
    return [orjson.loads(line)[1] for line in path.read_bytes().splitlines()] if path.exists() else []


async def killed_sync(config, when: str, *, anonymous: bool = True) -> int:  # type: ignore[no-untyped-def]
    """``mirrorgen sync`` in a subprocess that SIGKILLs itself at the first group commit of
    package files:
    ``before`` it makes anything durable or renames it, or ``after`` the renames but before the
    manifest records the batch. The test's loop keeps serving the upstream meanwhile.
    ``anonymous`` False: no O_TMPFILE files, every download under a temporary name."""
    code = f"""
import os, signal, sys
import mirrorgen.tempfiles
from mirrorgen.store import Store
if not {anonymous!r}:
    mirrorgen.tempfiles.ANONYMOUS.limit = 0
original = Store.publish_temps
def publish_temps(self, items):
    if not any(str(final).endswith((".conda", ".tar.bz2")) for _, final in items):
        return original(self, items)  # state files: not the group commit of downloads
    if {when!r} == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, items)
    os.kill(os.getpid(), signal.SIGKILL)
Store.publish_temps = publish_temps
from mirrorgen.cli import main
sys.exit(main(["sync", "-c", {str(config.path)!r}, "--quiet"]))
"""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 120)


def package_requests(upstream, since: int) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.split("/demo/", 1)[1] for r in upstream.control.requests[since:]
            if r.endswith((".conda", ".tar.bz2"))]


@pytest.mark.parametrize("anonymous", [True, False], ids=["O_TMPFILE", "named-temps"])
async def test_a_run_killed_between_download_and_commit_publishes_and_records_nothing(
        upstream, write_config, anonymous: bool) -> None:
    config = write_config(upstream.channel_url)
    assert await killed_sync(config, "before", anonymous=anonymous) == -9
    mirror = config.root / "conda-demo"
    # Downloaded and verified, but never committed: unnamed files (gone with the process), or
    # under temporary names only; unrecorded either way.
    assert packages(mirror) == set()
    assert bool(temps(mirror)) is not anonymous
    assert journal(config) == []

    before = len(upstream.control.requests)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    # The temporary files were not trusted: every file fetched again; and they are gone.
    assert (result.downloaded, result.reused, result.rehashed, result.failed) == (8, 0, 0, {})
    assert len(package_requests(upstream, before)) == 8
    assert temps(mirror) == [] and temps(config.root / ".mirrorgen") == []
    assert (await verify_mirror(config.mirrors[0], Store(config.root))).failed is False


@pytest.mark.parametrize("tag", ["deadbeef", "", "../x"], ids=["tag", "no-tag", "bad-tag"])
async def test_the_run_after_a_killed_one_removes_the_temporary_files_it_left_and_no_others(
        upstream, write_config, tag: str) -> None:
    config = write_config(upstream.channel_url)
    store = Store(config.root)
    assert not (await sync_mirror(config, config.mirrors[0], store, progress=False)).failed
    mirror, state = config.root / "conda-demo", config.root / ".mirrorgen" / "conda-demo"
    # What a run tagged "deadbeef" leaves when killed: a download under a temporary name, a
    # shard a worker wrote, a state file; and a file another process (a proxy) is writing.
    theirs = [mirror / "linux-64" / f"{TEMP_PREFIX}deadbeef5-a-1.0-0.conda",
              mirror / "linux-64" / "shards" / f"{TEMP_PREFIX}deadbeef3w-0a1b.msgpack.zst",
              state / f"{TEMP_PREFIX}deadbeef1-manifest.json"]
    other = mirror / "noarch" / f"{TEMP_PREFIX}0badcafe2-b-1.0-0.conda"
    for path in (*theirs, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    status = orjson.loads((state / "status.json").read_bytes())
    (state / "status.json").write_bytes(orjson.dumps({**status, "state": "running", "pid": 1, "temp_tag": tag}))

    assert not (await sync_mirror(config, config.mirrors[0], store, progress=False)).failed
    assert [p.exists() for p in theirs] == [tag != "deadbeef"] * len(theirs)
    assert other.exists()  # another process's: not the killed run's to remove
    assert orjson.loads((state / "status.json").read_bytes())["state"] == "completed"


async def test_a_run_killed_after_the_renames_but_before_recording_rehashes_instead_of_fetching(
        upstream, write_config) -> None:
    config = write_config(upstream.channel_url)
    assert await killed_sync(config, "after") == -9
    mirror = config.root / "conda-demo"
    committed = packages(mirror)
    assert committed and journal(config) == []
    for relpath in committed:  # whatever is under a final name is complete and upstream's
        assert (mirror / relpath).read_bytes() == (upstream.root / "demo" / relpath).read_bytes()

    before = len(upstream.control.requests)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.failed == {} and result.rehashed == len(committed)
    assert result.downloaded == 8 - len(committed)
    assert not set(package_requests(upstream, before)) & committed
    assert (await verify_mirror(config.mirrors[0], Store(config.root))).failed is False


async def test_package_files_come_over_kept_alive_connections(upstream, write_config) -> None:
    # One download thread, so one connection: a new one per file would cost a round trip each
    # (and a response whose small body arrives with its headers must not end its connection).
    config = write_config(upstream.channel_url, concurrency=1)
    result = await sync_mirror(config, config.mirrors[0], Store(config.root), progress=False)
    assert result.downloaded == 8 and not result.failed
    control = upstream.control
    ports = {peer for request, peer in zip(control.requests, control.peers)
             if request.endswith((".conda", ".tar.bz2"))}
    assert len(ports) == 1


async def test_a_file_failing_verification_leaves_the_rest_of_its_batch_committed(
        upstream, write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = f"linux-64/{upstream.files('linux-64')[0]}"
    upstream.control.corrupt.add(f"demo/{bad}")
    batches: list[int] = []
    original = Store.publish_temps

    def publish_temps(self: Store, items):  # type: ignore[no-untyped-def]
        # Package files only: new shards are published by the same group commit.
        files = [final for _, final in items if os.fspath(final).endswith((".conda", ".tar.bz2"))]
        if files:
            batches.append(len(files))
        original(self, items)

    monkeypatch.setattr(Store, "publish_temps", publish_temps)
    config = write_config(upstream.channel_url)
    store = Store(config.root)
    result = await sync_mirror(config, config.mirrors[0], store, progress=False)
    assert list(result.failed) == [bad] and "sha256 mismatch" in result.failed[bad]
    assert result.downloaded == 7
    # Group commit: the seven were published in fewer syncs than files, the bad one in none.
    assert sum(batches) == 7 and len(batches) < 7
    mirror = config.root / "conda-demo"
    assert bad not in packages(mirror) and len(packages(mirror)) == 7 and not temps(mirror)
    entries = Manifest(store, "conda-demo").load().entries
    assert set(entries) == packages(mirror)


# -- the download threads against a hand-made upstream ---------------------------------------

DIRECT_MIN = sink_module.DIRECT_MIN  # the threshold under test
BLOB = os.urandom(3 * (1 << 20) + 12345)   # larger than a thread's buffer: several reads
SMALL = os.urandom(70_000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sized(n: int) -> bytes:
    """``n`` bytes (what ``/sized/<n>`` serves)."""
    return (BLOB * (n // len(BLOB) + 1))[:n]


@pytest.fixture
async def odd_upstream(aiohttp_server):  # type: ignore[no-untyped-def]
    """An upstream that redirects, chunks, lies about sizes, cuts connections and stalls."""
    hits: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.StreamResponse:
        kind, name = request.match_info["kind"], request.match_info["name"]
        hits[request.path] += 1
        if request.transport is not None:
            hits[("peer", request.transport.get_extra_info("peername"))] += 1
        body = BLOB if name == "blob" else SMALL
        if kind == "sized":
            return web.Response(body=sized(int(name)))
        if kind == "plain":
            return web.Response(body=body)
        if kind == "redirect":
            raise web.HTTPFound(f"/plain/{name}")
        if kind == "redirect-loop":
            raise web.HTTPFound(f"/redirect-loop/{name}")
        if kind == "chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 100_000):
                await resp.write(body[i:i + 100_000])
            await resp.write_eof()
            return resp
        if kind == "long":
            return web.Response(body=body + b"tail")
        if kind in ("cut", "stall"):
            if kind == "stall" or hits[request.path] == 1:
                resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
                await resp.prepare(request)
                await resp.write(body[:len(body) // 2])
                if kind == "stall":
                    await asyncio.sleep(30)
                assert request.transport is not None
                request.transport.close()  # cut short: fewer bytes than Content-Length
                return resp
            return web.Response(body=body)
        if kind == "rude":
            # Keep-alive announced, then the connection closed anyway once the response is out.
            resp = web.Response(body=body)
            await resp.prepare(request)
            await resp.write_eof()
            assert request.transport is not None
            request.transport.close()
            return resp
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/{kind}/{name}", handler)
    app.router.add_get("/t/{token}/{kind}/{name}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), hits


async def fetch(url: str, tmp_path: Path, data: bytes, *, size: int | None = -1, retries: int = 2):  # type: ignore[no-untyped-def]
    store = Store(tmp_path / "root")
    final = tmp_path / "root" / "m" / "noarch" / "pkg-1.0-0.conda"
    async with Transport(retries=retries, backoff=0.01) as transport:
        verified = await transport.download(url, final, store, size=len(data) if size == -1 else size,
                                            sha256=sha(data), md5=None)
    return final, verified


@pytest.mark.parametrize("kind", ["plain", "redirect", "chunked"])
async def test_download_verifies_and_publishes(odd_upstream, tmp_path: Path, kind: str) -> None:
    base, _ = odd_upstream
    final, verified = await fetch(f"{base}/{kind}/blob", tmp_path, BLOB)
    assert final.read_bytes() == BLOB and verified.bytes_downloaded == len(BLOB)
    assert verified.entry.sha256 == sha(BLOB) and verified.entry.mtime_ns == final.stat().st_mtime_ns
    assert not temps(tmp_path)


def refuses_direct_writes(directory: Path) -> bool:
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError:
        return True
    os.close(fd)
    return False


@pytest.mark.parametrize("size", [10_000, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, 70_000, BUFFER,
                                  BUFFER + 4095, 2 * BUFFER, len(BLOB)])
async def test_a_large_download_goes_to_disk_direct_but_its_last_partial_block_through_the_cache(
        odd_upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    if refuses_direct_writes(tmp_path):
        pytest.skip(f"{tmp_path}: this filesystem takes no O_DIRECT writes")
    base, _ = odd_upstream
    writes: list[tuple[int, int, bool, bool]] = []

    def write_direct(fd: int, buf: memoryview, n: int, offset: int, *, last: bool) -> bool:
        writes.append((n, offset, last, is_direct(fd)))
        return direct_module.write_direct(fd, buf, n, offset, last=last)

    monkeypatch.setattr(sink_module, "write_direct", write_direct)
    truncated: list[int] = []  # a truncate inside a direct-written block reads it back from disk
    real_ftruncate = os.ftruncate
    monkeypatch.setattr(os, "ftruncate",
                        lambda fd, length: (truncated.append(length), real_ftruncate(fd, length)))
    data = sized(size)
    final, verified = await fetch(f"{base}/sized/{size}", tmp_path, data)
    assert final.read_bytes() == data and final.stat().st_size == size == verified.entry.size
    assert truncated == []
    assert verified.entry.sha256 == sha(data) and not temps(tmp_path)
    if size < DIRECT_MIN:
        assert writes == []  # small: through the page cache, a write per packet
        return
    # A whole buffer at a time, each at the end of what was written; the last one, unless the size
    # is a whole number of buffers, marked last: its whole blocks direct, the rest through the page
    # cache (the file read back whole, above).
    assert [(n, offset) for n, offset, _, _ in writes] == [
        (min(BUFFER, size - offset), offset) for offset in range(0, size, BUFFER)]
    assert [last for _, _, last, _ in writes] == [False] * (len(writes) - 1) + [size % BUFFER != 0]
    assert all(direct for *_, direct in writes)


async def test_a_filesystem_that_refuses_direct_writes_gets_plain_ones(
        odd_upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when the file is opened (remembered for its directory), or at the first write
    (that file goes on with plain writes): the download is whole either way."""
    base, _ = odd_upstream
    opened: list[bool] = []
    real_open = os.open

    def open_refusing_direct(path, flags, mode=0o777, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(bool(flags & os.O_DIRECT))
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", open_refusing_direct)
        for name in ("a", "b", "a"):
            final, _ = await fetch(f"{base}/plain/blob", tmp_path / name, BLOB)
            assert final.read_bytes() == BLOB and not temps(tmp_path)
            assert os.path.dirname(final) in direct_module.NO_DIRECT
    assert opened.count(True) == 2  # once per directory ("a" twice), then not tried there again

    if refuses_direct_writes(tmp_path):
        return
    refused: list[int] = []
    real_write_all = direct_module.write_all

    def write_all_refusing_direct(fd: int, view: memoryview) -> None:
        if is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write_all(fd, view)

    monkeypatch.setattr(direct_module, "write_all", write_all_refusing_direct)
    final, verified = await fetch(f"{base}/plain/blob", tmp_path / "c", BLOB)
    assert final.read_bytes() == BLOB and verified.entry.size == len(BLOB) and not temps(tmp_path)
    assert len(refused) == 1  # the first write; the rest went in plain


@pytest.mark.parametrize("kind", ["plain", "redirect", "chunked"])
async def test_index_files_are_read_whole_and_probed_with_head_on_one_kept_alive_connection(
        odd_upstream, kind: str) -> None:
    base, hits = odd_upstream
    async with Transport(retries=1, backoff=0.01, concurrency=1) as transport:
        assert await transport.get(f"{base}/{kind}/blob") == BLOB
        assert await transport.exists(f"{base}/{kind}/small")
        assert not await transport.exists(f"{base}/missing/small")
        assert await transport.get(f"{base}/missing/small") is None  # 404: not there, not an error
        assert await transport.get(f"{base}/{kind}/small") == SMALL
    # A HEAD's answer has no body whatever its Content-Length says: the connection carried on.
    # (aiohttp's server closes the connection when a handler streams a body in answer to a HEAD.)
    if kind != "chunked":
        assert sum(1 for key in hits if isinstance(key, tuple)) == 1


async def test_an_index_file_cut_short_is_retried_and_one_too_large_is_refused(odd_upstream) -> None:
    base, hits = odd_upstream
    async with Transport(retries=2, backoff=0.01) as transport:
        assert await transport.get(f"{base}/cut/blob") == BLOB
        assert hits["/cut/blob"] == 2
        for kind in ("plain", "chunked"):  # a Content-Length says so at once; chunks as they come
            with pytest.raises(UpstreamError, match="larger than 1000 bytes"):
                await transport.get(f"{base}/{kind}/blob", limit=1000)
        with pytest.raises(UpstreamError, match="redirects"):
            await transport.get(f"{base}/redirect-loop/small")
        assert await transport.get(f"{base}/plain/small", limit=len(SMALL)) == SMALL


async def test_a_body_longer_than_the_index_says_is_refused_and_not_retried(odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    with pytest.raises(SizeMismatch, match=f"expected {len(BLOB)} bytes"):
        await fetch(f"{base}/long/blob", tmp_path, BLOB)
    assert hits["/long/blob"] == 1
    # Without a size in the index, the hash catches it.
    with pytest.raises(Exception, match="sha256 mismatch"):
        await fetch(f"{base}/long/small", tmp_path, SMALL, size=None)
    assert not temps(tmp_path) and not (tmp_path / "root" / "m" / "noarch" / "pkg-1.0-0.conda").exists()


async def test_a_connection_cut_mid_body_is_retried(odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    final, _ = await fetch(f"{base}/cut/blob", tmp_path, BLOB)
    assert final.read_bytes() == BLOB and hits["/cut/blob"] == 2 and not temps(tmp_path)


async def test_connections_closed_by_upstream_between_requests_are_reopened(odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    store = Store(tmp_path / "root")
    async with Transport(retries=0, concurrency=1) as transport:
        for i in range(5):
            final = tmp_path / "root" / "m" / f"pkg-{i}.conda"
            await transport.download(f"{base}/rude/small", final, store, size=len(SMALL),
                                     sha256=sha(SMALL), md5=None)
            assert final.read_bytes() == SMALL
    assert hits["/rude/small"] == 5


async def test_http_errors_name_the_url_without_its_token(odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    with pytest.raises(UpstreamError) as info:
        await fetch(f"{base}/t/SECRET-42/missing/small", tmp_path, SMALL)
    assert "HTTP 404" in str(info.value) and "SECRET-42" not in str(info.value) and "<TOKEN>" in str(info.value)
    assert hits["/t/SECRET-42/missing/small"] == 1  # not retried
    with pytest.raises(UpstreamError, match="redirects"):
        await fetch(f"{base}/redirect-loop/small", tmp_path, SMALL)
    assert not temps(tmp_path)


async def test_a_cancelled_download_leaves_no_file(odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    store = Store(tmp_path / "root")
    final = tmp_path / "root" / "m" / "pkg.conda"
    async with Transport() as transport:
        task = asyncio.ensure_future(transport.fetch(f"{base}/stall/blob", final, store, size=len(BLOB),
                                                     sha256=sha(BLOB), md5=None))
        for _ in range(200):
            if temps(tmp_path):
                break
            await asyncio.sleep(0.02)
        assert temps(tmp_path)  # receiving
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Leaving the transport waits for its threads, which remove what they were writing.
    assert not temps(tmp_path) and not final.exists()


async def test_group_commit_left_with_an_error_removes_what_it_had_not_published(
        odd_upstream, tmp_path: Path) -> None:
    base, _ = odd_upstream
    store = Store(tmp_path / "root")
    published: list[str] = []
    async with Transport() as transport:
        staged = [await transport.fetch(f"{base}/plain/small", tmp_path / "root" / "m" / f"p{i}.conda", store,
                                        size=len(SMALL), sha256=sha(SMALL), md5=None) for i in range(3)]
        assert len(temps(tmp_path)) == 3
        with pytest.raises(RuntimeError, match="boom"):
            async with GroupCommit(store, lambda batch: published.extend(k for k, _ in batch),
                                   max_delay=60) as commits:
                for i, item in enumerate(staged):
                    commits.add(f"p{i}", item)
                raise RuntimeError("boom")
    assert published == [] and not temps(tmp_path) and not list((tmp_path / "root" / "m").glob("p*.conda"))

    # Left normally, it publishes what is waiting, then records it.
    async with Transport() as transport:
        item = await transport.fetch(f"{base}/plain/small", tmp_path / "root" / "m" / "q.conda", store,
                                     size=len(SMALL), sha256=sha(SMALL), md5=None)
        async with GroupCommit(store, lambda batch: published.extend(k for k, _ in batch),
                               max_delay=60) as commits:
            commits.add("q", item)
            assert published == []
    assert published == ["q"] and (tmp_path / "root" / "m" / "q.conda").read_bytes() == SMALL
    assert not temps(tmp_path)


async def test_fetch_many_hands_over_every_outcome_and_a_bad_file_does_not_stop_the_rest(
        odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    store = Store(tmp_path / "root")
    requests = [FetchRequest(i, f"{base}/plain/small", tmp_path / "root" / "m" / f"p{i}.conda",
                             len(SMALL), sha(SMALL), None) for i in range(20)]
    requests.append(FetchRequest("bad", f"{base}/missing/small", tmp_path / "root" / "m" / "bad.conda",
                                 len(SMALL), sha(SMALL), None))
    requests.append(FetchRequest("cut", f"{base}/cut/blob", tmp_path / "root" / "m" / "cut.conda",
                                 len(BLOB), sha(BLOB), None))
    async with Transport(concurrency=3, retries=2, backoff=0.01) as transport:
        outcomes = {request.key: outcome async for request, outcome in transport.fetch_many(requests, store)}
    assert set(outcomes) == {*range(20), "bad", "cut"}
    assert isinstance(outcomes.pop("bad"), UpstreamError)
    assert hits["/cut/blob"] == 2  # cut mid-body once, then fetched whole
    for staged in outcomes.values():
        assert isinstance(staged, Staged) and staged.tmp is not None and staged.tmp.read_bytes() in (SMALL, BLOB)
        staged.discard()
    assert not temps(tmp_path)


async def test_fetch_many_left_early_stops_its_threads_and_leaves_no_file(odd_upstream, tmp_path: Path) -> None:
    base, hits = odd_upstream
    store = Store(tmp_path / "root")
    requests = [FetchRequest(i, f"{base}/plain/small", tmp_path / "root" / "m" / f"p{i}.conda",
                             len(SMALL), sha(SMALL), None) for i in range(2000)]
    async with Transport(concurrency=4) as transport:
        async with contextlib.aclosing(transport.fetch_many(requests, store)) as outcomes:
            async for _, staged in outcomes:
                assert isinstance(staged, Staged)
                staged.discard()
                break
        await asyncio.sleep(0.2)  # requests sent before the stop may still reach the server
        fetched = hits["/plain/small"]
        await asyncio.sleep(0.3)
        assert hits["/plain/small"] == fetched  # nothing more was asked for
    assert fetched < 100
    assert not temps(tmp_path)


async def test_a_disk_error_in_a_download_thread_ends_the_run_at_once(
        odd_upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, hits = odd_upstream
    store = Store(tmp_path / "root")

    def full(self: Store, final: Path, **_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "open_temp", full)
    requests = [FetchRequest(i, f"{base}/plain/small", tmp_path / "root" / "m" / f"p{i}.conda",
                             len(SMALL), sha(SMALL), None) for i in range(500)]
    async with Transport(concurrency=2) as transport:
        with pytest.raises(OSError, match="No space"):
            async for _ in transport.fetch_many(requests, store):
                pass
    assert hits["/plain/small"] < 50
