"""What the core offers policies (docs/architecture.md): an outcome per request, aclose(),
replayable bodies, deadlines, the origin of responses, and state that survives reloads.

Each test puts a small policy of its own in front of the real forwarder of a running
sidecar, the way a retry, breaker or quota policy will sit there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from aiohttp import web

from sidecar.chain import (
    Failure,
    Next,
    Origin,
    Outcome,
    Policy,
    ProxyRequest,
    ProxyResponse,
    build_chain,
)
from sidecar.policies import PolicyState
from sidecar.routing import RouteTable
from tests.proxy.conftest import (
    TEST_TIMEOUT,
    connection,
    exchange,
    scripted_upstream,
)
from tests.support import RunningSidecar, app_with, free_port, run_app, run_sidecar, sidecar_config


def install(sc: RunningSidecar, policy: Policy) -> None:
    """Put `policy` in front of the forwarder on every route of the running sidecar."""
    runtime = sc.sidecar.holder.runtime
    routes = [
        replace(route, chain=build_chain([policy], sc.sidecar.forwarder.for_route(route.config)))
        for route in runtime.routes.routes
    ]
    sc.sidecar.holder.runtime = replace(runtime, routes=RouteTable(routes))


class Outcomes:
    """A policy that only records each request's outcome."""

    def __init__(self) -> None:
        self.seen: list[Outcome] = []
        self.arrived = asyncio.Event()

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        request.add_finisher(self._record)
        return await call_next(request)

    def _record(self, outcome: Outcome) -> None:
        self.seen.append(outcome)
        self.arrived.set()

    async def one(self) -> Outcome:
        async with asyncio.timeout(TEST_TIMEOUT):
            await self.arrived.wait()
        assert len(self.seen) == 1
        return self.seen[0]


@asynccontextmanager
async def sidecar_for(app: web.Application, yaml: str = "") -> AsyncIterator[RunningSidecar]:
    async with run_app(app) as url, run_sidecar(sidecar_config(url, yaml)) as sc:
        yield sc


def _plain(text: str) -> Callable[[web.Request], object]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=text + (await request.text()))

    return handler


# -- the outcome -------------------------------------------------------------------------


async def test_a_complete_response_has_an_ok_outcome_with_its_bytes() -> None:
    outcomes = Outcomes()
    async with sidecar_for(app_with({"/{t:.*}": _plain("echo:")})) as sc:  # type: ignore[dict-item]
        install(sc, outcomes)
        response = await exchange(
            sc.port, b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert response.body == b"echo:abc"
        outcome = await outcomes.one()
    assert outcome.ok
    assert (outcome.status, outcome.failure, outcome.origin) == (200, Failure.NONE, Origin.APP)
    assert (outcome.bytes_in, outcome.bytes_out) == (3, len(b"echo:abc"))
    assert outcome.request_sent and outcome.duration > 0


async def test_a_stream_broken_midway_is_not_a_success() -> None:
    def respond(_: object) -> bytes:
        # Promises 100 bytes, sends 5, then the connection closes.
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"

    outcomes = Outcomes()
    async with (
        scripted_upstream(respond, close_after=True) as upstream,  # type: ignore[arg-type]
        run_sidecar(sidecar_config(upstream.url)) as sc,
    ):
        install(sc, outcomes)
        async with connection(sc.port) as (reader, writer):
            writer.write(b"GET /s HTTP/1.1\r\nHost: app\r\n\r\n")
            async with asyncio.timeout(TEST_TIMEOUT):
                await reader.read()  # truncated, then cut
        outcome = await outcomes.one()
    assert outcome.status == 200 and outcome.failure == Failure.STREAM
    assert not outcome.ok and outcome.request_sent


async def test_a_connect_failure_says_nothing_reached_the_upstream() -> None:
    outcomes = Outcomes()
    async with run_sidecar(sidecar_config(f"http://127.0.0.1:{free_port()}")) as sc:
        install(sc, outcomes)
        response = await exchange(sc.port, b"DELETE /x HTTP/1.1\r\nHost: app\r\n\r\n")
        assert response.status == 502
        outcome = await outcomes.one()
    assert outcome.failure == Failure.CONNECT
    assert outcome.origin is Origin.SIDECAR
    assert not outcome.request_sent


async def test_a_client_that_leaves_mid_response_is_client_gone() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"part")
        await release.wait()
        return response

    outcomes = Outcomes()
    try:
        async with sidecar_for(app_with({"/{t:.*}": slow})) as sc:
            install(sc, outcomes)
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            writer.write(b"GET /s HTTP/1.1\r\nHost: app\r\n\r\n")
            await reader.readuntil(b"part")
            writer.transport.abort()
            outcome = await outcomes.one()
            release.set()  # before the app's server is stopped
    finally:
        release.set()
    assert outcome.failure == Failure.CLIENT_GONE and outcome.status == 499


