"""sidecar.tracecontext on its own: traceparent (W3C Trace Context §3.2 and its test suite's
valid and invalid examples), tracestate (§3.3: grammar, limits, truncation) and B3."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.tracecontext import Parent, clean_tracestate, parse_b3, parse_traceparent

T = "0af7651916cd43dd8448eb211c80319c"
P = "b7ad6b7169203331"

# --- traceparent -------------------------------------------------------------------------------

VALID_TRACEPARENTS = [
    ("sampled", f"00-{T}-{P}-01", Parent(T, P, True, "w3c")),
    ("not sampled", f"00-{T}-{P}-00", Parent(T, P, False, "w3c")),
    # Only bit 0 is the sampled flag; other bits are not an error.
    ("other flag bits", f"00-{T}-{P}-ff", Parent(T, P, True, "w3c")),
    ("other flag bits unsampled", f"00-{T}-{P}-02", Parent(T, P, False, "w3c")),
    (
        "future version with more fields",
        f"cc-{T}-{P}-01-what-the-future-will-be-like",
        Parent(T, P, True, "w3c"),
    ),
    ("future version, 55 characters", f"cc-{T}-{P}-00", Parent(T, P, False, "w3c")),
    ("version fe", f"fe-{T}-{P}-01-x", Parent(T, P, True, "w3c")),
]

INVALID_TRACEPARENTS = [
    ("empty", ""),
    ("trace id too short", f"00-{T[:-1]}-{P}-01"),
    ("trace id too long", f"00-{T}0-{P}-01"),
    ("parent id too short", f"00-{T}-{P[:-1]}-01"),
    ("parent id too long", f"00-{T}-{P}0-01"),
    ("flags one digit", f"00-{T}-{P}-1"),
    ("version one digit", f"0-{T}-{P}-01"),
    ("uppercase trace id", f"00-{T.upper()}-{P}-01"),
    ("uppercase parent id", f"00-{T}-{P.upper()}-01"),
    ("uppercase flags", f"00-{T}-{P}-0A"),
    ("uppercase version", f"0A-{T}-{P}-01"),
    ("version ff", f"ff-{T}-{P}-01"),
    ("all-zero trace id", f"00-{'0' * 32}-{P}-01"),
    ("all-zero parent id", f"00-{T}-{'0' * 16}-01"),
    ("extra field for version 00", f"00-{T}-{P}-01-what-the-future-will-be-like"),
    ("trailing characters for version 00", f"00-{T}-{P}-01x"),
    ("non-hex in trace id", f"00-{T[:-1]}g-{P}-01"),
    ("non-hex in parent id", f"00-{T}-{P[:-1]}z-01"),
    ("non-hex in flags", f"00-{T}-{P}-0x"),
    ("non-hex in version", f"0g-{T}-{P}-01"),
    ("non-ASCII digit", f"00-{T[:-1]}\u0661-{P}-01"),
    ("underscore separators", f"00_{T}_{P}_01"),
    ("separator after version", f"00.{T}-{P}-01"),
    ("separator after trace id", f"00-{T}.{P}-01"),
    ("separator after parent id", f"00-{T}-{P}.01"),
    ("future version, extra without dash", f"cc-{T}-{P}-01.what-the-future-will-be-like"),
    ("future version, bad trace id", f"cc-{'0' * 32}-{P}-01-future"),
    ("two headers joined", f"00-{T}-{P}-01,00-{T}-{P}-01"),
    ("spaces inside", f"00 -{T}-{P}-01"),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param(v, e, id=name) for name, v, e in VALID_TRACEPARENTS],
)
def test_parse_traceparent_accepts_valid(value: str, expected: Parent) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize("value", [pytest.param(v, id=name) for name, v in INVALID_TRACEPARENTS])
def test_parse_traceparent_rejects_invalid(value: str) -> None:
    assert parse_traceparent(value) is None


# --- tracestate --------------------------------------------------------------------------------


def members(count: int, width: int, prefix: str = "k") -> list[str]:
    """`count` distinct valid members, each exactly `width` characters long."""
    out = []
    for index in range(count):
        key = f"{prefix}{index:03d}"
        out.append(f"{key}={'v' * (width - len(key) - 1)}")
    return out


# 15 * 32 + 17 + 15 commas = 512 characters: at the limit, nothing is cut.
AT_512 = [*members(15, 32), *members(1, 17, "z")]

CLEAN_TRACESTATES = [
    ("one member", ["rojo=00f067aa0ba902b7"], "rojo=00f067aa0ba902b7"),
    (
        "W3C example",
        ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    ),
    ("lines combined", ["rojo=1", "congo=2,blue=3"], "rojo=1,congo=2,blue=3"),
    ("optional whitespace", [" rojo=1 ,\tcongo=2\t"], "rojo=1,congo=2"),
    ("empty members ignored", ["rojo=1,,congo=2,", ",", "blue=3"], "rojo=1,congo=2,blue=3"),
    ("multi-tenant key", ["fw529a3039@dt=abc,t@s=1"], "fw529a3039@dt=abc,t@s=1"),
    ("tenant may start with a digit", ["1tenant@sys=1"], "1tenant@sys=1"),
    ("key characters", ["a0_-*/=x"], "a0_-*/=x"),
    ("value with inner space and punctuation", ["k=a b!~"], "k=a b!~"),
    ("256-character simple key", ["a" * 256 + "=1"], "a" * 256 + "=1"),
    ("256-character value", ["k=" + "v" * 256], "k=" + "v" * 256),
    ("exactly 32 members", [",".join(members(32, 6))], ",".join(members(32, 6))),
    ("exactly 512 characters", [",".join(AT_512)], ",".join(AT_512)),
]

MALFORMED_TRACESTATES = [
    ("uppercase key", ["Rojo=1"]),
    ("key starting with a digit", ["1abc=1"]),
    ("key with a space", ["ro jo=1"]),
    ("key too long", ["a" * 257 + "=1"]),
    ("system id too long", ["t@" + "s" * 15 + "=1"]),
    ("tenant id too long", ["t" * 242 + "@s=1"]),
    ("system id starting with a digit", ["t@1s=1"]),
    ("no equals sign", ["rojo"]),
    ("empty key", ["=1"]),
    ("empty value", ["rojo="]),
    ("value of spaces", ["rojo=  ,congo=2"]),
    ("equals sign in value", ["rojo=a=b"]),
    ("non-ASCII value", ["rojo=caf\u00e9"]),
    ("control character in value", ["rojo=a\x01b"]),
    ("DEL in value", ["rojo=a\x7fb"]),
    ("value too long", ["k=" + "v" * 257]),
    ("duplicate key", ["rojo=1,congo=2,rojo=3"]),
    ("duplicate key across lines", ["rojo=1", "rojo=2"]),
    ("one bad member among good ones", ["rojo=1,Bad=2,congo=3"]),
    ("bad member beyond the 32nd", [",".join([*members(32, 6), "BAD=1"])]),
]


@pytest.mark.parametrize(
    ("values", "expected"),
    [pytest.param(v, e, id=name) for name, v, e in CLEAN_TRACESTATES],
)
def test_clean_tracestate_keeps_valid_lists(values: list[str], expected: str) -> None:
    assert clean_tracestate(values) == expected


@pytest.mark.parametrize("values", [pytest.param(v, id=name) for name, v in MALFORMED_TRACESTATES])
def test_clean_tracestate_drops_malformed_lists(values: list[str]) -> None:
    assert clean_tracestate(values) is None


@pytest.mark.parametrize("values", [[], [""], [" , ,"]], ids=["none", "empty", "only-empty"])
def test_clean_tracestate_with_no_members_is_none(values: list[str]) -> None:
    assert clean_tracestate(values) is None


def test_tracestate_over_32_members_keeps_the_first_32() -> None:
    listed = members(40, 6)
    assert clean_tracestate([",".join(listed)]) == ",".join(listed[:32])


def test_tracestate_over_32_members_across_lines_keeps_the_first_32() -> None:
    listed = members(40, 6)
    assert clean_tracestate([",".join(listed[:20]), ",".join(listed[20:])]) == ",".join(listed[:32])


def test_tracestate_over_512_characters_cut_from_the_end_by_whole_members() -> None:
    listed = members(20, 30)  # 20 * 30 + 19 commas = 619 characters
    cleaned = clean_tracestate([",".join(listed)])
    # 16 members: 16 * 30 + 15 = 495; 17 would be 527.
    assert cleaned == ",".join(listed[:16])


def test_tracestate_over_512_characters_drops_long_members_first() -> None:
    short = members(4, 30, "s")
    long = members(3, 200, "l")
    # s0 l0 s1 l1 s2 l2 s3: 4 * 30 + 3 * 200 + 6 = 726. Without l2: 525, still too long;
    # without l1 too: 324, which fits. The short members, after the long ones, all stay.
    listed = [short[0], long[0], short[1], long[1], short[2], long[2], short[3]]
    cleaned = clean_tracestate([",".join(listed)])
    assert cleaned == ",".join([short[0], long[0], short[1], short[2], short[3]])
    assert cleaned is not None and len(cleaned) <= 512


def test_tracestate_long_members_gone_and_still_too_long_cuts_from_the_end() -> None:
    short = members(17, 30, "s")  # 17 * 30 + 16 = 526 without the long member
    long = members(1, 129, "l")
    cleaned = clean_tracestate([",".join([long[0], *short])])
    assert cleaned == ",".join(short[:16])


def test_tracestate_members_of_exactly_128_are_not_long() -> None:
    edge = members(1, 128, "e")  # exactly 128: not "longer than 128", cut from the end
    short = members(13, 30, "s")  # 128 + 13 * 30 + 13 = 531
    cleaned = clean_tracestate([",".join([edge[0], *short])])
    assert cleaned == ",".join([edge[0], *short[:12]])


# --- B3 ----------------------------------------------------------------------------------------

B3T = "80f198ee56343ba864fe8b2a57d3eff7"
B3S = "e457b5a2e4d86bd1"
B3P = "05e3ac9a4f6e3b90"
B3T64 = "a3ce929d0e0e4736"


def b3_headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


B3_CASES = [
    ("single sampled", [("b3", f"{B3T}-{B3S}-1")], Parent(B3T, B3S, True, "b3")),
    ("single not sampled", [("b3", f"{B3T}-{B3S}-0")], Parent(B3T, B3S, False, "b3")),
    ("single debug", [("b3", f"{B3T}-{B3S}-d")], Parent(B3T, B3S, True, "b3")),
    ("single deferred", [("b3", f"{B3T}-{B3S}")], Parent(B3T, B3S, None, "b3")),
    ("single with parent", [("b3", f"{B3T}-{B3S}-1-{B3P}")], Parent(B3T, B3S, True, "b3")),
    (
        "single 64-bit trace id",
        [("b3", f"{B3T64}-{B3S}-1")],
        Parent("0" * 16 + B3T64, B3S, True, "b3"),
    ),
    ("bare decision 0", [("b3", "0")], False),
    ("bare decision 1", [("b3", "1")], True),
    ("bare decision d", [("b3", "d")], True),
    ("single bad sampling state", [("b3", f"{B3T}-{B3S}-2")], None),
    ("single span id too short", [("b3", f"{B3T}-{B3S[:-1]}-1")], None),
    ("single trace id 20 hex", [("b3", f"{B3T[:20]}-{B3S}-1")], None),
    ("single all-zero trace id", [("b3", f"{'0' * 32}-{B3S}-1")], None),
    ("single all-zero span id", [("b3", f"{B3T}-{'0' * 16}-1")], None),
    ("single bad parent", [("b3", f"{B3T}-{B3S}-1-xyz")], None),
    ("single too many fields", [("b3", f"{B3T}-{B3S}-1-{B3P}-x")], None),
    ("single only a trace id", [("b3", B3T)], None),
    ("single non-hex", [("b3", f"{B3T[:-1]}g-{B3S}-1")], None),
    (
        "multi sampled",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "1")],
        Parent(B3T, B3S, True, "b3"),
    ),
    (
        "multi not sampled",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "0")],
        Parent(B3T, B3S, False, "b3"),
    ),
    (
        "multi debug flag",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Flags", "1")],
        Parent(B3T, B3S, True, "b3"),
    ),
    (
        "multi deferred",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S)],
        Parent(B3T, B3S, None, "b3"),
    ),
    (
        "multi 64-bit trace id",
        [("X-B3-TraceId", B3T64), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "1")],
        Parent("0" * 16 + B3T64, B3S, True, "b3"),
    ),
    (
        "multi header names any case",
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "1")],
        Parent(B3T, B3S, True, "b3"),
    ),
    ("multi sampling only", [("X-B3-Sampled", "0")], False),
    ("multi no span id", [("X-B3-TraceId", B3T), ("X-B3-Sampled", "1")], True),
    (
        "multi bad span id",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", "nothex0000000000"), ("X-B3-Sampled", "1")],
        None,
    ),
    ("nothing", [], None),
    (
        "single wins over multi",
        [
            ("b3", f"{B3T}-{B3S}-0"),
            ("X-B3-TraceId", B3T64),
            ("X-B3-SpanId", B3P),
            ("X-B3-Sampled", "1"),
        ],
        Parent(B3T, B3S, False, "b3"),
    ),
]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [pytest.param(h, e, id=name) for name, h, e in B3_CASES],
)
def test_parse_b3(headers: list[tuple[str, str]], expected: Parent | bool | None) -> None:
    assert parse_b3(b3_headers(*headers)) == expected
