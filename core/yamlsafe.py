"""One loader for every YAML file dqr reads (the site config, the mock-PACS
config): untrusted text in, plain data and each key's line out.

The document is composed into nodes first and checked there, before any
Python object is built or any tree is walked:

- aliases may not expand the document beyond :data:`MAX_VALUES` values (a
  "billion laughs" bomb is a few lines that expand to 10⁹ values), nor refer
  to the node they are part of;
- nesting deeper than :data:`MAX_DEPTH` is refused (PyYAML composes
  recursively);
- a key given twice in one mapping is an error naming both lines (YAML
  would keep the last one silently);
- a mapping *key* written ``on``/``off``/``yes``/``no`` stays that string:
  YAML 1.1 reads it as a boolean, which no config key is (values are left
  as YAML reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dqr.errors import ConfigError, Problem

#: Values (scalars, sequences, mappings) a document may hold once its
#: aliases are expanded. dqr's configs have a few hundred at most.
MAX_VALUES = 10_000
#: Deepest nesting of sequences and mappings accepted.
MAX_DEPTH = 50

_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class YamlDocument:
    """A loaded YAML document: its data, each key path's 1-based line
    (``("sources", "main", "type") -> 4``; sequence items by index) and the
    problems that did not stop loading (duplicate keys: the data keeps the
    last value), to be reported with the caller's own."""

    data: Any
    lines: dict[tuple[Any, ...], int]
    problems: tuple[Problem, ...] = ()


def load_yaml_file(path: Path) -> YamlDocument:
    """Read a UTF-8 YAML file (a BOM is allowed) with :func:`load_yaml`."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the config: {exc.strerror}", file=file) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(Problem(file, f"not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8", line)) from exc
    return load_yaml(text, file)


def load_yaml(text: str, file: str) -> YamlDocument:
    """Parse ``text`` safely; raise :class:`ConfigError` when it cannot be
    loaded at all (not YAML, a bomb, too deep)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise ConfigError(Problem(file, f"nested more than {MAX_DEPTH} levels deep; flatten the YAML")) from None
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_problem(exc, file)) from exc
        if root is None:
            return YamlDocument(None, {})
        _check_size(root, file)
        lines: dict[tuple[Any, ...], int] = {}
        problems: list[Problem] = []
        _walk(loader, root, (), lines, problems, file)
        try:
            data = loader.construct_document(root)
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_problem(exc, file)) from exc
        return YamlDocument(data, lines, tuple(problems))
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, file: str) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    return Problem(file, f"not valid YAML: {getattr(exc, 'problem', None) or exc}", mark.line + 1 if mark else None)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_size(root: yaml.Node, file: str) -> None:
    """Count the values the document expands to, without expanding it: an
    alias is the same node object met again, so each node's expanded size is
    computed once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(
                Problem(file, "an alias refers to itself (a recursive anchor); write the value out", _line(node))
            )
        if depth > MAX_DEPTH:
            raise ConfigError(Problem(file, f"nested more than {MAX_DEPTH} levels deep; flatten the YAML", _line(node)))
        open_nodes.add(key)
        total = 1
        for child in _children(node):
            total += size(child, depth + 1)
            if total > MAX_VALUES:
                raise ConfigError(
                    Problem(
                        file,
                        f"aliases (*name) expand this document beyond {MAX_VALUES} values (a YAML bomb?); "
                        "write the values out instead of repeating aliases",
                        _line(node),
                    )
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def _walk(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: tuple[Any, ...],
    lines: dict[tuple[Any, ...], int],
    problems: list[Problem],
    file: str,
    reported: set[int] | None = None,
) -> None:
    """Record key lines, refuse duplicate keys, keep on/off/yes/no keys as
    strings. Bounded: :func:`_check_size` ran first."""
    reported = set() if reported is None else reported
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # `<<: *base`: explicit keys may override merged ones
                _walk(loader, value_node, path, {}, problems, file, reported)
                continue
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.tag == _BOOL and key_node.value.lower() not in ("true", "false"):
                    key_node.tag = _STR
                key: Any = key_node.value
                identity = _identity(loader, key_node)
                if identity in seen and id(key_node) not in reported:
                    reported.add(id(key_node))  # once, however often an alias repeats its mapping
                    name = ".".join(str(p) for p in path + (key,))
                    problems.append(
                        Problem(
                            file,
                            f"key {name!r} appears twice (lines {seen[identity]} and {_line(key_node)}); "
                            "YAML would silently keep the last one",
                            _line(key_node),
                        )
                    )
                elif identity not in seen:
                    seen[identity] = _line(key_node)
            else:
                key = f"<{key_node.tag}>"
            lines[path + (key,)] = _line(key_node)  # the last one given is the one kept
            _walk(loader, value_node, path + (key,), lines, problems, file, reported)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.setdefault(path + (index,), _line(item))
            _walk(loader, item, path + (index,), lines, problems, file, reported)


def _identity(loader: yaml.SafeLoader, key_node: yaml.ScalarNode) -> Any:
    """What a key is once loaded (``1`` and ``0x1`` are one key, ``'1'`` another)."""
    try:
        value = loader.construct_object(key_node)
        hash(value)
    except (yaml.YAMLError, TypeError):
        return (key_node.tag, key_node.value)
    return (type(value).__name__, value)
