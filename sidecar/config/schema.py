"""Stage 2 building blocks: converters from raw nodes to typed values, and mapping schemas.

A converter takes (node, key path, issue log) and returns the typed value, or raises
`Invalid`. With a message, the caller records it at that node and path; without one, the
converter has already recorded finer-grained issues itself (one per bad list item, say).
A schema maps each allowed key to its converter; a key the file leaves out is simply not
passed on, so the defaults stay where they are declared: on the dataclasses in model.py.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeAlias, TypeVar

from sidecar.config.issues import IssueLog, join
from sidecar.config.raw import RawEntry, RawMap, RawNode, RawScalar, RawSeq
from sidecar.config.units import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    UnitError,
    parse_duration,
    parse_size,
)

T = TypeVar("T")

Converter: TypeAlias = Callable[[RawNode, str, IssueLog], T]
Schema: TypeAlias = Mapping[str, Converter[Any]]


class Invalid(Exception):
    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)
        self.message = message


class Missing:
    """Marks a value that failed to convert (its issue is already logged)."""


MISSING: Final = Missing()


def describe(node: RawNode) -> str:
    """How a value is quoted back in messages: `got 'fast'`, `got 15`, `got a list`."""
    if isinstance(node, RawMap):
        return "a mapping"
    if isinstance(node, RawSeq):
        return "a list"
    if isinstance(node.value, str) or node.expanded:
        return repr(node.text)
    if node.value is None:
        return "nothing" if node.text == "" else "null"
    return node.text


def convert(converter: Converter[T], node: RawNode, path: str, log: IssueLog) -> T | Missing:
    """Run one converter, logging its complaint (if any) against the node it was about."""
    if isinstance(node, RawScalar) and node.broken:
        return MISSING
    try:
        return converter(node, path, log)
    except Invalid as error:
        if error.message is not None:
            log.add(node.line, path, error.message, at=node)
        return MISSING


def unknown_key(key: str, allowed: Iterable[str]) -> str:
    choices = list(allowed)
    close = difflib.get_close_matches(key, choices, n=1)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    return f"unknown key '{key}'; expected one of: {', '.join(choices)}"


def mapping_of(node: RawNode, expected: str) -> RawMap:
    """`node` as a mapping; an empty value (`server:` with nothing under it) is an empty one."""
    if isinstance(node, RawMap):
        return node
    if isinstance(node, RawScalar) and node.value is None and not node.expanded:
        return RawMap({}, node.line)
    raise Invalid(f"expected {expected}, got {describe(node)}")


def read_fields(node: RawMap, path: str, log: IssueLog, schema: Schema) -> dict[str, Any]:
    """Convert every key of `node` that `schema` knows; log the ones it does not."""
    values: dict[str, Any] = {}
    for key, entry in node.entries.items():
        converter = schema.get(key)
        if converter is None:
            log.add(entry.key_line, join(path, key), unknown_key(key, schema), at=entry)
            continue
        value = convert(converter, entry.value, join(path, key), log)
        if not isinstance(value, Missing):
            values[key] = value
    return values


def section(
    build: Callable[..., T],
    schema: Schema,
    check: Callable[[T, RawMap, str, IssueLog], None] | None = None,
) -> Converter[T]:
    """A mapping whose keys are `build`'s keyword arguments; `check` adds cross-key rules."""

    def convert_section(node: RawNode, path: str, log: IssueLog) -> T:
        mapping = mapping_of(node, "a mapping")
        result = build(**read_fields(mapping, path, log, schema))
        if check is not None:
            check(result, mapping, path, log)
        return result

    return convert_section


def scalar(node: RawNode, expected: str) -> RawScalar:
    if isinstance(node, RawScalar):
        return node
    raise Invalid(f"expected {expected}, got {describe(node)}")


def text(parse: Callable[[str], T], expected: str) -> Converter[T]:
    """A string parsed by `parse`, whose ValueError message is the user-facing complaint."""

    def convert_text(node: RawNode, path: str, log: IssueLog) -> T:
        value = scalar(node, expected)
        if not (isinstance(value.value, str) or value.expanded):
            raise Invalid(f"expected {expected}, got {describe(value)}")
        try:
            return parse(value.text)
        except ValueError as error:
            raise Invalid(str(error)) from None

    return convert_text


