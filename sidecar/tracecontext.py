"""W3C Trace Context and B3 headers: parse strictly, format exactly.

Reference: https://www.w3.org/TR/trace-context/ (traceparent, tracestate) and
openzipkin/b3-propagation (the single `b3` header and the X-B3-* headers). Invalid input is
never repaired: it is treated as absent, and the sidecar starts a new trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from random import getrandbits

from multidict import CIMultiDictProxy

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3_SINGLE = "b3"
B3_HEADERS = ("X-B3-TraceId", "X-B3-SpanId", "X-B3-ParentSpanId", "X-B3-Sampled", "X-B3-Flags")

_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# tracestate members (W3C §3.3.1): simple and multi-tenant keys, printable values.
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
TRACESTATE_MAX_MEMBERS = 32
TRACESTATE_MAX_LENGTH = 512
# When over the length limit, members longer than this go first (W3C §3.3.1.5).
_TRACESTATE_LONG_MEMBER = 128


def new_trace_id() -> str:
    # Ids must be unique, not secret (as in the OpenTelemetry SDKs): Python's PRNG, no syscall.
    return f"{getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{getrandbits(64) or 1:016x}"


@dataclass(frozen=True, slots=True)
class Parent:
    """The caller's trace context, from traceparent or B3."""

    trace_id: str  # 32 lower-case hex
    span_id: str  # 16 lower-case hex: the caller's span, our parent
    sampled: bool | None  # None: the caller deferred the decision (B3 only)
    source: str  # "w3c" or "b3"


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX.issuperset(text)


def parse_traceparent(value: str) -> Parent | None:
    """A valid traceparent's parent context; None for anything invalid (W3C §3.2)."""
    if len(value) < 55:
        return None
    version = value[:2]
    if not _is_hex(version, 2) or version == "ff":
        return None
    # Version 00 is exactly 55 characters; a later version may append fields after a dash.
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id, 32) and _is_hex(span_id, 16) and _is_hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1), "w3c")


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def clean_tracestate(values: list[str]) -> str | None:
    """The tracestate to forward: None if malformed; over-limit lists cut by whole members."""
    members = []
    keys = set()
    for value in values:
        for raw in value.split(","):
            member = raw.strip(" \t")
            if not member:
                continue  # empty list members are allowed and ignored
            if _TRACESTATE_MEMBER.fullmatch(member) is None:
                return None
            key = member.partition("=")[0]
            if key in keys:
                return None  # a key may appear only once
            keys.add(key)
            members.append(member)
    if not members:
        return None
    members = members[:TRACESTATE_MAX_MEMBERS]
    if len(",".join(members)) > TRACESTATE_MAX_LENGTH:
        members = _shorten(members)
    return ",".join(members) if members else None


def _shorten(members: list[str]) -> list[str]:
    # Drop long members first (from the end), then anything from the end, until it fits.
    kept = list(members)
    for index in range(len(kept) - 1, -1, -1):
        if len(",".join(kept)) <= TRACESTATE_MAX_LENGTH:
            return kept
        if len(kept[index]) > _TRACESTATE_LONG_MEMBER:
            del kept[index]
    while kept and len(",".join(kept)) > TRACESTATE_MAX_LENGTH:
        kept.pop()
    return kept


def parse_b3(headers: CIMultiDictProxy[str]) -> Parent | bool | None:
    """B3 context: a Parent, or just a sampling decision (bool), or None.

    The single `b3` header wins over the X-B3-* headers, as in the B3 specification.
    """
    single = headers.get(B3_SINGLE)
    if single is not None:
        return _parse_b3_single(single.strip().lower())
    trace_id = headers.get("X-B3-TraceId")
    span_id = headers.get("X-B3-SpanId")
    sampled = _b3_sampled(headers.get("X-B3-Sampled"), headers.get("X-B3-Flags"))
    if trace_id is None or span_id is None:
        return sampled
    return _b3_parent(trace_id.strip().lower(), span_id.strip().lower(), sampled)


def _parse_b3_single(value: str) -> Parent | bool | None:
    if value in ("0", "1", "d"):
        return value != "0"  # a sampling decision only
    fields = value.split("-")
    if len(fields) not in (2, 3, 4):
        return None
    sampled: bool | None = None
    if len(fields) >= 3:
        if fields[2] not in ("0", "1", "d"):
            return None
        sampled = fields[2] != "0"
    if len(fields) == 4 and not _is_hex(fields[3], 16):
        return None
    return _b3_parent(fields[0], fields[1], sampled)


def _b3_sampled(sampled: str | None, flags: str | None) -> bool | None:
    if flags is not None and flags.strip() == "1":
        return True  # debug implies sampled
    if sampled is None:
        return None
    value = sampled.strip().lower()
    if value in ("1", "true", "d"):
        return True
    if value in ("0", "false"):
        return False
    return None


def _b3_parent(trace_id: str, span_id: str, sampled: bool | None) -> Parent | None:
    if _is_hex(trace_id, 16):
        trace_id = "0" * 16 + trace_id  # 64-bit ids are left-padded to 128 bits
    if not (_is_hex(trace_id, 32) and _is_hex(span_id, 16)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, sampled, "b3")
