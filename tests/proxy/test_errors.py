"""Upstream failures become documented problem responses (docs/errors.md) and are counted;
bodies over the limit are refused; a client leaving cancels the upstream request; a
response that breaks after its headers reaches the client visibly truncated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import aiohttp
from aiohttp import web

from tests.proxy.conftest import (
    TEST_TIMEOUT,
    RawExchange,
    RawResponse,
    TapUpstream,
    connection,
    exchange,
    metric_value,
    parse_head,
    read_response,
    scripted_upstream,
    wait_until,
)
from tests.support import (
    RawUpstream,
    RunningSidecar,
    app_with,
    free_port,
    run_app,
    run_sidecar,
    sidecar_config,
)

ERRORS = "sidecar_upstream_errors_total"
PROBLEM = "urn:sidecar:problem:"


def assert_problem(response: RawResponse, status: int, slug: str) -> dict[str, object]:
    """The response is the documented problem+json, and its request_id is the header's."""
    assert response.status == status, response.body
    assert response.header("Content-Type") == ["application/problem+json"]
    assert response.header("Cache-Control") == ["no-store"]
    problem = response.json()
    assert problem["type"] == PROBLEM + slug
    assert isinstance(problem["title"], str) and problem["title"]
    assert problem["status"] == status
    request_ids = response.header("X-Request-Id")
    assert len(request_ids) == 1
    assert problem["request_id"] == request_ids[0]
    return problem


async def get(sc: RunningSidecar, path: str = "/") -> RawResponse:
    return await exchange(
        sc.port, f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode()
    )


# -- 17: upstream failures ----------------------------------------------------------------


async def test_connection_refused_is_502_connect_failed() -> None:
    closed_port = free_port()  # bound then released: nothing listens there
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(f"http://127.0.0.1:{closed_port}")) as sc:
            response = await get(sc)
            assert_problem(response, 502, "upstream-connect-failed")
            assert await metric_value(sc.admin_url, ERRORS, route="default", kind="connect") == 1
            assert await metric_value(sc.admin_url, ERRORS, route="default", kind="reset") == 0


