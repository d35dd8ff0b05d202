"""Core hardening: slow clients hold no upstream connection, a request head has a deadline,
client connections are capped, Connection cannot strip managed headers, only chunked
framing is accepted, a 500 can follow 100 Continue, a reload never leaves a stream hanging
and never exceeds the connection budget, and readiness never queues behind the pool."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import aiohttp
from aiohttp import web

from sidecar.chain import ProxyRequest, ProxyResponse
from sidecar.routing import RouteTable
from tests.proxy.conftest import (
    TEST_TIMEOUT,
    TapUpstream,
    connection,
    exchange,
    metric_value,
    read_response,
    wait_until,
)
from tests.proxy.test_errors import assert_problem
from tests.support import (
    RawUpstream,
    RunningSidecar,
    app_with,
    run_app,
    run_sidecar,
    sidecar_config,
)


@asynccontextmanager
async def tap() -> AsyncIterator[TapUpstream]:
    upstream = await TapUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.stop()


# -- slow clients ------------------------------------------------------------------------


async def test_a_small_body_is_read_whole_before_an_upstream_connection_is_taken() -> None:
    async with tap() as upstream, run_sidecar(sidecar_config(upstream.url)) as sc:  # noqa: SIM117
        async with connection(sc.port) as (_reader, writer):
            writer.write(b"POST /slow HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n")
            writer.write(b"x" * 50)
            await writer.drain()
            # Half the body is in and the handler is running (it has nothing to await but
            # the rest of the body): it holds no upstream connection slot and has sent nothing.
            await wait_until(
                lambda: sc.sidecar.metrics.in_flight.labels("default")._value.get() == 1
            )
            assert sc.sidecar.budget.in_use == 0
            assert upstream.data == [], "the stalled upload took an upstream connection"
            writer.write(b"x" * 50)
            await writer.drain()
            await wait_until(lambda: len(upstream.data) == 1)
            await wait_until(lambda: upstream.data[0].endswith(b"x" * 100))
            writer.close()


async def test_a_large_upload_slower_than_min_upload_rate_is_cut_with_408() -> None:
    routes = (
        "routes:\n  - name: up\n    match: {path_prefix: /}\n"
        "    request_buffer: 1KiB\n    body_timeout: 300ms\n    min_upload_rate: 1MiB\n"
    )
    async with tap() as upstream, run_sidecar(sidecar_config(upstream.url, routes)) as sc:
        async with connection(sc.port) as (reader, writer):
            writer.write(b"PUT /big HTTP/1.1\r\nHost: app\r\nContent-Length: 1000000\r\n\r\n")
            writer.write(b"y" * 4096)
            await writer.drain()
            async with asyncio.timeout(TEST_TIMEOUT):
                response = await read_response(reader)  # the client sends nothing more
        problem = assert_problem(response, 408, "request-body-timeout")
        assert "min_upload_rate" in str(problem["detail"])
        assert response.header("Connection") == ["close"]
        # The upstream request that had started streaming is abandoned, not left open.
        await wait_until(lambda: upstream.closed.is_set(), timeout=TEST_TIMEOUT)


async def test_a_request_head_that_never_completes_is_answered_408_and_closed() -> None:
    async with tap() as upstream:
        config = sidecar_config(upstream.url, header_timeout=0.3)
        async with run_sidecar(config) as sc:
            async with connection(sc.port) as (reader, writer):
                writer.write(b"GET /slowloris HTTP/1.1\r\nHost: app\r\nX-A: ")
                await writer.drain()
                async with asyncio.timeout(TEST_TIMEOUT):
                    response = await read_response(reader)
                    assert await reader.read() == b""  # and the connection ends
            assert_problem(response, 408, "request-head-timeout")
            closed = await metric_value(
                sc.admin_url, "sidecar_client_connections_closed_total", reason="header_timeout"
            )
            assert closed == 1
        assert upstream.data == []


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout() -> None:
    async with tap() as upstream:
        config = sidecar_config(upstream.url, header_timeout=0.3, keepalive_timeout=60.0)
        async with run_sidecar(config) as sc, connection(sc.port) as (reader, _):
            async with asyncio.timeout(TEST_TIMEOUT):
                assert await reader.read() == b""  # closed without an answer


async def test_a_kept_alive_connection_gets_a_fresh_head_deadline_per_request(
    raw_upstream: RawUpstream,
) -> None:
    config = sidecar_config(raw_upstream.url, header_timeout=0.5)
    async with run_sidecar(config) as sc, connection(sc.port) as (reader, writer):
        for _ in range(3):
            writer.write(b"GET /again HTTP/1.1\r\nHost: app\r\n\r\n")
            async with asyncio.timeout(TEST_TIMEOUT):
                assert (await read_response(reader)).status == 200
        # A next head that starts but stalls is timed out on its own deadline.
        writer.write(b"GET /stall HTTP/1.1\r\n")
        async with asyncio.timeout(TEST_TIMEOUT):
            assert_problem(await read_response(reader), 408, "request-head-timeout")


async def test_connections_past_max_connections_get_503_and_are_closed(
    raw_upstream: RawUpstream,
) -> None:
    async with run_sidecar(sidecar_config(raw_upstream.url, max_connections=2)) as sc:
        async with connection(sc.port) as (r1, w1), connection(sc.port) as (r2, w2):
            # Both are served (the sidecar has accepted them) before the third arrives.
            for reader, writer in ((r1, w1), (r2, w2)):
                writer.write(b"GET /held HTTP/1.1\r\nHost: app\r\n\r\n")
                async with asyncio.timeout(TEST_TIMEOUT):
                    assert (await read_response(reader)).status == 200
            async with connection(sc.port) as (r3, _):
                async with asyncio.timeout(TEST_TIMEOUT):
                    response = await read_response(r3)
                    assert await r3.read() == b""
            assert_problem(response, 503, "too-many-connections")
            rejected = await metric_value(
                sc.admin_url, "sidecar_client_connections_closed_total", reason="over_limit"
            )
            assert rejected == 1
            assert await metric_value(sc.admin_url, "sidecar_client_connections") == 2
        # Once they are gone, new connections are served again.
        await wait_until(lambda: len(sc.sidecar._proxy_server.connections) == 0)  # type: ignore[union-attr]
        response = await exchange(sc.port, b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        assert response.status == 200


# -- framing and identity ----------------------------------------------------------------


async def test_connection_naming_managed_headers_is_400_and_never_forwarded(
    raw_upstream: RawUpstream,
) -> None:
    async with run_sidecar(sidecar_config(raw_upstream.url)) as sc:
        for named in ("host, content-length", "X-Forwarded-Host", "x-request-id", "x-org-id"):
            response = await exchange(
                sc.port,
                b"POST /orders HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n"
                b"Connection: keep-alive, " + named.encode() + b"\r\n\r\nhi",
            )
            problem = assert_problem(response, 400, "bad-request")
            assert "Connection" in str(problem["detail"])
            assert response.header("X-Trace-Id")
        # Naming an ordinary header is still fine: that header is dropped as hop-by-hop.
        response = await exchange(
            sc.port,
            b"GET /ok HTTP/1.1\r\nHost: app\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n",
        )
        assert response.status == 200
    assert len(raw_upstream.exchanges) == 1
    assert raw_upstream.exchanges[0].header("X-Hop") == []


async def test_a_transfer_coding_other_than_chunked_is_501(raw_upstream: RawUpstream) -> None:
    async with run_sidecar(sidecar_config(raw_upstream.url)) as sc:
        response = await exchange(
            sc.port,
            b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
        )
    assert_problem(response, 501, "transfer-coding-not-implemented")
    assert response.header("Connection") == ["close"]
    assert raw_upstream.exchanges == []


async def _failing_after_continue(request: ProxyRequest) -> ProxyResponse:
    await request.read_body(1024)  # sends 100 Continue
    raise RuntimeError("a bug after the client was told to continue")


async def test_an_internal_error_after_100_continue_still_answers_500(
    raw_upstream: RawUpstream,
) -> None:
    async with run_sidecar(sidecar_config(raw_upstream.url)) as sc:
        runtime = sc.sidecar.holder.runtime
        route = replace(runtime.routes.routes[0], chain=_failing_after_continue)
        sc.sidecar.holder.runtime = replace(runtime, routes=RouteTable([route]))
        async with connection(sc.port) as (reader, writer):
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            async with asyncio.timeout(TEST_TIMEOUT):
                interim = await read_response(reader)
                assert interim.status == 100
                writer.write(b"hi")
                response = await read_response(reader)
    assert_problem(response, 500, "internal-error")


# -- reloads: retired pools --------------------------------------------------------------


class HeldStream:
    """An app whose /stream sends a first chunk, then waits until the test releases it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.peak = 0
        self._open = 0
        self.requests = 0

    def app(self) -> web.Application:
        return app_with({"/stream": self.stream, "/{tail:.*}": self.plain})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first|")
        self.started.set()
        await self.release.wait()
        await response.write(b"last")
        await response.write_eof()
        return response

    async def plain(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text="new")