def optional(converter: Converter[T]) -> Converter[T | None]:
    """`converter`, or None for an explicit null (`health_path: null` or `health_path: ~`)."""

    def convert_optional(node: RawNode, path: str, log: IssueLog) -> T | None:
        if isinstance(node, RawScalar) and node.value is None:
            return None
        return converter(node, path, log)

    return convert_optional


def boolean(node: RawNode, path: str, log: IssueLog) -> bool:
    value = scalar(node, "true or false").value
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(node)}")
    return value


def integer(minimum: int) -> Converter[int]:
    expected = f"an integer >= {minimum}"

    def convert_integer(node: RawNode, path: str, log: IssueLog) -> int:
        value = scalar(node, expected).value
        # bool is an int subclass; `workers: true` must not mean 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise Invalid(f"expected {expected}, got {describe(node)}")
        return value

    return convert_integer


def one_of_integers(options: Iterable[int]) -> Converter[int]:
    """One of a few integers (a status code, say)."""
    allowed = tuple(options)
    expected = f"one of {', '.join(str(option) for option in allowed)}"

    def convert_choice(node: RawNode, path: str, log: IssueLog) -> int:
        value = scalar(node, expected).value
        if isinstance(value, bool) or value not in allowed:
            raise Invalid(f"expected {expected}, got {describe(node)}")
        assert isinstance(value, int)
        return value

    return convert_choice


def fraction(node: RawNode, path: str, log: IssueLog) -> float:
    expected = "a number from 0.0 to 1.0"
    value = scalar(node, expected).value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"expected {expected}, got {describe(node)}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise Invalid(f"expected {expected}, got {describe(node)}")
    return float(value)


def choice(options: Iterable[str]) -> Converter[str]:
    """One of `options`, case-insensitively (stored lower-case)."""
    allowed = tuple(options)
    expected = f"one of {', '.join(allowed)}"

    def parse(value: str) -> str:
        if value.lower() not in allowed:
            raise ValueError(f"expected {expected}, got {value!r}")
        return value.lower()

    return text(parse, expected)


def duration(*, allow_zero: bool) -> Converter[float]:
    def convert_duration(node: RawNode, path: str, log: IssueLog) -> float:
        value = scalar(node, DURATION_EXPECTED)
        try:
            seconds = parse_duration(value.text)
        except UnitError as error:
            raise Invalid(_unit_message(error, value)) from None
        if seconds == 0 and not allow_zero:
            raise Invalid(f"expected a duration greater than zero, got {describe(value)}")
        return seconds

    return convert_duration


def size(*, minimum: int = 0) -> Converter[int]:
    """Bytes: `10MiB` and friends, or a bare YAML integer."""

    def convert_size(node: RawNode, path: str, log: IssueLog) -> int:
        value = scalar(node, SIZE_EXPECTED)
        if isinstance(value.value, int) and not isinstance(value.value, bool):
            if value.value < 0:
                hint = "sizes cannot be negative"
                raise Invalid(f"expected {SIZE_EXPECTED}, got {value.text} ({hint})")
            result = value.value
        else:
            try:
                result = parse_size(value.text)
            except UnitError as error:
                raise Invalid(_unit_message(error, value)) from None
        if result < minimum:
            raise Invalid(f"expected a size of at least {minimum}B, got {describe(value)}")
        return result

    return convert_size


def _unit_message(error: UnitError, node: RawScalar) -> str:
    hint = f" ({error.hint})" if error.hint else ""
    return f"expected {error.expected}, got {describe(node)}{hint}"


def list_of(item: Converter[T], expected: str) -> Converter[tuple[T, ...]]:
    """A YAML list, each item converted (and complained about) on its own."""

    def convert_list(node: RawNode, path: str, log: IssueLog) -> tuple[T, ...]:
        if not isinstance(node, RawSeq):
            raise Invalid(f"expected {expected}, got {describe(node)}")
        values: list[T] = []
        failed = False
        for index, raw in enumerate(node.items):
            value = convert(item, raw, f"{path}[{index}]", log)
            if isinstance(value, Missing):
                failed = True
            elif value not in values:
                values.append(value)
        if failed:
            raise Invalid()
        return tuple(values)

    return convert_list


def entry_line(node: RawMap, key: str) -> int:
    """The line of `key`'s value in `node`, or the mapping's own line if the key is absent."""
    entry: RawEntry | None = node.entries.get(key)
    return entry.value.line if entry is not None else node.line