# -- aclose ------------------------------------------------------------------------------


class TwiceWithAclose:
    """Sends the request, discards the answer with aclose(), sends it again (a retry)."""

    def __init__(self) -> None:
        self.first: ProxyResponse | None = None

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        self.first = await call_next(request)
        await self.first.aclose()
        return await call_next(request)


async def test_aclose_frees_the_upstream_connection_of_a_streamed_response() -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"z" * 65536)  # far more than fits in any buffer
        return response

    policy = TwiceWithAclose()
    # One upstream connection in all: the second send needs the first one's back.
    async with run_app(app_with({"/{t:.*}": big})) as url:
        config = sidecar_config(url)
        config = replace(config, upstream=replace(config.upstream, max_connections=1))
        async with run_sidecar(config) as sc:
            install(sc, policy)
            async with connection(sc.port) as (reader, writer):
                writer.write(b"GET /big HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                async with asyncio.timeout(TEST_TIMEOUT):
                    body = await reader.read()
            assert body.count(b"z") == 64 * 65536
            assert sc.sidecar.budget.in_use == 0
    assert policy.first is not None
    assert policy.first.body is None and policy.first.release is None  # discarded once


# -- replayable bodies -------------------------------------------------------------------


async def test_a_buffered_body_is_sent_again_whole() -> None:
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(text="ok")

    async with sidecar_for(app_with({"/{t:.*}": record})) as sc:
        install(sc, TwiceWithAclose())
        response = await exchange(
            sc.port, b"PUT /r HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello"
        )
    assert response.status == 200
    assert seen == [b"hello", b"hello"]


async def test_a_streamed_body_is_never_sent_twice() -> None:
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(text="ok")

    routes = "routes:\n  - name: r\n    match: {path_prefix: /}\n    request_buffer: 0\n"
    replayable: list[bool] = []

    class Check(TwiceWithAclose):
        async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
            replayable.append(request.replayable)
            first = await call_next(request)
            replayable.append(request.replayable)
            await first.aclose()
            return await call_next(request)

    async with sidecar_for(app_with({"/{t:.*}": record}), routes) as sc:
        install(sc, Check())
        response = await exchange(
            sc.port, b"PUT /r HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello"
        )
    assert replayable == [True, False]
    # The second send is refused, not made with an empty body.
    assert response.status == 500
    assert b"cannot be resent" in response.body
    assert seen == [b"hello"]


# -- deadlines ---------------------------------------------------------------------------


async def test_an_attempt_timeout_ends_the_attempt_within_the_request_deadline() -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()
    deadlines: list[float | None] = []

    async def stalls(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="late")

    class PerTry:
        async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
            request.attempt_timeout = 0.2
            response = await call_next(request)
            deadlines.append(request.time_left())
            return response

    try:
        async with sidecar_for(app_with({"/{t:.*}": stalls})) as sc:  # route timeout 15 s
            install(sc, PerTry())
            response = await exchange(sc.port, b"GET /t HTTP/1.1\r\nHost: app\r\n\r\n")
            release.set()  # before the app's server is stopped
    finally:
        release.set()
    assert arrived.is_set()
    assert response.status == 504
    # The request's own deadline (the route timeout) is still most of 15 s away.
    assert deadlines and deadlines[0] is not None and 5.0 < deadlines[0] <= 15.0


async def test_a_deadline_already_past_is_answered_without_waiting() -> None:
    class Late:
        async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
            request.deadline = asyncio.get_running_loop().time() - 1.0
            return await call_next(request)

    async with sidecar_for(app_with({"/{t:.*}": _plain("x")})) as sc:  # type: ignore[dict-item]
        install(sc, Late())
        response = await exchange(sc.port, b"GET /t HTTP/1.1\r\nHost: app\r\n\r\n")
    assert response.status in (503, 504)


# -- origin ------------------------------------------------------------------------------


async def test_every_response_says_where_it_came_from() -> None:
    origins: list[Origin] = []

    class Look:
        async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
            response = await call_next(request)
            origins.append(response.origin)
            return response

    routes = "routes:\n  - name: small\n    match: {path_prefix: /}\n    max_body: 10\n"
    async with sidecar_for(app_with({"/ok": _plain("ok")}), routes) as sc:  # type: ignore[dict-item]
        install(sc, Look())
        assert (await exchange(sc.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
        too_big = b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n" + b"b" * 20
        assert (await exchange(sc.port, too_big)).status == 413
    assert origins == [Origin.APP, Origin.SIDECAR]


# -- state that survives a reload --------------------------------------------------------


def test_policy_state_is_kept_while_its_settings_stay_the_same() -> None:
    state = PolicyState()
    window = state.get("breaker", "orders", ("10s", 20), list)
    assert state.get("breaker", "orders", ("10s", 20), list) is window
    # Changed settings start afresh; another route or policy has its own.
    assert state.get("breaker", "orders", ("5s", 20), list) is not window
    assert state.get("breaker", "users", ("10s", 20), list) is not window
    state.retain(["users"])
    assert len(state) == 1


async def test_a_reload_keeps_policy_state_and_does_not_double_it(tmp_path: object) -> None:
    made: list[object] = []

    def make() -> object:
        made.append(object())
        return made[-1]

    async with run_app(app_with({"/{t:.*}": _plain("ok")})) as url:  # type: ignore[dict-item]
        path = f"{tmp_path}/sidecar.yaml"
        head = f"server:\n  drain: 0s\nupstream:\n  url: {url}\nroutes:\n"
        with open(path, "w") as f:
            f.write(head + "  - name: a\n    match: {path: /a}\n")
        async with run_sidecar(sidecar_config(url), path) as sc:
            first = sc.sidecar.policy_state.get("bulkhead", "a", 10, make)
            with open(path, "a") as f:
                f.write("  - name: b\n    match: {path: /b}\n")
            assert sc.sidecar.reload()
            assert sc.sidecar.policy_state.get("bulkhead", "a", 10, make) is first
            assert len(made) == 1
            with open(path, "w") as f:
                f.write(head + "  - name: b\n    match: {path: /b}\n")
            assert sc.sidecar.reload()
            # Route a is gone: so is its state.
            assert sc.sidecar.policy_state.get("bulkhead", "a", 10, make) is not first


async def test_a_streamed_body_stays_replayable_when_nothing_was_sent() -> None:
    replayable: list[bool] = []

    class Look:
        async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
            response = await call_next(request)
            replayable.append(request.replayable)
            return response

    routes = "routes:\n  - name: r\n    match: {path_prefix: /}\n    request_buffer: 0\n"
    async with run_sidecar(sidecar_config(f"http://127.0.0.1:{free_port()}", routes)) as sc:
        install(sc, Look())
        response = await exchange(
            sc.port, b"PUT /r HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello"
        )
    assert response.status == 502
    # The connection was refused before a byte of the body went out: a retry may send it.
    assert replayable == [True]
