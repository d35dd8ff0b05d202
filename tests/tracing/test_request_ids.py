"""Request ids (kept when valid, else a new UUID4), configurable header names, and the trace
and request id headers on every response, the sidecar's own problem responses included."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from tests.proxy.conftest import RawResponse, TapUpstream, exchange
from tests.support import RawUpstream, RunningSidecar, free_port, run_sidecar
from tests.tracing.conftest import (
    TEST_TIMEOUT,
    TRACE_ID,
    TRACEPARENT,
    HeaderList,
    access_record,
    assert_trace_id,
    build_request,
    one,
    send,
    tracing_config,
)


def assert_uuid4(value: str) -> None:
    parsed = uuid.UUID(value)
    assert parsed.version == 4
    assert str(parsed) == value


@pytest.mark.parametrize(
    "request_id",
    ["req-123", "a", "Ab0_-.:/+=~!#$%&'()*,;<>?@[]^`{|}", "r" * 128],
    ids=["simple", "one-char", "printable-punctuation", "128-chars"],
)
async def test_valid_request_id_is_kept_and_forwarded(
    upstream: RawUpstream, request_id: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response = await send(sc.port, headers=[("X-Request-Id", request_id)])
        assert response.status == 200
        assert response.header("X-Request-Id") == [request_id]
        (received,) = upstream.exchanges
        assert received.header("X-Request-Id") == [request_id]
        record = await access_record(sc, request_id)
        assert record["request_id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    [
        b"r" * 129,
        b"abc\tdef",
        b'abc"def',
        b"abc\\def",
        b"caf\xc3\xa9",
        b"caf\xff",
        b"",
    ],
    ids=["129-chars", "control-char-tab", "double-quote", "backslash", "utf8", "bad-utf8", "empty"],
)
async def test_invalid_request_id_is_replaced_by_a_uuid4(
    upstream: RawUpstream, request_id: bytes
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response = await send(sc.port, headers=[("X-Request-Id", request_id)])
        assert response.status == 200
        new_id = one(response.header("X-Request-Id"))
        assert_uuid4(new_id)
        (received,) = upstream.exchanges
        assert received.header("X-Request-Id") == [new_id]
        if request_id:
            assert b"X-Request-Id: " + request_id + b"\r\n" not in received.head + b"\r\n"
        record = await access_record(sc, new_id)
        assert record["request_id"] == new_id


async def test_missing_request_id_gets_a_new_uuid4_each_time(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        ids = []
        for _ in range(3):
            response = await send(sc.port)
            ids.append(one(response.header("X-Request-Id")))
            assert_uuid4(ids[-1])
            assert upstream.exchanges[-1].header("X-Request-Id") == [ids[-1]]
        assert len(set(ids)) == 3


async def test_configured_header_names(upstream: RawUpstream) -> None:
    yaml = "tracing:\n  request_id_header: X-Correlation-Id\n  trace_id_header: X-Amzn-Trace\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        headers = [("X-Correlation-Id", "corr-1"), ("traceparent", TRACEPARENT)]
        response = await send(sc.port, headers=headers)
        assert response.status == 200
        assert ("X-Correlation-Id", "corr-1") in response.headers  # the name as configured
        assert ("X-Amzn-Trace", TRACE_ID) in response.headers
        assert response.header("X-Correlation-Id") == ["corr-1"]
        assert response.header("X-Amzn-Trace") == [TRACE_ID]
        assert response.header("X-Request-Id") == []
        assert response.header("X-Trace-Id") == []
        (received,) = upstream.exchanges
        assert received.header("X-Correlation-Id") == ["corr-1"]
        assert (await access_record(sc, "corr-1"))["trace_id"] == TRACE_ID

        # The sidecar's own answers use the configured names too.
        problem = await exchange(
            sc.port, b"GET ftp://elsewhere/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert problem.status == 400
        new_id = one(problem.header("X-Correlation-Id"))
        assert_uuid4(new_id)
        trace_id = assert_trace_id(one(problem.header("X-Amzn-Trace")))
        assert problem.header("X-Request-Id") == problem.header("X-Trace-Id") == []
        assert problem.json()["request_id"] == new_id
        assert problem.json()["trace_id"] == trace_id


async def test_upstream_trace_and_request_id_headers_are_replaced(upstream: RawUpstream) -> None:
    upstream.response = (
        b"HTTP/1.1 200 OK\r\nX-Trace-Id: not-the-trace\r\nX-Request-Id: not-the-id\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response = await send(
            sc.port, headers=[("X-Request-Id", "mine"), ("traceparent", TRACEPARENT)]
        )
        assert response.header("X-Trace-Id") == [TRACE_ID]
        assert response.header("X-Request-Id") == ["mine"]


# --- the sidecar's own errors ---------------------------------------------------------------


@dataclass
class ErrorCase:
    status: int
    slug: str
    request: bytes


ROUTES = (
    "routes:\n  - name: app\n    match: {path_prefix: /app}\n    timeout: 200ms\n    max_body: 10\n"
)


@asynccontextmanager
async def error_case(
    kind: str, headers: HeaderList
) -> AsyncIterator[tuple[RunningSidecar, ErrorCase]]:
    """A sidecar set up to answer `kind` itself, and the request that makes it do so."""
    if kind in ("404", "400", "413"):
        async with run_upstream() as url, run_sidecar(tracing_config(url, ROUTES)) as sc:
            if kind == "404":
                case = ErrorCase(404, "route-not-found", build_request("/nowhere", headers=headers))
            elif kind == "400":
                request = build_request("ftp://app.test/app/x", headers=headers)
                case = ErrorCase(400, "bad-request", request)
            else:
                request = build_request("/app/x", method="POST", headers=headers, body=b"x" * 11)
                case = ErrorCase(413, "body-too-large", request)
            yield sc, case
    elif kind == "502":
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        async with run_sidecar(tracing_config(url, ROUTES)) as sc:
            yield (
                sc,
                ErrorCase(502, "upstream-connect-failed", build_request("/app/x", headers=headers)),
            )
    else:
        tap = await TapUpstream().start()  # accepts, reads, never answers
        try:
            async with run_sidecar(tracing_config(tap.url, ROUTES)) as sc:
                yield (
                    sc,
                    ErrorCase(504, "upstream-timeout", build_request("/app/x", headers=headers)),
                )
        finally:
            await tap.stop()


@asynccontextmanager
async def run_upstream() -> AsyncIterator[str]:
    server = await RawUpstream().start()
    try:
        yield server.url
    finally:
        await server.stop()


def assert_ids_on_problem(response: RawResponse, status: int, slug: str) -> dict[str, object]:
    assert response.status == status, response.body
    assert response.header("Content-Type") == ["application/problem+json"]
    problem = response.json()
    assert problem["type"] == "urn:sidecar:problem:" + slug
    assert problem["trace_id"] == one(response.header("X-Trace-Id"))
    assert problem["request_id"] == one(response.header("X-Request-Id"))
    return problem


@pytest.mark.parametrize("kind", ["404", "400", "413", "502", "504"])
async def test_sidecar_errors_carry_trace_and_request_ids(kind: str) -> None:
    headers = [("X-Request-Id", f"err-{kind}"), ("traceparent", TRACEPARENT)]
    async with asyncio.timeout(TEST_TIMEOUT), error_case(kind, headers) as (sc, case):
        response = await exchange(sc.port, case.request)
        problem = assert_ids_on_problem(response, case.status, case.slug)
        assert problem["trace_id"] == TRACE_ID  # the caller's trace, kept
        assert problem["request_id"] == f"err-{kind}"
        record = await access_record(sc, f"err-{kind}")
        assert (record["status"], record["trace_id"]) == (case.status, TRACE_ID)


@pytest.mark.parametrize("kind", ["404", "400", "413", "502", "504"])
async def test_sidecar_errors_of_new_traces_carry_new_ids(kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), error_case(kind, []) as (sc, case):
        response = await exchange(sc.port, case.request)
        problem = assert_ids_on_problem(response, case.status, case.slug)
        assert_trace_id(str(problem["trace_id"]))
        assert_uuid4(str(problem["request_id"]))


@pytest.mark.parametrize("target", ["foo", "x:y", "*"])
async def test_bad_target_rejected_by_the_parser_still_carries_the_ids(
    upstream: RawUpstream, target: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response = await exchange(
            sc.port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
        )
        assert response.status == 400
        assert_trace_id(one(response.header("X-Trace-Id")))
        assert_uuid4(one(response.header("X-Request-Id")))
        assert_ids_on_problem(response, 400, "bad-request")
