"""A shared breaker while the link to Redis fails (a FaultProxy in between): requests never
wait on the store, the breaker keeps deciding on this replica's numbers, the degradation
is a metric and an event, and the sidecar returns to the store by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests.fault_proxy import FaultProxy
from tests.proxy.conftest import metric_value
from tests.support import RunningSidecar, run_app, run_sidecar, sidecar_config

STATE_TIMEOUT = 0.5
TEST_TIMEOUT = 30.0


@dataclass
class App:
    status: int = 200
    calls: int = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.calls += 1
            return web.Response(status=self.status, text="x")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@dataclass
class Env:
    app: App
    sidecar: RunningSidecar
    proxy: FaultProxy
    session: aiohttp.ClientSession

    async def get(self) -> tuple[int, float]:
        started = time.monotonic()
        async with self.session.get(self.sidecar.url + "/") as response:
            await response.read()
            return response.status, time.monotonic() - started

    async def degraded(self) -> float:
        return await metric_value(self.sidecar.admin_url, "sidecar_circuit_degraded", route="r")

    def events(self, name: str) -> list[dict[str, object]]:
        return [r for r in self.sidecar.log.records if r.get("event") == name]


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    port = urlsplit(redis_url).port
    assert port is not None
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(FaultProxy(port))
        app = App()
        upstream = await stack.enter_async_context(run_app(app.app()))
        yaml = (
            f'state:\n  url: "{proxy.redis_url()}"\n  timeout: {int(STATE_TIMEOUT * 1000)}ms\n'
            "routes:\n  - name: r\n    match: {path_prefix: /}\n"
            "    circuit_breaker: {min_requests: 5, failure_rate: 0.5, open_for: 10s,"
            " jitter: 0, flush_interval: 50ms}\n"
        )
        sidecar = await stack.enter_async_context(run_sidecar(sidecar_config(upstream, yaml)))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        stack.callback(proxy.resume)
        yield Env(app, sidecar, proxy, session)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_with_redis_down_the_breaker_decides_locally_and_no_request_waits(
    env: Env,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        assert (await env.get())[0] == 200
        env.proxy.blackhole(drop_abandoned=True)

        async def degraded() -> bool:
            return await env.degraded() == 1

        await eventually(degraded, "the breaker to report the store degraded", 10.0)
        [event] = env.events("breaker.store_degraded")
        assert event["route"] == "r"

        env.app.status = 503
        replies = [await env.get() for _ in range(12)]
        # Opened on this replica's own numbers once min_requests calls were in the window:
        # the first success and four failures (4 of 5 is over the 50 %).
        assert [status for status, _ in replies] == [503] * 12
        assert env.app.calls == 1 + 4
        # No request waited on the blackholed store (its timeout is 0.5 s).
        slowest = max(seconds for _, seconds in replies)
        assert slowest < STATE_TIMEOUT * 0.8, f"a request took {slowest:.3f} s"
        state = await metric_value(env.sidecar.admin_url, "sidecar_circuit_state", route="r")
        assert state == 2

        env.proxy.pass_through()

        async def recovered() -> bool:
            return await env.degraded() == 0

        # The store is retried with back-off (0.5 s, doubling to 10 s).
        await eventually(recovered, "the breaker to return to the store", 15.0)
        assert len(env.events("breaker.store_recovered")) == 1


async def test_an_open_breaker_stays_open_when_redis_goes_down(env: Env) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env.app.status = 503
        assert [(await env.get())[0] for _ in range(5)] == [503] * 5
        assert env.app.calls == 5

        async def the_store_knows() -> bool:
            async with env.session.get(env.sidecar.admin_url + "/breakers") as response:
                [breaker] = (await response.json())["breakers"]
            return bool(breaker["state"] == "open" and breaker["version"] >= 1)

        # Opened here, and the shared state has taken it (a version comes from the store
        # only): nothing is left to tell it.
        await eventually(the_store_knows, "the store to take the opened breaker", 5.0)
        env.proxy.blackhole(drop_abandoned=True)

        async def degraded() -> bool:
            return await env.degraded() == 1

        await eventually(degraded, "the breaker to report the store degraded", 10.0)
        # The in-process store starts from what this replica last saw: still open.
        assert [(await env.get())[0] for _ in range(5)] == [503] * 5
        assert env.app.calls == 5, "the outage closed an open breaker"
        transitions = [(e["from"], e["to"]) for e in env.events("breaker.transition")]
        assert transitions == [("closed", "open")]
