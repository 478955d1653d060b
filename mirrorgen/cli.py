"""The ``mirrorgen`` command (SPEC §2). Exit status: 0 done, 1 a run finished with failures,
2 bad usage or configuration (one line naming file, line and key; never a traceback)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import __version__
from .config import Config, load_config
from .errors import ConfigError, MirrorError, UsageError, describe_os_error
from .store import Store

__all__ = ["main"]

_NOT_YET = ("schedule", "export", "import", "proxy")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default="mirrorgen.yaml", help="configuration file (default: %(default)s)")
    common.add_argument("--mirror", action="append", default=[], metavar="NAME",
                        help="only this mirror (repeatable; default: all)")
    parser = argparse.ArgumentParser(prog="mirrorgen", description="Static, verified package mirrors.")
    parser.add_argument("--version", action="version", version=f"mirrorgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sync", parents=[common], help="fetch, filter, verify and publish")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument("--clean", action="store_true", help="also remove files that no longer belong")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("clean", parents=[common], help="remove files the index no longer lists")
    p.add_argument("--dry-run", action="store_true", help="list them; remove nothing")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("verify", parents=[common], help="re-check every file against the index")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("report", parents=[common], help="what the last run kept and excluded")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dependencies", nargs="?", const="-", metavar="FILE",
                   help="write the dependency report (to FILE, or stdout)")

    p = sub.add_parser("status", parents=[common], help="state of each mirror")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("nginx", parents=[common], help="print an nginx server block for this config")
    p.add_argument("--listen", default="8080", help="nginx listen address (default: %(default)s)")
    p.add_argument("--server-name", default="_")
    p.add_argument("--proxy", default="127.0.0.1:8080", help="where `mirrorgen proxy` listens")

    p = sub.add_parser("demo", help="mirror a bundled upstream and serve it (no network, no config)")
    p.add_argument("--dir", default=None, help="working directory (default: a new temporary one)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--no-serve", action="store_true", help="build and mirror, then exit")

    for name in _NOT_YET:
        p = sub.add_parser(name, parents=[common], help="not implemented yet")
        p.add_argument("args", nargs="*")
        p.add_argument("--to", "--since", "--host", "--port", dest="_ignored", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except MirrorError as exc:
        print(f"mirrorgen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine's, not the user's: a full disk, a read-only tree, ...
        print(f"mirrorgen: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mirrorgen: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``mirrorgen`` command: :func:`main`, then out without tearing the interpreter down.
    After a sync of conda-forge's size the heap holds millions of objects, and freeing them one
    by one at exit took about 0.2 s, with nothing left to do: every file is closed and synced,
    worker processes and threads are finished. Output streams and logging are flushed first."""
    code = main()
    try:
        if "logging" in sys.modules:  # a library may have set up handlers
            sys.modules["logging"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a closed or broken pipe: exit the ordinary way, which reports it
        sys.exit(code)
    os._exit(code)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    # Outside the try: an ImportError raised inside the run is the run's, not a missing uvloop
    # (taken for one, it ran the coroutine a second time: "cannot reuse already awaited coroutine").
    return uvloop.run(coro)


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in _NOT_YET:
        raise UsageError(f"'{args.command}': not implemented yet")
    if args.command == "demo":
        from .demo.run import run_demo

        return run_demo(workdir=Path(args.dir) if args.dir else None, host=args.host, port=args.port,
                        serve=not args.no_serve)
    config = load_config(args.config)
    if not config.mirrors:
        if args.command in ("verify", "status", "report"):
            # SPEC §3: a configuration may give only root (the far side of an air gap); these
            # commands then work on every mirror the tree holds.
            from .status import mirrors_in_tree

            config = dataclasses.replace(config, mirrors=mirrors_in_tree(Store(config.root), str(config.path)))
        elif args.command in ("sync", "clean"):
            raise ConfigError(f"no mirrors to {args.command} (add entries under mirrors)",
                              file=str(config.path), key="mirrors")
    mirrors = config.select(args.mirror)
    store = Store(config.root)
    command: Callable[..., int] = globals()[f"_cmd_{args.command}"]
    return command(args, config, mirrors, store)


def _cmd_sync(args: argparse.Namespace, config: Config, mirrors: Any, store: Store) -> int:
    from .sync import sync_mirror

    results, code = [], 0
    for mirror in mirrors:
        try:
            result = _run(sync_mirror(config, mirror, store, dry_run=args.dry_run, clean=args.clean,
                                      progress=not (args.quiet or args.json)))
        except MirrorError as exc:
            if len(mirrors) == 1:
                raise
            # One mirror's failure, or a filter that leaves it empty (exit 2), is that mirror's:
            # the others still sync, and the exit code is the worst of them.
            print(f"mirrorgen: error: {mirror.name}: {exc}", file=sys.stderr)
            results.append({"mirror": mirror.name, "state": "failed", "error": str(exc)})
            code = max(code, exc.exit_code)
            continue
        results.append(result.to_json())
        if result.failed:
            code = 1
        if not args.json:
            _summarise(result)
    if args.json:
        _print_json({"mirrors": results})
    return code


def _summarise(result: Any) -> None:
    if result.dry_run:
        print(f"{result.mirror}: dry run: {result.kept - len(result.failed)} of {result.upstream} records "
              f"would be published; {len(result.would_download)} files to fetch; {len(result.removed)} to remove")
        for relpath in result.would_download[:50]:
            print(f"  fetch {relpath}")
        for relpath in result.removed[:50]:
            print(f"  remove {relpath}")
        for relpath, why in sorted(result.failed.items()):
            print(f"  WOULD FAIL {relpath}: {why}", file=sys.stderr)
        return
    print(f"{result.mirror}: {result.state}: {result.kept - len(result.failed)} of {result.upstream} records "
          f"published; {result.downloaded} downloaded ({result.bytes_downloaded} bytes), "
          f"{result.reused + result.rehashed} already verified"
          + (f", {len(result.removed)} removed" if result.removed else ""))
    for relpath, why in sorted(result.failed.items()):
        print(f"  FAILED {relpath}: {why}", file=sys.stderr)


def _cmd_clean(args: argparse.Namespace, config: Config, mirrors: Any, store: Store) -> int:
    from .clean import clean_mirror

    out = {}
    for mirror in mirrors:
        removed = clean_mirror(mirror, store, dry_run=args.dry_run)
        out[mirror.name] = removed
        if not args.json:
            verb = "would remove" if args.dry_run else "removed"
            print(f"{mirror.name}: {verb} {len(removed)} files")
            for relpath in removed:
                print(f"  {relpath}")
    if args.json:
        _print_json({"dry_run": args.dry_run, "mirrors": out})
    return 0


def _cmd_verify(args: argparse.Namespace, config: Config, mirrors: Any, store: Store) -> int:
    from .sync import channel_for
    from .verify import verify_mirror

    results, code = [], 0
    for mirror in mirrors:
        channel_for(mirror)  # not-implemented types fail before any work
        result = _run(verify_mirror(mirror, store))
        results.append(result.to_json())
        code = max(code, 1 if result.failed else 0)
        if not args.json:
            print(f"{mirror.name}: {result.ok}/{result.checked} files verified"
                  + (f", {result.not_fetched} not fetched yet (passive)" if result.not_fetched else "")
                  + f"; {len(result.missing)} missing, {len(result.corrupt)} corrupt, {len(result.stray)} stray")
            for relpath in result.missing:
                print(f"  MISSING {relpath}")
            for relpath, why in result.corrupt.items():
                print(f"  CORRUPT {relpath}: {why}")
            for relpath in result.stray:
                print(f"  stray {relpath}")
    if args.json:
        _print_json({"mirrors": results})
    return code


def _cmd_report(args: argparse.Namespace, config: Config, mirrors: Any, store: Store) -> int:
    from .report import render_text

    reports = {}
    for mirror in mirrors:
        report = store.read_state(mirror.name, "report.json")
        if report is None:
            raise UsageError(f"mirror {mirror.name!r} has no completed run yet (run `mirrorgen sync`)")
        reports[mirror.name] = report
    if args.dependencies:
        doc = {name: r.get("dependencies") for name, r in reports.items()}
        missing = [n for n, d in doc.items() if d is None]
        if missing:
            raise UsageError(f"mirror {missing[0]!r} has no dependency report "
                             "(set filters.include_dependencies: true and sync)")
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        if args.dependencies == "-":
            sys.stdout.write(data.decode() + "\n")
        else:
            Path(args.dependencies).write_bytes(data + b"\n")
        return 0
    if args.json:
        _print_json(reports)
    else:
        print("\n\n".join(render_text(r) for r in reports.values()))
    return 0


def _cmd_status(args: argparse.Namespace, config: Config, mirrors: Any, store: Store) -> int:
    from .status import mirror_status

    rows = [mirror_status(m, store) for m in mirrors]
    if args.json:
        _print_json({"mirrors": rows})
        return 0
    for row in rows:
        counts = row.get("counts") or {}
        print(f"{row['mirror']}: {row['state']}; last start {row.get('last_start') or '-'}, "
              f"last end {row.get('last_end') or '-'}; kept {counts.get('kept', '-')}, "
              f"failed {counts.get('failed', '-')}; next run {row.get('next_run') or '-'}"
              + (f"; error: {row['error']}" if row.get("error") else ""))
    return 0


def _cmd_nginx(args: argparse.Namespace, config: Config, mirrors: Any, store: Store) -> int:
    from .nginx import render_server_block

    sys.stdout.write(render_server_block(config, listen=args.listen, server_name=args.server_name,
                                         proxy=args.proxy))
    return 0


if __name__ == "__main__":  # pragma: no cover
    entry()