@contextlib.contextmanager
def unanswered_listener() -> Iterator[int]:
    """A port whose connects hang: a listener with a full accept queue (Linux then drops
    further SYNs), the local stand-in for an app that is not picking up."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout_is_502_connect_failed() -> None:
    with unanswered_listener() as port:
        config = sidecar_config(f"http://127.0.0.1:{port}")
        config = replace(config, upstream=replace(config.upstream, connect_timeout=0.2))
        async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await get(sc)
            elapsed = loop.time() - started
            assert_problem(response, 502, "upstream-connect-failed")
            assert 0.2 <= elapsed < 2.0, elapsed
            labels = {"route": "default"}
            assert await metric_value(sc.admin_url, ERRORS, kind="connect_timeout", **labels) == 1
            assert await metric_value(sc.admin_url, ERRORS, kind="timeout", **labels) == 0


async def test_slow_upstream_is_504_timeout() -> None:
    never = asyncio.Event()
    arrived = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        arrived.set()
        await never.wait()
        return web.Response(text="too late")

    routes = "routes:\n  - name: slow\n    match: {path_prefix: /}\n    timeout: 200ms\n"
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_app(app_with({"/": stall})) as url:
            try:
                async with run_sidecar(sidecar_config(url, routes)) as sc:
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    response = await get(sc)
                    elapsed = loop.time() - started
                    assert arrived.is_set()
                    assert_problem(response, 504, "upstream-timeout")
                    assert 0.2 <= elapsed < 2.0, elapsed
                    assert (
                        await metric_value(sc.admin_url, ERRORS, route="slow", kind="timeout") == 1
                    )
            finally:
                never.set()  # let the app's handler end so the app shuts down at once


async def test_upload_longer_than_route_timeout_is_not_a_timeout() -> None:
    received: list[int] = []

    async def consume(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        received.append(size)
        return web.Response(text=str(size))  # answers at once once the body is in

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"u" * 1000
            # The behaviour under test is duration: the upload as a whole (0.8 s) outlasts
            # the route's 300 ms timeout, while the app never keeps anyone waiting.
            await asyncio.sleep(0.2)

    routes = "routes:\n  - name: upload\n    match: {path_prefix: /}\n    timeout: 300ms\n"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_app(app_with({"/up": consume})) as url,
        run_sidecar(sidecar_config(url, routes)) as sc,
        aiohttp.ClientSession() as client,
        client.post(sc.url + "/up", data=slow_body(), headers={"Content-Length": "4000"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert await resp.text() == "4000"
    assert received == [4000]


async def test_upstream_closing_without_response_is_502_reset() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(lambda exchange: None) as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
        ):
            response = await get(sc)
            assert_problem(response, 502, "upstream-reset")
            assert await metric_value(sc.admin_url, ERRORS, route="default", kind="reset") == 1
            assert await metric_value(sc.admin_url, ERRORS, route="default", kind="connect") == 0
    assert upstream.exchanges, "the upstream never saw the request"


async def test_unparseable_response_is_502_bad_response() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(lambda exchange: b"HTTP/1.1 abc\r\n\r\n") as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
        ):
            response = await get(sc)
            assert_problem(response, 502, "upstream-bad-response")
            assert (
                await metric_value(sc.admin_url, ERRORS, route="default", kind="bad_response") == 1
            )


async def test_query_string_not_logged_by_default_even_on_errors() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(lambda exchange: b"HTTP/1.1 abc\r\n\r\n") as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
        ):
            response = await get(sc, "/login?token=QUERY-SECRET")
            assert response.status == 502
            await wait_until(lambda: any(r.get("event") == "access" for r in sc.log.records))
            records = list(sc.log.records)
    assert any(r.get("event") == "upstream.error" for r in records)
    assert "QUERY-SECRET" not in json.dumps(records)


async def test_reset_after_a_streamed_body_never_resends_a_different_body() -> None:
    # PUT is idempotent, so the sidecar's client may retry it once after a reset. A retry is
    # fine only with the very same body: the client's body was streamed and is gone.
    body = b"the one and only body"
    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(lambda exchange: None) as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
        ):
            response = await exchange(
                sc.port,
                b"PUT /doc HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            )
            # Every connection the sidecar opened has been closed by now.
            await wait_until(lambda: upstream.closed.is_set())
    assert_problem(response, 502, "upstream-reset")
    assert upstream.exchanges
    for seen in upstream.exchanges:
        assert seen.request_line == b"PUT /doc HTTP/1.1"
        assert seen.body == body


async def test_body_over_max_body_with_content_length_is_413(raw_upstream: RawUpstream) -> None:
    routes = "routes:\n  - name: small\n    match: {path_prefix: /}\n    max_body: 1KiB\n"
    body = b"x" * 2048
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, routes)) as sc:
            response = await exchange(
                sc.port,
                b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            )
    problem = assert_problem(response, 413, "body-too-large")
    assert problem["max_body"] == 1024
    assert raw_upstream.exchanges == []


async def test_refused_body_is_never_read_as_a_request(raw_upstream: RawUpstream) -> None:
    # The refused body holds a complete request: it must be skipped as body bytes (or the
    # connection closed), never parsed as a second request and forwarded.
    routes = "routes:\n  - name: small\n    match: {path_prefix: /}\n    max_body: 1KiB\n"
    inner = b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"
    body = inner + b"x" * (2000 - len(inner))
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_sidecar(sidecar_config(raw_upstream.url, routes)) as sc,
        connection(sc.port) as (reader, writer),
    ):
        writer.write(b"POST /up HTTP/1.1\r\nHost: app\r\nContent-Length: 2000\r\n\r\n" + body)
        refused = await read_response(reader)
        assert refused.status == 413
        # Whatever the sidecar does with the connection next, the smuggled GET is not sent.
        writer.write(b"GET /next HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            following = await read_response(reader)
            assert following.status == 200
    assert b"/smuggled" not in b"".join(e.request_line for e in raw_upstream.exchanges)


async def test_body_exactly_max_body_is_accepted(raw_upstream: RawUpstream) -> None:
    routes = "routes:\n  - name: small\n    match: {path_prefix: /}\n    max_body: 1KiB\n"
    body = b"x" * 1024
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, routes)) as sc:
            response = await exchange(
                sc.port,
                b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            )
    assert response.status == 200
    assert raw_upstream.exchanges[0].body == body


async def test_chunked_body_over_max_body_is_413_before_any_upstream_connection() -> None:
    # The body is buffered (request_buffer 64 KiB) before a connection is taken, so an
    # oversized one is refused without the upstream ever seeing a byte of it.
    routes = "routes:\n  - name: small\n    match: {path_prefix: /}\n    max_body: 1KiB\n"
    chunk = b"y" * 512
    framed = b"".join(b"200\r\n%s\r\n" % chunk for _ in range(8)) + b"0\r\n\r\n"
    upstream = await TapUpstream().start()
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            async with run_sidecar(sidecar_config(upstream.url, routes)) as sc:
                response = await exchange(
                    sc.port,
                    b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + framed,
                )
                problem = assert_problem(response, 413, "body-too-large")
                assert problem["max_body"] == 1024
    finally:
        await upstream.stop()
    assert upstream.data == [], "the upstream was contacted for a body that was refused"


async def test_streamed_chunked_body_over_max_body_is_413_and_not_forwarded_whole() -> None:
    # With buffering off the body streams; past max_body the upstream request is abandoned.
    routes = (
        "routes:\n  - name: small\n    match: {path_prefix: /}\n    max_body: 1KiB\n"
        "    request_buffer: 0\n"
    )
    chunk = b"y" * 512
    framed = b"".join(b"200\r\n%s\r\n" % chunk for _ in range(8)) + b"0\r\n\r\n"
    first, rest = framed[:517], framed[517:]  # one whole chunk, then the others
    upstream = await TapUpstream().start()
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            async with run_sidecar(sidecar_config(upstream.url, routes)) as sc:
                async with connection(sc.port) as (reader, writer):
                    writer.write(
                        b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + first
                    )
                    # The body streams: the upstream sees its start before the rest exists.
                    await wait_until(lambda: any(b"y" * 512 in data for data in upstream.data))
                    writer.write(rest)
                    response = await read_response(reader)
                problem = assert_problem(response, 413, "body-too-large")
                assert problem["max_body"] == 1024
                # The upstream request is abandoned: its connection is closed.
                await wait_until(lambda: upstream.closed.is_set())
    finally:
        await upstream.stop()
    received = b"".join(upstream.data)
    _, _, sent_body = received.partition(b"\r\n\r\n")
    payload = sent_body.replace(b"\r\n", b"").replace(b"200", b"")
    assert payload.count(b"y") <= 1024
    assert not sent_body.endswith(b"0\r\n\r\n"), "the upstream got a complete chunked body"


# -- 18: the client going away cancels the upstream request -------------------------------


async def test_client_disconnect_cancels_upstream_request() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="unreachable")

    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            run_app(app_with({"/wait": forever}), handler_cancellation=True) as url,
            run_sidecar(sidecar_config(url)) as sc,
        ):
            async with connection(sc.port) as (_, writer):
                writer.write(b"GET /wait HTTP/1.1\r\nHost: app\r\n\r\n")
                await writer.drain()
                await started.wait()
            # The client's socket is closed here.
            async with asyncio.timeout(5):
                await cancelled.wait()


async def test_client_disconnect_mid_upload_aborts_upstream_request() -> None:
    first_bytes = asyncio.Event()
    aborted = asyncio.Event()

    async def consume(request: web.Request) -> web.Response:
        try:
            async for _ in request.content.iter_any():
                first_bytes.set()
        except (asyncio.CancelledError, ConnectionError):
            aborted.set()
            raise
        return web.Response(text="complete?")  # reached only if the body looked complete

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_app(app_with({"/up": consume}), handler_cancellation=True) as url,
        run_sidecar(sidecar_config(url)) as sc,
    ):
        async with connection(sc.port) as (_, writer):
            writer.write(b"PUT /up HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\n")
            writer.write(b"p" * 1000)
            await writer.drain()
            await first_bytes.wait()
        # The client left after 1000 of 100000 bytes: the app must not be left waiting for
        # the rest, nor be handed a short body as if it were complete.
        async with asyncio.timeout(5):
            await aborted.wait()


async def test_client_disconnect_mid_response_stops_upstream() -> None:
    stopped = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(100_000):  # ~6 GiB: far more than any buffer on the way
                await response.write(b"x" * 65536)
        except (asyncio.CancelledError, ConnectionError):
            stopped.set()
            raise
        return response

    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            run_app(app_with({"/endless": endless}), handler_cancellation=True) as url,
            run_sidecar(sidecar_config(url)) as sc,
        ):
            async with connection(sc.port) as (reader, writer):
                writer.write(b"GET /endless HTTP/1.1\r\nHost: app\r\n\r\n")
                await reader.readexactly(256 * 1024)
            # The client is gone mid-body: the app must stop being read from.
            async with asyncio.timeout(5):
                await stopped.wait()


# -- 19: failures after the response has started ------------------------------------------


async def _read_until_closed(reader: asyncio.StreamReader) -> tuple[RawResponse, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, headers = parse_head(head)
    rest = await reader.read()  # returns only when the sidecar closes the connection
    return RawResponse(status_line, headers, rest, rest), rest


async def test_truncated_content_length_body_stays_truncated() -> None:
    def short(exchange: RawExchange) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"0123456789"

    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(short, close_after=True) as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
        ):
            async with connection(sc.port) as (reader, writer):
                writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
                response, body = await _read_until_closed(reader)
            assert response.status == 200
            assert response.header("Content-Length") == ["1000"]
            assert body == b"0123456789"  # < 1000 and the connection was closed
            await wait_until_metric(sc, "stream", 1)


async def test_truncated_chunked_body_has_no_final_chunk() -> None:
    def short(exchange: RawExchange) -> bytes:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"

    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(short, close_after=True) as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
        ):
            async with connection(sc.port) as (reader, writer):
                writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
                response, body = await _read_until_closed(reader)
            assert response.header("Transfer-Encoding") == ["chunked"]
            assert b"0123456789" in body
            # A last-chunk would tell the client the body was complete.
            assert not body.endswith(b"0\r\n\r\n"), body
            await wait_until_metric(sc, "stream", 1)


async def test_truncated_body_raises_in_an_http_client() -> None:
    def short(exchange: RawExchange) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"0123456789"

    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            scripted_upstream(short, close_after=True) as upstream,
            run_sidecar(sidecar_config(upstream.url)) as sc,
            aiohttp.ClientSession() as client,
            client.get(sc.url + "/") as resp,
        ):
            assert resp.status == 200
            raised = None
            try:
                await resp.read()
            except aiohttp.ClientPayloadError as exc:
                raised = exc
            assert raised is not None, "a short body was accepted as complete"


async def test_stalled_stream_past_idle_timeout_is_cut() -> None:
    release = asyncio.Event()

    async def stall_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100
        await response.prepare(request)
        await response.write(b"x" * 10)
        await release.wait()
        with contextlib.suppress(ConnectionError):
            await response.write(b"y" * 90)
        return response

    routes = "routes:\n  - name: stream\n    match: {path_prefix: /}\n    idle_timeout: 200ms\n"
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_app(app_with({"/": stall_midway})) as url:
            try:
                async with run_sidecar(sidecar_config(url, routes)) as sc:
                    async with connection(sc.port) as (reader, writer):
                        writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
                        response, body = await _read_until_closed(reader)
                    assert response.header("Content-Length") == ["100"]
                    assert body == b"x" * 10
                    await wait_until_metric(sc, "stream", 1, route="stream")
            finally:
                release.set()


async def wait_until_metric(
    sc: RunningSidecar, kind: str, expected: float, route: str = "default"
) -> None:
    """The error counter is bumped as the handler unwinds, right after the cut: poll it."""
    async with asyncio.timeout(5):
        while await metric_value(sc.admin_url, ERRORS, route=route, kind=kind) != expected:
            await asyncio.sleep(0.02)