def _config_file(upstream_url: str, max_connections: int, grace: str) -> str:
    text = (
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n"
        f"  shutdown_grace: {grace}\n"
        f"upstream:\n  url: {upstream_url}\n  max_connections: {max_connections}\n"
    )
    handle, path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    return path


async def _reload_to(sc: RunningSidecar, path: str, upstream_url: str, **kw: object) -> None:
    with open(path, "w") as f:
        f.write(
            "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n"
            f"  shutdown_grace: {kw.get('grace', '300ms')}\n"
            f"upstream:\n  url: {upstream_url}\n"
            f"  max_connections: {kw.get('max_connections', 8)}\n"
        )
    assert sc.sidecar.reload(forced=True)


async def _stream_start(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: app\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def test_a_reload_that_changes_the_upstream_cuts_streams_left_at_the_deadline() -> None:
    old, new = HeldStream(), HeldStream()
    async with run_app(old.app()) as old_url, run_app(new.app()) as new_url:
        path = _config_file(old_url, 8, "300ms")
        config = sidecar_config(old_url)
        try:
            async with run_sidecar(config, path) as sc:
                reader, writer = await _stream_start(sc.port)
                await old.started.wait()
                await _reload_to(sc, path, new_url, grace="300ms")
                # New requests go to the new upstream at once.
                response = await exchange(sc.port, b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
                assert response.body == b"new"
                # The old stream never finishes: at the deadline the client sees its
                # connection end (not a hang), and the request stops counting as in flight.
                async with asyncio.timeout(TEST_TIMEOUT):
                    rest = await reader.read()
                assert b"last" not in rest
                writer.close()
                await wait_until(lambda: not sc.sidecar._retired, timeout=TEST_TIMEOUT)
                in_flight = await metric_value(
                    sc.admin_url, "sidecar_in_flight_requests", route="default"
                )
                assert in_flight == 0
        finally:
            old.release.set()
            os.unlink(path)


async def test_a_retired_pool_lets_requests_under_way_finish_then_closes() -> None:
    old, new = HeldStream(), HeldStream()
    async with run_app(old.app()) as old_url, run_app(new.app()) as new_url:
        path = _config_file(old_url, 8, "30s")
        try:
            async with run_sidecar(sidecar_config(old_url), path) as sc:
                reader, writer = await _stream_start(sc.port)
                await old.started.wait()
                retiring = sc.sidecar.forwarder
                await _reload_to(sc, path, new_url, grace="30s")
                old.release.set()
                async with asyncio.timeout(TEST_TIMEOUT):
                    body = await reader.readuntil(b"0\r\n\r\n")
                assert body.endswith(b"last\r\n0\r\n\r\n")
                writer.close()
                # Its last request done, the old pool closes long before its grace ends.
                await wait_until(lambda: not sc.sidecar._retired, timeout=TEST_TIMEOUT)
                assert retiring.pool.closed and retiring.pool.open_connections == 0
        finally:
            old.release.set()
            os.unlink(path)


async def test_old_and_new_pools_together_stay_within_max_connections() -> None:
    old, new = HeldStream(), HeldStream()
    async with run_app(old.app()) as old_url, run_app(new.app()) as new_url:
        path = _config_file(old_url, 1, "30s")
        config = sidecar_config(old_url)
        config = replace(config, upstream=replace(config.upstream, max_connections=1))
        try:
            async with run_sidecar(config, path) as sc:
                _reader, writer = await _stream_start(sc.port)
                await old.started.wait()
                await _reload_to(sc, path, new_url, max_connections=1, grace="30s")
                waiting = asyncio.create_task(
                    exchange(sc.port, b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
                )
                # The only slot is held by the old stream: the new request waits for it.
                await wait_until(lambda: sc.sidecar.budget.in_use == 1)
                await asyncio.sleep(0)
                assert not waiting.done() and new.requests == 0
                old.release.set()
                async with asyncio.timeout(TEST_TIMEOUT):
                    response = await waiting
                assert response.body == b"new"
                assert new.requests == 1
                writer.close()
        finally:
            old.release.set()
            os.unlink(path)


# -- readiness ---------------------------------------------------------------------------


async def test_readiness_has_its_own_connection_when_the_pool_is_full() -> None:
    app = HeldStream()
    async with run_app(app.app()) as url:
        config = sidecar_config(url, "")
        config = replace(
            config,
            upstream=replace(config.upstream, max_connections=1, health_path="/healthz"),
        )
        try:
            async with run_sidecar(config) as sc:
                _reader, writer = await _stream_start(sc.port)
                await app.started.wait()  # the pool's only connection is taken
                async with aiohttp.ClientSession() as client:
                    async with asyncio.timeout(TEST_TIMEOUT):
                        async with client.get(sc.admin_url + "/ready") as ready:
                            assert ready.status == 200, await ready.text()
                assert app.requests == 1  # the probe's GET /healthz reached the app
                writer.close()
        finally:
            app.release.set()


async def test_a_head_timeout_raises_nothing_in_the_event_loop() -> None:
    errors_seen: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors_seen.append(context))
    try:
        async with tap() as upstream:  # noqa: SIM117
            async with run_sidecar(sidecar_config(upstream.url, header_timeout=0.2)) as sc:
                for partial in (b"", b"GET / HTTP/1.1\r\nHost"):
                    async with connection(sc.port) as (reader, writer):
                        writer.write(partial)
                        async with asyncio.timeout(TEST_TIMEOUT):
                            await reader.read()
                await wait_until(
                    lambda: (
                        sc.sidecar.metrics.client_connections_closed.labels(
                            "header_timeout"
                        )._value.get()
                        == 2
                    )
                )
    finally:
        loop.set_exception_handler(None)
    assert errors_seen == []


async def test_shutdown_lets_an_upload_under_way_finish_and_closes_idle_connections_at_once(
    raw_upstream: RawUpstream,
) -> None:
    config = sidecar_config(raw_upstream.url, shutdown_grace=20.0)
    async with run_sidecar(config) as sc:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", sc.port)
        idle_writer.write(b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n")
        assert (await read_response(idle_reader)).status == 200  # now idle, kept alive
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"PUT /up HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nhalf-")
        await writer.drain()
        await wait_until(lambda: sc.sidecar.metrics.in_flight.labels("default")._value.get() == 1)
        stopping = asyncio.create_task(sc.sidecar.shutdown())
        async with asyncio.timeout(TEST_TIMEOUT):
            # The idle connection is closed at once, not after the upload's grace.
            assert await idle_reader.read() == b""
        writer.write(b"done!")
        async with asyncio.timeout(TEST_TIMEOUT):
            response = await read_response(reader)
            await stopping
        writer.close()
        idle_writer.close()
    assert response.status == 200
    assert raw_upstream.exchanges[-1].body == b"half-done!"


async def test_a_reload_does_not_fail_a_request_still_sending_its_body() -> None:
    old, new = HeldStream(), HeldStream()
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(text="old")

    async with run_app(app_with({"/{t:.*}": record})) as old_url, run_app(new.app()) as new_url:
        path = _config_file(old_url, 8, "30s")
        try:
            async with run_sidecar(sidecar_config(old_url), path) as sc:
                reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
                writer.write(b"PUT /u HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nhalf-")
                await writer.drain()
                await wait_until(
                    lambda: sc.sidecar.metrics.in_flight.labels("default")._value.get() == 1
                )
                await _reload_to(sc, path, new_url, grace="30s")
                writer.write(b"done!")
                async with asyncio.timeout(TEST_TIMEOUT):
                    response = await read_response(reader)
                writer.close()
                # It finished on the pool it started on; that pool then closed.
                await wait_until(lambda: not sc.sidecar._retired, timeout=TEST_TIMEOUT)
        finally:
            old.release.set()
            os.unlink(path)
    assert response.status == 200 and response.body == b"old"
    assert seen == [b"half-done!"]
