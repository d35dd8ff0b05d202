"""Trace context through a running sidecar: what the app receives (read byte for byte by a
raw upstream), what the client gets back, and what the access log says.

W3C traceparent/tracestate, sampling, B3 in and out, and routes with tracing turned off.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.tracecontext import parse_traceparent
from tests.proxy.conftest import RawResponse
from tests.support import RawExchange, RawUpstream, RunningSidecar, run_sidecar
from tests.tracing.conftest import (
    PARENT_ID,
    TEST_TIMEOUT,
    TRACE_ID,
    TRACEPARENT,
    UNSAMPLED_TRACEPARENT,
    HeaderList,
    access_record,
    assert_trace_id,
    export_yaml,
    one,
    otlp_collector,
    send,
    tracing_config,
    upstream_traceparent,
)

T = TRACE_ID
P = PARENT_ID


async def through(
    sc: RunningSidecar, upstream: RawUpstream, headers: HeaderList, path: str = "/"
) -> tuple[RawResponse, RawExchange, dict[str, object]]:
    """One request: the response, what the app received, and the access log line."""
    before = len(upstream.exchanges)
    response = await send(sc.port, path, headers=headers)
    assert response.status == 200, response.body
    assert len(upstream.exchanges) == before + 1
    record = await access_record(sc, one(response.header("X-Request-Id")))
    return response, upstream.exchanges[-1], record


# --- traceparent -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("traceparent", "flags"),
    [
        (TRACEPARENT, "01"),
        (UNSAMPLED_TRACEPARENT, "00"),
        # Flag bits other than "sampled" are not rewritten when nothing else changes.
        (f"00-{T}-{P}-03", "01"),
        (f"00-{T}-{P}-fe", "00"),
    ],
    ids=["sampled", "unsampled", "flags-03", "flags-fe"],
)
async def test_valid_traceparent_is_kept_and_forwarded_byte_identical(
    upstream: RawUpstream, traceparent: str, flags: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response, received, record = await through(sc, upstream, [("traceparent", traceparent)])
        assert one(response.header("X-Trace-Id")) == T
        assert received.header("traceparent") == [traceparent]
        assert b"\r\ntraceparent: " + traceparent.encode() + b"\r\n" in received.head + b"\r\n"
        assert record["trace_id"] == T
        assert record["span_id"] == P  # the parent the app was told about
        assert record["trace_flags"] == flags


INVALID_TRACEPARENTS = [
    ("trace id too short", f"00-{T[:-1]}-{P}-01"),
    ("parent id too long", f"00-{T}-{P}0-01"),
    ("flags one digit", f"00-{T}-{P}-1"),
    ("uppercase hex", f"00-{T.upper()}-{P}-01"),
    ("version ff", f"ff-{T}-{P}-01"),
    ("all-zero trace id", f"00-{'0' * 32}-{P}-01"),
    ("all-zero parent id", f"00-{T}-{'0' * 16}-01"),
    ("extra field for version 00", f"00-{T}-{P}-01-what-the-future-will-be-like"),
    ("non-hex characters", f"00-{T[:-1]}g-{P}-01"),
    ("non-hex flags", f"00-{T}-{P}-0x"),
    ("wrong separators", f"00_{T}_{P}_01"),
    ("future version, bad separator after flags", f"cc-{T}-{P}-01.future"),
]


@pytest.mark.parametrize("value", [pytest.param(v, id=name) for name, v in INVALID_TRACEPARENTS])
async def test_invalid_traceparent_starts_a_new_trace_and_is_never_forwarded(
    upstream: RawUpstream, value: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        headers = [("traceparent", value), ("tracestate", "rojo=00f067aa0ba902b7")]
        response, received, record = await through(sc, upstream, headers)
        trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
        assert trace_id != T
        new_trace, new_parent, flags = upstream_traceparent(received)
        assert (new_trace, flags) == (trace_id, "01")
        assert new_parent != P
        assert value.encode() not in received.head
        assert received.header("tracestate") == []
        assert record["trace_id"] == trace_id


async def test_two_traceparent_headers_are_invalid(upstream: RawUpstream) -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        headers = [("traceparent", TRACEPARENT), ("traceparent", other)]
        response, received, record = await through(sc, upstream, headers)
        trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
        assert trace_id not in (T, "1" * 32)
        assert upstream_traceparent(received)[0] == trace_id
        assert TRACEPARENT.encode() not in received.head
        assert other.encode() not in received.head
        assert record["trace_id"] == trace_id


@pytest.mark.parametrize(
    "value",
    [f"cc-{T}-{P}-01-what-the-future-will-be-like", f"cc-{T}-{P}-01"],
    ids=["with-more-fields", "55-characters"],
)
async def test_future_version_traceparent_keeps_its_trace_id(
    upstream: RawUpstream, value: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response, received, record = await through(sc, upstream, [("traceparent", value)])
        assert one(response.header("X-Trace-Id")) == T
        forwarded = parse_traceparent(one(received.header("traceparent")))
        assert forwarded is not None
        assert (forwarded.trace_id, forwarded.sampled) == (T, True)
        assert record["trace_id"] == T


async def test_absent_traceparent_starts_a_new_random_trace(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        seen = set()
        for _ in range(3):
            response, received, record = await through(sc, upstream, [])
            trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
            new_trace, new_parent, _ = upstream_traceparent(received)
            assert new_trace == trace_id == record["trace_id"]
            assert record["span_id"] == new_parent
            seen.add(trace_id)
        assert len(seen) == 3


# --- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "flags"), [("0.0", "00"), ("1.0", "01")])
async def test_new_traces_follow_sample_ratio(
    upstream: RawUpstream, ratio: str, flags: str
) -> None:
    config = tracing_config(upstream.url, f"tracing:\n  sample_ratio: {ratio}\n")
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
        for _ in range(20):
            _, received, record = await through(sc, upstream, [])
            assert upstream_traceparent(received)[2] == flags
            assert record["trace_flags"] == flags


@pytest.mark.parametrize(
    ("ratio", "traceparent", "flags"),
    [("0.0", TRACEPARENT, "01"), ("1.0", UNSAMPLED_TRACEPARENT, "00")],
    ids=["sampled-parent-ratio-0", "unsampled-parent-ratio-1"],
)
async def test_parent_sampling_decision_wins_over_the_ratio(
    upstream: RawUpstream, ratio: str, traceparent: str, flags: str
) -> None:
    config = tracing_config(upstream.url, f"tracing:\n  sample_ratio: {ratio}\n")
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
        for _ in range(5):
            response, received, record = await through(sc, upstream, [("traceparent", traceparent)])
            assert one(response.header("X-Trace-Id")) == T
            assert received.header("traceparent") == [traceparent]
            assert record["trace_flags"] == flags


# --- tracestate --------------------------------------------------------------------------------


def ts_members(count: int, width: int, prefix: str = "k") -> list[str]:
    out = []
    for index in range(count):
        key = f"{prefix}{index:03d}"
        out.append(f"{key}={'v' * (width - len(key) - 1)}")
    return out


_FORTY = ts_members(40, 8)
_SHORT = ts_members(4, 30, "s")
_LONG = ts_members(3, 200, "l")
_OVER_512 = [_SHORT[0], _LONG[0], _SHORT[1], _LONG[1], _SHORT[2], _LONG[2], _SHORT[3]]

TRACESTATE_CASES = [
    (
        "forwarded",
        ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
        ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
    ),
    ("lines combined", ["rojo=1", "congo=2"], ["rojo=1,congo=2"]),
    ("empty members ignored", ["rojo=1,,congo=2, ,"], ["rojo=1,congo=2"]),
    ("bad key dropped", ["rojo=1,Congo=2"], []),
    ("duplicate key dropped", ["rojo=1,rojo=2"], []),
    ("duplicate key across lines dropped", ["rojo=1", "rojo=2"], []),
    ("bad value characters dropped", ["rojo=a=b"], []),
    ("over 32 members cut to 32", [",".join(_FORTY)], [",".join(_FORTY[:32])]),
    (
        "over 512 characters: long members first",
        [",".join(_OVER_512)],
        [",".join([_SHORT[0], _LONG[0], _SHORT[1], _SHORT[2], _SHORT[3]])],
    ),
]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [pytest.param(lines, expected, id=name) for name, lines, expected in TRACESTATE_CASES],
)
async def test_tracestate_travels_cleaned_with_a_valid_traceparent(
    upstream: RawUpstream, lines: list[str], expected: list[str]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        headers = [("traceparent", TRACEPARENT)] + [("tracestate", line) for line in lines]
        _, received, _ = await through(sc, upstream, headers)
        assert received.header("traceparent") == [TRACEPARENT]
        assert received.header("tracestate") == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("tracestate", "rojo=00f067aa0ba902b7")],
        [("traceparent", f"00-{T.upper()}-{P}-01"), ("tracestate", "rojo=00f067aa0ba902b7")],
    ],
    ids=["no-traceparent", "invalid-traceparent"],
)
async def test_tracestate_without_a_valid_traceparent_is_dropped(
    upstream: RawUpstream, headers: HeaderList
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        _, received, _ = await through(sc, upstream, headers)
        assert received.header("tracestate") == []
        assert b"rojo" not in received.head


# --- B3 in --------------------------------------------------------------------------------------

B3T = "80f198ee56343ba864fe8b2a57d3eff7"
B3S = "e457b5a2e4d86bd1"
B3P = "05e3ac9a4f6e3b90"
B3T64 = "a3ce929d0e0e4736"

B3_ACCEPTED = [
    ("single sampled", [("b3", f"{B3T}-{B3S}-1")], "0.0", B3T, "01"),
    ("single not sampled", [("b3", f"{B3T}-{B3S}-0")], "1.0", B3T, "00"),
    ("single debug", [("b3", f"{B3T}-{B3S}-d")], "0.0", B3T, "01"),
    ("single with parent", [("b3", f"{B3T}-{B3S}-1-{B3P}")], "0.0", B3T, "01"),
    ("single deferred, ratio 0", [("b3", f"{B3T}-{B3S}")], "0.0", B3T, "00"),
    ("single deferred, ratio 1", [("b3", f"{B3T}-{B3S}")], "1.0", B3T, "01"),
    ("single 64-bit trace id", [("b3", f"{B3T64}-{B3S}-1")], "1.0", "0" * 16 + B3T64, "01"),
    (
        "multi sampled",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "1")],
        "0.0",
        B3T,
        "01",
    ),
    (
        "multi not sampled",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "0")],
        "1.0",
        B3T,
        "00",
    ),
    (
        "multi debug flag",
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Flags", "1")],
        "0.0",
        B3T,
        "01",
    ),
    (
        "multi 64-bit trace id",
        [("X-B3-TraceId", B3T64), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "1")],
        "1.0",
        "0" * 16 + B3T64,
        "01",
    ),
]


@pytest.mark.parametrize(
    ("headers", "ratio", "trace_id", "flags"),
    [pytest.param(h, r, t, f, id=name) for name, h, r, t, f in B3_ACCEPTED],
)
async def test_b3_is_accepted_without_a_traceparent(
    upstream: RawUpstream, headers: HeaderList, ratio: str, trace_id: str, flags: str
) -> None:
    config = tracing_config(upstream.url, f"tracing:\n  sample_ratio: {ratio}\n")
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
        response, received, record = await through(sc, upstream, headers)
        assert one(response.header("X-Trace-Id")) == trace_id
        # No span export: the app's parent is the B3 caller's span.
        assert upstream_traceparent(received) == (trace_id, B3S, flags)
        assert (record["trace_id"], record["trace_flags"]) == (trace_id, flags)


@pytest.mark.parametrize(
    "b3",
    [
        [("b3", f"{B3T}-{B3S}-0")],
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "0")],
    ],
    ids=["single", "multi"],
)
async def test_b3_is_ignored_when_a_valid_traceparent_is_present(
    upstream: RawUpstream, b3: HeaderList
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response, received, record = await through(
            sc, upstream, [("traceparent", TRACEPARENT), *b3]
        )
        assert one(response.header("X-Trace-Id")) == T
        assert received.header("traceparent") == [TRACEPARENT]
        assert (record["trace_id"], record["trace_flags"]) == (T, "01")


@pytest.mark.parametrize(
    "b3",
    [
        [("b3", f"{B3T}-{B3S}-1")],
        [("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "1")],
        [("b3", "1")],
    ],
    ids=["single", "multi", "bare-decision"],
)
async def test_b3_accept_false_ignores_b3(upstream: RawUpstream, b3: HeaderList) -> None:
    yaml = "tracing:\n  sample_ratio: 0.0\n  b3: {accept: false}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response, received, record = await through(sc, upstream, b3)
        trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
        assert trace_id != B3T
        new_trace, new_parent, flags = upstream_traceparent(received)
        assert (new_trace, flags) == (trace_id, "00")  # the ratio decided, not B3
        assert new_parent != B3S
        assert record["trace_flags"] == "00"


@pytest.mark.parametrize(
    ("value", "ratio", "flags"),
    [("0", "1.0", "00"), ("1", "0.0", "01"), ("d", "0.0", "01")],
    ids=["b3-0-ratio-1", "b3-1-ratio-0", "b3-d-ratio-0"],
)
async def test_bare_b3_sampling_decision_for_a_new_trace(
    upstream: RawUpstream, value: str, ratio: str, flags: str
) -> None:
    config = tracing_config(upstream.url, f"tracing:\n  sample_ratio: {ratio}\n")
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
        trace_ids = set()
        for _ in range(3):
            response, received, record = await through(sc, upstream, [("b3", value)])
            trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
            assert upstream_traceparent(received)[::2] == (trace_id, flags)
            assert record["trace_flags"] == flags
            trace_ids.add(trace_id)
        assert len(trace_ids) == 3  # a new trace each time


# --- B3 out -------------------------------------------------------------------------------------

EMIT_INPUTS = [
    ("new trace", "1.0", []),
    ("new unsampled trace", "0.0", []),
    ("valid traceparent", "1.0", [("traceparent", TRACEPARENT)]),
    ("unsampled traceparent", "1.0", [("traceparent", UNSAMPLED_TRACEPARENT)]),
    (
        "incoming b3 of both forms",
        "1.0",
        [
            ("b3", f"{B3T}-{B3S}-1-{B3P}"),
            ("X-B3-TraceId", B3T),
            ("X-B3-SpanId", B3S),
            ("X-B3-ParentSpanId", B3P),
            ("X-B3-Sampled", "1"),
        ],
    ),
]
B3_NAMES = ("b3", "X-B3-TraceId", "X-B3-SpanId", "X-B3-ParentSpanId", "X-B3-Sampled", "X-B3-Flags")


@pytest.mark.parametrize(
    ("ratio", "headers"),
    [pytest.param(r, h, id=name) for name, r, h in EMIT_INPUTS],
)
async def test_b3_emit_single_matches_the_traceparent(
    upstream: RawUpstream, ratio: str, headers: HeaderList
) -> None:
    yaml = f"tracing:\n  sample_ratio: {ratio}\n  b3: {{emit: single}}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response, received, _ = await through(sc, upstream, headers)
        trace_id, parent_id, flags = upstream_traceparent(received)
        assert trace_id == one(response.header("X-Trace-Id"))
        sampled = "1" if flags == "01" else "0"
        assert received.header("b3") == [f"{trace_id}-{parent_id}-{sampled}"]
        for name in B3_NAMES[1:]:
            assert received.header(name) == [], name


@pytest.mark.parametrize(
    ("ratio", "headers"),
    [pytest.param(r, h, id=name) for name, r, h in EMIT_INPUTS],
)
async def test_b3_emit_multi_matches_the_traceparent(
    upstream: RawUpstream, ratio: str, headers: HeaderList
) -> None:
    yaml = f"tracing:\n  sample_ratio: {ratio}\n  b3: {{emit: multi}}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response, received, _ = await through(sc, upstream, headers)
        trace_id, parent_id, flags = upstream_traceparent(received)
        assert trace_id == one(response.header("X-Trace-Id"))
        assert received.header("X-B3-TraceId") == [trace_id]
        assert received.header("X-B3-SpanId") == [parent_id]
        assert received.header("X-B3-Sampled") == ["1" if flags == "01" else "0"]
        for name in ("b3", "X-B3-ParentSpanId", "X-B3-Flags"):
            assert received.header(name) == [], name


# --- routes with tracing off ---------------------------------------------------------------------


async def test_route_with_tracing_disabled_adds_and_changes_nothing(
    upstream: RawUpstream,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + (
            "  b3: {emit: multi}\n"
            "routes:\n"
            "  - name: plain\n"
            "    match: {path_prefix: /plain}\n"
            "    tracing: {enabled: false}\n"
            "  - name: traced\n"
            "    match: {path_prefix: /}\n"
        )
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            # No trace context in: none is added.
            response, received, _ = await through(sc, upstream, [], "/plain/a")
            assert response.header("X-Trace-Id") == []
            assert len(one(response.header("X-Request-Id"))) > 0
            assert received.header("traceparent") == []
            for name in B3_NAMES:
                assert received.header(name) == [], name

            # A traceparent and tracestate in: forwarded exactly as sent.
            state = "rojo=1,,congo=2"  # would be normalised by the tracing policy
            headers = [("traceparent", TRACEPARENT), ("tracestate", state)]
            response, received, _ = await through(sc, upstream, headers, "/plain/b")
            assert response.header("X-Trace-Id") == []
            assert one(response.header("X-Request-Id"))
            assert received.header("traceparent") == [TRACEPARENT]
            assert received.header("tracestate") == [state]
            assert received.header("X-B3-TraceId") == []

            # The traced route, same config: the sidecar's own span becomes the parent.
            response, received, _ = await through(sc, upstream, headers, "/traced")
            assert one(response.header("X-Trace-Id")) == T
            trace_id, parent_id, flags = upstream_traceparent(received)
            assert (trace_id, flags) == (T, "01") and parent_id != P
            assert received.header("X-B3-TraceId") == [T]
