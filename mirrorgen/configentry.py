"""Reading one mapping of the configuration file, with every error naming the file, line and
key (:class:`MirrorEntry`); shared by mirrorgen.config and mirrorgen.filterconfig."""

from __future__ import annotations

from typing import Any, Final

from .errors import ConfigError, shown
from .urls import redact
from .yamlnodes import LocatedDict, LocatedList

__all__ = ["MirrorEntry", "join_key", "yaml_kind"]


def join_key(prefix: str, key: str) -> str:
    # A key is user text: a URL pasted where a key belongs must not leak its token.
    return f"{prefix}.{redact(key)}" if prefix else redact(key)


def yaml_kind(value: Any) -> str:
    """What a YAML value is, in YAML's words (never our internal class names)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "nothing"
    return type(value).__name__


_NO_MAXIMUM: Final = (1 << 63) - 1  # what a file size or a count can be at most anyway


class MirrorEntry:
    """Reads one mirror mapping, remembering which keys were consumed and where they were."""

    def __init__(self, data: LocatedDict, prefix: str, file: str) -> None:
        self.data, self.prefix, self.file = data, prefix, file

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.data.line_of(key),
                           key=join_key(self.prefix, key))

    def one_of(self, *keys: str) -> str | None:
        """Which of several spellings of one setting the entry uses (None: none); two is an error,
        not a silent choice of one."""
        present = sorted((k for k in keys if k in self.data), key=self.data.line_of)
        if len(present) > 1:  # named where the second spelling is written
            raise self.err(present[1], f"give only one of {' / '.join(keys)}")
        return present[0] if present else None

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.err(key, f"expected a string, got {yaml_kind(value)}")
        return value

    def strings(self, key: str, *, data: LocatedDict | None = None, prefix: str | None = None
                ) -> tuple[str, ...] | None:
        data = self.data if data is None else data
        if key not in data or data[key] is None:
            return None
        value = data[key]
        where = join_key(self.prefix if prefix is None else prefix, key)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"expected a list of strings, got {yaml_kind(value)}",
                              file=self.file, line=data.line_of(key), key=where)
        out = []
        for i, item in enumerate(value):
            if (isinstance(item, bool) or not isinstance(item, (str, int, float))
                    or isinstance(item, int) and item.bit_length() > 64):
                line = value.line_of(i) if isinstance(value, LocatedList) else data.line_of(key)
                raise ConfigError(f"item {i}: expected a string, got {yaml_kind(item)}",
                                  file=self.file, line=line, key=where)
            out.append((getattr(item, "text", None) or str(item)).strip())
        return tuple(out)

    def integer(self, key: str, default: int | None, *, minimum: int = 1,
                maximum: int = _NO_MAXIMUM) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            bounds = f"at least {minimum}" if maximum == _NO_MAXIMUM else f"from {minimum} to {maximum}"
            raise self.err(key, f"expected a whole number {bounds}, got {shown(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.err(key, f"expected true or false, got {shown(value)}")
        return value
