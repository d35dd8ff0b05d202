"""Stage 1: YAML text to a raw tree that remembers the line of every node.

PyYAML's constructors throw positions away and silently keep the last of two equal keys, so
the document is only *composed* (SafeLoader: no arbitrary tags are ever constructed) and the
node graph is walked here: duplicate keys are caught, merge keys (`<<: *anchor`) applied,
`${VAR}` references expanded, and scalars given their YAML type. Validation against the
schema is stage 2's job; this stage knows nothing about what keys mean.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

import yaml
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from sidecar.config.issues import DOCUMENT, IssueLog, join

__all__ = ["RawEntry", "RawMap", "RawNode", "RawScalar", "RawSeq", "compose"]

_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
# What SafeConstructor builds for a scalar; anything else (!!python/..., !custom) is refused.
_SCALAR_TAGS = frozenset(
    _YAML_TAG_PREFIX + name
    for name in ("str", "int", "float", "bool", "null", "timestamp", "binary")
)

# `$${` first so an escaped reference is never read as a real one; an unclosed `${` matches
# too (without `close`) so it can be reported instead of passing through as literal text.
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\})?")
_REFERENCE_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


# eq=False everywhere: nodes are compared by identity (IssueLog de-duplicates per node).
@dataclass(frozen=True, slots=True, eq=False)
class RawScalar:
    value: object  # as YAML types it: str, int, float, bool, None (or a date, bytes)
    text: str  # the source text, after ${VAR} expansion
    line: int
    # Set when the scalar came from a plain (unquoted) value with a ${VAR} in it: such a value is
    # re-typed after expansion (so `workers: ${N}` is an int) but is still fine where text is due.
    expanded: bool = False
    # Already reported in stage 1 (an unset variable, say): stage 2 must not pile on.
    broken: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class RawEntry:
    key_line: int
    value: RawNode


@dataclass(frozen=True, slots=True, eq=False)
class RawMap:
    entries: Mapping[str, RawEntry]
    line: int


@dataclass(frozen=True, slots=True, eq=False)
class RawSeq:
    items: tuple[RawNode, ...]
    line: int


RawNode: TypeAlias = RawScalar | RawMap | RawSeq


def compose(text: str, log: IssueLog, env: Mapping[str, str]) -> RawNode | None:
    """The raw tree of `text`, or None when there is no document (issues are in `log`)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        log.add(_error_line(error), DOCUMENT, _syntax_message(error))
        return None
    except yaml.YAMLError as error:  # reader errors: a control character, say
        log.add(_reader_line(text, error), DOCUMENT, f"invalid YAML: {error}")
        return None
    if root is None:
        log.add(1, DOCUMENT, "the file is empty; expected a mapping like 'upstream: {url: ...}'")
        return None
    return _Builder(log, env).node(root, "")


def _error_line(error: yaml.MarkedYAMLError) -> int:
    mark = error.problem_mark or error.context_mark
    return mark.line + 1 if mark is not None else 1


def _syntax_message(error: yaml.MarkedYAMLError) -> str:
    parts = [part for part in (error.context, error.problem) if part]
    message = "invalid YAML: " + (", ".join(parts) or "syntax error")
    # PyYAML's wording for a mis-indented key; say what it usually means.
    if "expected <block end>" in message:
        message += " (check the indentation)"
    return message


def _reader_line(text: str, error: yaml.YAMLError) -> int:
    position = getattr(error, "position", None)
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


