"""What the docs promise about requests: a client that stalls mid-body gets 408
`request-body-timeout` after the route's `idle_timeout`; `upstream.url`'s path is prepended to
every forwarded path; problem bodies carry `trace_id` (the X-Trace-Id value) except on a route
with tracing off, and always `request_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from sidecar.errors import CATALOGUE, CLIENT_STALLED
from tests.proxy.conftest import connection, metric_samples, read_response, wait_until
from tests.support import (
    RawUpstream,
    free_port,
    raw_request,
    run_sidecar,
    sidecar_config,
    split_response,
)

TEST_TIMEOUT = 10.0
PROBLEM = "urn:sidecar:problem:"


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    server = await RawUpstream().start()
    try:
        yield server
    finally:
        await server.stop()


# --- a client that stalls mid-body ------------------------------------------------------------

STALL_ROUTE = """\
routes:
  - name: upload
    match: {path_prefix: /}
    idle_timeout: 200ms
"""


def test_the_stalled_client_problem_is_the_documented_one() -> None:
    assert CLIENT_STALLED in CATALOGUE
    assert (CLIENT_STALLED.slug, CLIENT_STALLED.status) == ("request-body-timeout", 408)


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(1000, 10), (4 * 1024 * 1024, 256 * 1024)],
    ids=["small-body", "streamed-body"],
)
async def test_a_client_that_stalls_mid_body_gets_408_request_body_timeout(
    upstream: RawUpstream, declared: int, sent: int
) -> None:
    config = sidecar_config(upstream.url, STALL_ROUTE)
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
        async with connection(sc.port) as (reader, writer):
            head = f"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: {declared}\r\n\r\n"
            writer.write(head.encode() + b"x" * sent)
            await writer.drain()
            # ...and nothing more: the sidecar must give up on the body by itself.
            response = await read_response(reader)
            assert response.status == 408
            assert response.header("Content-Type") == ["application/problem+json"]
            assert response.header("Connection") == ["close"]
            body = response.json()
            assert body["type"] == PROBLEM + "request-body-timeout"
            assert body["status"] == 408
            assert body["request_id"] == response.header("X-Request-Id")[0]
            # The connection cannot carry another request: once the rest of the body is in
            # (read and dropped), it is closed, and a request sent after it gets no answer.
            with contextlib.suppress(ConnectionError):
                writer.write(b"x" * (declared - sent) + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
                await writer.drain()
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        request_id = response.header("X-Request-Id")[0]
        await wait_until(
            lambda: any(
                r.get("event") == "access" and r.get("request_id") == request_id
                for r in sc.log.records
            )
        )
        events = [r for r in sc.log.records if r.get("request_id") == request_id]
        assert [(r["event"], r.get("status")) for r in events] == [("access", 408)]
        # Not counted as an upstream error.
        errors = await metric_samples(sc.admin_url, "sidecar_upstream_errors_total")
        assert all(value == 0 for value in errors.values())
    # The app never got the (incomplete) request as a whole.
    assert upstream.exchanges == []


# --- the upstream base path -------------------------------------------------------------------


@pytest.mark.parametrize("base", ["/base", "/base/", "/base/v1"])
@pytest.mark.parametrize(("target", "suffix"), [("/orders?x=1&x=2", "/orders?x=1&x=2"), ("/", "/")])
async def test_the_upstream_url_path_is_prepended_to_every_forwarded_path(
    upstream: RawUpstream, base: str, target: str, suffix: str
) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_sidecar(sidecar_config(upstream.url + base)) as sc,
    ):
        request = f"GET {target} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        reply = await raw_request(sc.port, request.encode())
        assert split_response(reply)[0] == b"HTTP/1.1 200 OK"
    (exchange,) = upstream.exchanges
    expected = base.rstrip("/") + suffix
    assert exchange.request_line == f"GET {expected} HTTP/1.1".encode()


# --- trace_id and request_id in problem bodies -----------------------------------------------

UNTRACED = """\
routes:
  - name: untraced
    match: {path_prefix: /untraced}
    tracing: {enabled: false}
  - name: traced
    match: {path_prefix: /traced}
"""


async def problem(port: int, raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    reply = await raw_request(port, raw)
    status_line, headers, body = split_response(reply)
    names = {name.lower(): value for name, value in headers}
    assert names["content-type"] == "application/problem+json"
    return int(status_line.split(b" ")[1]), names, json.loads(body)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n".encode()


async def test_problem_bodies_carry_the_trace_id_except_on_untraced_routes() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # every forwarded request gets a 502
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(closed, UNTRACED)) as sc:
        for path, slug in (
            ("/traced/x", "upstream-connect-failed"),
            ("/nowhere", "route-not-found"),
        ):
            status, headers, body = await problem(sc.port, get(path))
            assert body["type"] == PROBLEM + slug
            assert body["trace_id"] == headers["x-trace-id"]
            assert body["request_id"] == headers["x-request-id"]

        status, headers, body = await problem(sc.port, get("/untraced/x"))
        assert (status, body["type"]) == (502, PROBLEM + "upstream-connect-failed")
        assert "trace_id" not in body and "x-trace-id" not in headers
        assert body["request_id"] == headers["x-request-id"]

        # Refused by the HTTP parser, before any route: a new trace id all the same.
        bad = b"GET /traced HTTP/1.1\r\nHost: a\r\nX-Bad: \x01\r\n\r\n"
        status, headers, body = await problem(sc.port, bad)
        assert (status, body["type"]) == (400, PROBLEM + "bad-request")
        assert body["trace_id"] == headers["x-trace-id"]
        assert body["request_id"] == headers["x-request-id"]
        refused = [r for r in sc.log.records if r.get("event") == "request.refused"]
        assert [r["trace_id"] for r in refused] == [body["trace_id"]]
