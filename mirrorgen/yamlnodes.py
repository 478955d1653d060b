"""YAML loading that remembers where each value came from.

A configuration error must name the file, the line and the key; PyYAML's node marks know the line,
so mappings are loaded as :class:`LocatedDict`, which keeps the line of every key.
"""

from __future__ import annotations

from typing import Any, Final

import yaml

from .errors import ConfigError, one_line, shown

__all__ = ["LocatedDict", "LocatedList", "load_yaml"]


class LocatedDict(dict[str, Any]):
    """A mapping from YAML that knows its own line and the line of each of its keys."""

    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LocatedList(list[Any]):
    """A sequence from YAML that knows its line and the line of each item."""

    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


# The most values (keys, items, merged pairs) one document may build: far past any real
# configuration, and a bound on what an alias or merge bomb can make us construct.
_MAX_VALUES: Final = 1_000_000


class _Loader(yaml.SafeLoader):
    last_node_line: int | None = None  # of the last node built, for an error's line
    path: list[str | int]              # keys and indexes down to the value being built
    budget: int                        # values left to build (_MAX_VALUES)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        self.last_node_line = node.start_mark.line + 1
        return super().construct_object(node, deep=deep)

    def spend(self, count: int, node: yaml.Node) -> None:
        self.budget -= count
        if self.budget < 0:
            raise ConfigError(f"more than {_MAX_VALUES} values (aliases or merges repeating a large part?)",
                              file=self.name, line=node.start_mark.line + 1, key=self.key_path())

    def key_path(self) -> str | None:
        """The value being built as the configuration names keys: ``mirrors[0].filters.latest``."""
        from .urls import redact  # a key is user text: a pasted token URL must not leak

        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{redact(part)}" if out else redact(part))
        return out or None


def _merged_size(node: yaml.MappingNode, sizes: dict[int, int]) -> int:
    """How many pairs ``node`` holds once its merges are flattened (each mapping counted once,
    by identity: an alias is the same node), computed before PyYAML copies them."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 0  # a merge that refers back to itself (PyYAML refuses it later)
    total = 0
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            total += 1
        elif isinstance(value_node, yaml.MappingNode):
            total += _merged_size(value_node, sizes)
        elif isinstance(value_node, yaml.SequenceNode):
            total += sum(_merged_size(v, sizes) for v in value_node.value if isinstance(v, yaml.MappingNode))
        if total > _MAX_VALUES:
            break
    sizes[id(node)] = total
    return total


def _construct_mapping(loader: _Loader, node: yaml.Node) -> LocatedDict:
    if not isinstance(node, yaml.MappingNode):  # a tag that forces it: `!!map text`
        raise ConfigError("expected a mapping", file=loader.name, line=node.start_mark.line + 1,
                          key=loader.key_path())
    loader.spend(_merged_size(node, {}), node)
    # A key written twice is an error, but a key written beside a merge (``<<: *shared``)
    # overrides the merged one, as YAML's merge type says: only the written keys are checked.
    written = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
    loader.flatten_mapping(node)  # the merged pairs first, in precedence order, then the written
    merged = len(node.value) - written
    result = LocatedDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    seen: set[str] = set()
    for i, (key_node, value_node) in enumerate(node.value):
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError("a key must be a plain value, not a list or a mapping", file=loader.name,
                              line=key_node.start_mark.line + 1, key=loader.key_path())
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = shown(key) if isinstance(key, int) and not isinstance(key, bool) else str(key)
        if i >= merged:
            if key in seen:
                raise ConfigError(f"duplicate key {shown(key)}", file=loader.name,
                                  line=key_node.start_mark.line + 1, key=key)
            seen.add(key)
        loader.path.append(key)
        result[key] = loader.construct_object(value_node, deep=True)
        loader.path.pop()
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.Node) -> LocatedList:
    if not isinstance(node, yaml.SequenceNode):  # a tag that forces it: `!!seq text`
        raise ConfigError("expected a list", file=loader.name, line=node.start_mark.line + 1,
                          key=loader.key_path())
    loader.spend(len(node.value), node)
    result = LocatedList()
    for i, child in enumerate(node.value):
        loader.path.append(i)
        result.append(loader.construct_object(child, deep=True))
        loader.path.pop()
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


class LocatedFloat(float):
    """A YAML float that remembers how it was written: `3.10` must stay "3.10", not become 3.1."""

    text: str


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    value = LocatedFloat(loader.construct_yaml_float(node))
    value.text = node.value
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _current_line(loader: _Loader) -> int | None:
    return loader.last_node_line


def load_yaml(text: str, file: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line :class:`ConfigError` with its line."""
    try:
        loader = _Loader(text)  # refuses characters YAML does not allow (NUL, lone surrogates)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    loader.name = file
    loader.path = []
    loader.budget = _MAX_VALUES
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("nested too deeply", file=file, line=_current_line(loader)) from None
    except (ValueError, OverflowError) as exc:
        # PyYAML's own constructors raise these for an impossible date (2024-02-30) or a float
        # past any range; their message says which.
        raise ConfigError(f"invalid value: {one_line(str(exc), 100) or type(exc).__name__}", file=file,
                          line=_current_line(loader), key=loader.key_path()) from None
    except (KeyError, AttributeError, TypeError, IndexError):
        # ... and these when a tag forces a value it cannot hold (`!!bool maybe`, `!!timestamp
        # yesterday`, `!!float ''`), with a message about PyYAML's insides.
        raise ConfigError("invalid value for its tag", file=file, line=_current_line(loader),
                          key=loader.key_path()) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        last = max(len(text.splitlines()), 1)
        if exc.context_mark is not None and mark is not None and mark.line >= last:
            # Found at the end of the stream (an unclosed bracket or quote): the problem mark is
            # past the last line; where the construct opened is the line to show.
            mark = exc.context_mark
        line = min(mark.line + 1, last) if mark else None
        raise ConfigError(f"invalid YAML: {exc.problem or exc.context}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    finally:
        loader.dispose()
