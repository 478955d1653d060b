"""The project's exceptions.

Every error a user can cause or meet derives from :class:`MirrorError` *and* from the builtin it
resembles, carries its facts as attributes, and renders a one-line message a user can act on.
The CLI maps them to exit codes (2 for usage and configuration, 1 for a run with failures); none of
them is ever shown as a traceback.
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Final

__all__ = [
    "MirrorError",
    "ConfigError",
    "UsageError",
    "UpstreamError",
    "RepodataError",
    "UnusableRecord",
    "ChecksumMismatch",
    "SizeMismatch",
    "UnsafePath",
    "LockedError",
    "describe_os_error",
    "naming",
    "one_line",
    "shown",
]

_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Short(reprlib.Repr):
    """reprlib, also for subclasses of list and dict (the configuration's LocatedList and
    LocatedDict): reprlib picks its method by type name, and for an unknown one falls back to the
    full builtin repr, which an alias bomb makes a billion items long."""

    def repr1(self, x: object, level: int) -> str:
        if isinstance(x, list) and type(x) is not list:
            return self.repr_list(x, level)
        if isinstance(x, dict) and type(x) is not dict:
            return self.repr_dict(x, level)
        return super().repr1(x, level)


_REPR: Final = _Short()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 80, 80, 4, 4


def shown(value: object) -> str:
    """A value from outside (a configuration's, an upstream's) as a message shows it: its repr,
    cut short, on one line. Never slow and never failing, whatever it is: a number of 5,000 digits
    (whose repr raises), a list an alias bomb nests a billion times. A URL's credentials and
    token are hidden (mirrorgen.urls.redact)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return "a number too large to show"
    if isinstance(value, str):  # a URL with a token or a password, pasted where it does not belong
        from .urls import redact

        value = redact(value)
    try:
        text = _REPR.repr(value)
    except ValueError:  # a large integer inside a list
        text = f"a {type(value).__name__}"
    return one_line(text, 100)


def one_line(text: str, limit: int = 300) -> str:
    """Text from outside (an upstream's file name) as a message may show it: on one line, its
    control characters escaped (``\\n``, ``\\x00``), at most ``limit`` characters of it."""
    cut = text[:limit]
    return _CONTROL_RE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), cut)


def naming(exc: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """``exc``, or if it is an OSError that names no file (a failed write: a full disk), the
    same error naming ``path``, so that its one-line message says where."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror, os.fspath(path))
    return exc


def describe_os_error(exc: OSError) -> str:
    """An error of the machine's, not the user's (a full disk, a read-only tree) in one line:
    ``[Errno 28] No space left on device: '/x'`` reads ``No space left on device: /x``."""
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


class MirrorError(Exception):
    """Base class of every error mirrorgen reports to a user."""

    exit_code: int = 1


class ConfigError(MirrorError, ValueError):
    """The configuration file is unreadable or invalid: names the file, the line and the key."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file, self.line, self.key, self.detail = file, line, key, message
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        # One line, whatever the file held: a key or value with a newline is shown escaped.
        super().__init__(one_line(f"{where}: {key}: {message}" if key else f"{where}: {message}", 2000))


class UsageError(MirrorError, ValueError):
    """The command line asks for something that cannot be done."""

    exit_code = 2


class UpstreamError(MirrorError, ConnectionError):
    """Upstream could not be reached, or answered with an error, after all retries."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"{url}: {reason}")


class RepodataError(MirrorError, ValueError):
    """An upstream index could be fetched but is not a valid index."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"{url}: malformed index: {reason}")


class UnusableRecord(MirrorError, ValueError):
    """A record upstream lists that cannot be published as it is (not valid JSON to every
    client). The run leaves it out and makes the index again (mirrorgen.sync); past a few such
    records it fails instead, and the message says how to mirror the rest. ``subdir`` is set by
    the code that knows which subdir's index was being made."""

    def __init__(self, fn: str, reason: str, subdir: str | None = None) -> None:
        self.fn, self.reason, self.subdir = fn, reason, subdir
        super().__init__(f"upstream's record {one_line(fn)} cannot be published: {reason} "
                         "(exclude that package to mirror the rest)")

    @property
    def key(self) -> str | None:
        """The record's key (``<subdir>/<fn>``), once its subdir is known."""
        return None if self.subdir is None else f"{self.subdir}/{self.fn}"


class ChecksumMismatch(MirrorError, ValueError):
    """A downloaded file's hash differs from the one upstream's index published."""

    def __init__(self, url: str, algorithm: str, expected: str, got: str) -> None:
        self.url, self.algorithm, self.expected, self.got = url, algorithm, expected, got
        super().__init__(f"{url}: {algorithm} mismatch: expected {expected}, got {got}")


class SizeMismatch(MirrorError, ValueError):
    """A downloaded file's size differs from the one upstream's index published."""

    def __init__(self, url: str, expected: int, got: int) -> None:
        self.url, self.expected, self.got = url, expected, got
        super().__init__(f"{url}: size mismatch: expected {expected} bytes, got {got}")


class UnsafePath(MirrorError, ValueError):
    """A file name from upstream would land outside the mirror tree, or is not a plain name."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"refusing unsafe path {path!r}: {reason}")


class LockedError(MirrorError, RuntimeError):
    """Another run of the same mirror holds its lock."""

    def __init__(self, mirror: str, holder: str) -> None:
        self.mirror, self.holder = mirror, holder
        super().__init__(f"mirror {mirror!r} is already being synced ({holder})")