class _Builder:
    """One walk over one composed document."""

    def __init__(self, log: IssueLog, env: Mapping[str, str]) -> None:
        self._log = log
        self._env = env
        self._constructor = SafeConstructor()
        self._resolver = Resolver()
        # Nodes on the current path: an alias back to one of them would recurse forever.
        self._open: set[int] = set()

    def node(self, node: yaml.Node, path: str) -> RawNode:
        line = node.start_mark.line + 1
        if id(node) in self._open:
            self._log.add(line, path, "recursive YAML alias", at=node)
            return RawScalar(None, "", line, broken=True)
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path, line)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path, line)
            assert isinstance(node, yaml.ScalarNode)
            return self._scalar(node, path, line)
        finally:
            self._open.discard(id(node))

    def _unsupported_tag(self, node: yaml.Node, path: str, line: int, tag: str) -> bool:
        if node.tag == tag:
            return False
        self._log.add(line, path, f"unsupported YAML tag {_short_tag(node.tag)!r}", at=node)
        return True

    def _mapping(self, node: yaml.MappingNode, path: str, line: int) -> RawNode:
        if self._unsupported_tag(node, path, line, _MAP):
            return RawScalar(None, "", line, broken=True)
        entries: dict[str, RawEntry] = {}
        merged: list[RawNode] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                merged.append(self.node(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._log.add(key_line, path, "keys must be plain strings", at=key_node)
                continue
            key = key_node.value
            first = entries.get(key)
            if first is not None:
                message = f"duplicate key '{key}' (first set at line {first.key_line})"
                self._log.add(key_line, join(path, key), message, at=key_node)
                continue
            entries[key] = RawEntry(key_line, self.node(value_node, join(path, key)))
        for source in merged:
            self._merge_into(entries, source, path)
        return RawMap(entries, line)

    def _merge_into(self, entries: dict[str, RawEntry], source: RawNode, path: str) -> None:
        # YAML merge keys: explicit keys win, then earlier merged mappings win over later ones.
        sources = source.items if isinstance(source, RawSeq) else (source,)
        for item in sources:
            if isinstance(item, RawMap):
                for key, entry in item.entries.items():
                    entries.setdefault(key, entry)
            elif not _is_broken(item):
                self._log.add(item.line, path, "'<<' must merge a mapping or a list of mappings")

    def _sequence(self, node: yaml.SequenceNode, path: str, line: int) -> RawNode:
        if self._unsupported_tag(node, path, line, _SEQ):
            return RawScalar(None, "", line, broken=True)
        items = tuple(self.node(item, f"{path}[{index}]") for index, item in enumerate(node.value))
        return RawSeq(items, line)

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int) -> RawScalar:
        if node.tag == _STR and "${" in node.value:
            return self._expanded(node, path, line)
        return self._typed(node, node.value, path, line, expanded=False)

    def _expanded(self, node: yaml.ScalarNode, path: str, line: int) -> RawScalar:
        problems: list[str] = []
        text = _REFERENCE.sub(lambda match: self._substitute(match, problems), node.value)
        for problem in problems:
            self._log.add(line, path, problem, at=node)
        if problems:
            return RawScalar(None, text, line, broken=True)
        if node.style is not None:  # quoted or block scalars stay strings
            return RawScalar(text, text, line, expanded=True)
        # Re-type as if the expanded text had been written in place (so `workers: ${N}` is an int).
        tag = self._resolver.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
        retyped = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
        return self._typed(retyped, text, path, line, expanded=True)

    def _substitute(self, match: re.Match[str], problems: list[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group("body")
        reference = _REFERENCE_BODY.fullmatch(body)
        if match.group("close") is None or reference is None:
            problems.append(
                f"malformed reference '{match.group(0)}': expected ${{NAME}} or ${{NAME:-default}}"
                " (write $${ for a literal ${)"
            )
            return ""
        value = self._env.get(reference.group("name"))
        default = reference.group("default")
        if default is not None and not value:
            return default
        if value is None:
            problems.append(
                f"environment variable {reference.group('name')} is not set and has no default"
            )
            return ""
        return value

    def _typed(
        self, node: yaml.ScalarNode, text: str, path: str, line: int, *, expanded: bool
    ) -> RawScalar:
        if node.tag not in _SCALAR_TAGS:
            self._log.add(line, path, f"unsupported YAML tag {_short_tag(node.tag)!r}", at=node)
            return RawScalar(None, text, line, broken=True)
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as error:
            problem = getattr(error, "problem", None) or str(error)
            self._log.add(line, path, f"invalid value {text!r}: {problem}", at=node)
            return RawScalar(None, text, line, broken=True)
        return RawScalar(value, text, line, expanded=expanded)


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML_TAG_PREFIX) if tag.startswith(_YAML_TAG_PREFIX) else tag


def _is_broken(node: RawNode) -> bool:
    return isinstance(node, RawScalar) and node.broken
