"""The quota policy while the link to Redis fails: a FaultProxy (tests/fault_proxy.py) sits
between the sidecar and a real redis-server, and each test blackholes it.

- `closed`: 503 temporary-reduced-capacity, the app never called, degraded gauge and
  events; once the link heals the store admits again and the degradation ends;
- `open`: requests go to the app unchecked, counted as fallbacks;
- `local` with `replicas: 2`: the in-process limiter holds each organisation to
  limit / replicas;
- the failed store is skipped with back-off: a burst costs a probe or two, not one
  timeout per request, and one request at a time probes.

Faults need Redis: the memory store has none, so every test runs on Redis only. Counts are
read straight from the real server, never through the proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDictProxy

from tests.fault_proxy import FaultProxy, Mode
from tests.proxy.conftest import metric_value
from tests.support import RunningSidecar, run_app, run_sidecar, sidecar_config

PROBLEM = "urn:sidecar:problem:"
ROUTE = "r"
# A short store timeout, so a blackholed Redis fails fast.
STATE_TIMEOUT = 0.2
# Faults and back-off last seconds: each test is bounded, generously for a loaded machine.
FAULT_TEST_TIMEOUT = 25.0
# How long recovery may take: the back-off is at most 5 s, plus a probe's timeout.
RECOVERY_DEADLINE = 12.0

ADMIT_CALLS = "sidecar_store_request_duration_seconds_count"
STORE_ERRORS = "sidecar_store_errors_total"
FALLBACKS = "sidecar_ratelimit_store_fallbacks_total"
DEGRADED = "sidecar_ratelimit_degraded"


@dataclass
class App:
    """The app behind the sidecar: answers 201 and counts what reaches it."""

    calls: int = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.calls += 1
            return web.Response(status=201, text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: dict[str, object] | None
    seconds: float


@dataclass
class FaultEnv:
    app: App
    sidecar: RunningSidecar
    proxy: FaultProxy
    session: aiohttp.ClientSession
    redis: aioredis.Redis
    replies: list[Reply] = field(default_factory=list)

    async def post(self, org: str = "acme") -> Reply:
        started = time.monotonic()
        async with self.session.post(
            self.sidecar.url + "/orders", headers={"X-Org-Id": org}
        ) as response:
            body = await response.json(content_type=None) if response.status != 201 else None
            reply = Reply(response.status, response.headers, body, time.monotonic() - started)
        self.replies.append(reply)
        return reply

    async def metric(self, name: str, **labels: str) -> float:
        return await metric_value(self.sidecar.admin_url, name, **labels)

    async def store_attempts(self) -> float:
        """quota_admit calls sent to Redis (the in-process fallback store is not observed)."""
        return await self.metric(ADMIT_CALLS, operation="quota_admit")

    async def store_timeouts(self) -> float:
        return await self.metric(STORE_ERRORS, operation="quota_admit", kind="timeout")

    async def fallbacks(self, action: str) -> float:
        return await self.metric(FALLBACKS, route=ROUTE, action=action)

    async def degraded(self) -> float:
        return await self.metric(DEGRADED, route=ROUTE)

    def events(self, name: str) -> list[dict[str, object]]:
        return [r for r in self.sidecar.log.records if r.get("event") == name]

    async def store_keys(self, org: str) -> list[str]:
        """The rate-limit counters of `org` on the real server (read past the proxy)."""
        keys = await self.redis.keys(f"sidecar:rl:{{o:{org}}}:*")
        return sorted(key.decode() if isinstance(key, bytes) else key for key in keys)


FaultEnvFactory = Callable[[str], Awaitable[FaultEnv]]


def route_yaml(state_url: str, quotas: str) -> str:
    return (
        f'state:\n  url: "{state_url}"\n  timeout: {int(STATE_TIMEOUT * 1000)}ms\n'
        f"routes:\n  - name: {ROUTE}\n    match: {{path_prefix: /}}\n"
        f"    quotas: {quotas}\n"
    )


@pytest.fixture
async def fault_env(redis_url: str) -> AsyncIterator[FaultEnvFactory]:
    """`await fault_env("{...quotas...}")`: a sidecar whose Redis is behind a FaultProxy."""
    port = urlsplit(redis_url).port
    assert port is not None
    stack = AsyncExitStack()

    async def make(quotas: str) -> FaultEnv:
        proxy = await stack.enter_async_context(FaultProxy(port))
        app = App()
        upstream = await stack.enter_async_context(run_app(app.app()))
        config = sidecar_config(upstream, route_yaml(proxy.redis_url(), quotas))
        sidecar = await stack.enter_async_context(run_sidecar(config))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        direct = aioredis.from_url(redis_url)
        stack.push_async_callback(direct.aclose)
        # First thing at teardown: nothing may hang the sidecar's shutdown.
        stack.callback(proxy.resume)
        return FaultEnv(app, sidecar, proxy, session, direct)

    try:
        yield make
    finally:
        await stack.aclose()


async def eventually(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = RECOVERY_DEADLINE
) -> None:
    """Poll `predicate` every 50 ms until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def hourly(limit: int, **extra: str) -> str:
    settings = "".join(f", {key}: {value}" for key, value in extra.items())
    return f"{{limits: [{{name: hourly, kind: rate, limit: {limit}, window: 1h}}]{settings}}}"


# -- closed ---------------------------------------------------------------------------------


async def test_closed_answers_503_while_redis_is_down_and_recovers_once_it_answers(
    fault_env: FaultEnvFactory,
) -> None:
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(hourly(100, on_store_error="closed"))
        assert await env.degraded() == 0
        env.proxy.blackhole(drop_abandoned=True)

        for _ in range(3):
            reply = await env.post()
            assert reply.status == 503
            assert reply.headers["Content-Type"].startswith("application/problem+json")
            assert reply.body is not None
            assert reply.body["type"] == PROBLEM + "temporary-reduced-capacity"
            assert reply.body["status"] == 503
            assert reply.headers["Retry-After"] == "1"
            assert "RateLimit" not in reply.headers
        assert env.app.calls == 0, "a request was forwarded while the limits were unknown"
        assert await env.fallbacks("closed") == 3
        assert await env.fallbacks("open") == 0
        assert await env.fallbacks("local") == 0
        assert await env.degraded() == 1
        [degraded] = env.events("quota.degraded")
        assert degraded["route"] == ROUTE
        assert env.events("quota.recovered") == []
        [error, *_] = env.events("quota.store_error")
        assert (error["route"], error["kind"], error["action"]) == (ROUTE, "timeout", "closed")
        assert await env.store_keys("acme") == []

        env.proxy.pass_through()
        assert env.proxy.mode is Mode.PASS

        async def admitted() -> bool:
            return (await env.post()).status == 201

        await eventually(admitted, "the store to admit a request again")
        refused = [r for r in env.replies if r.status != 201]
        assert all(r.status == 503 for r in refused)
        last = env.replies[-1]
        # Decided by the store: rate-limit headers, and a counter on the real server.
        assert last.headers["RateLimit-Policy"] == '"hourly";q=100;w=3600'
        assert last.headers["RateLimit"].startswith('"hourly";r=')
        assert len(await env.store_keys("acme")) == 1
        assert env.app.calls == 1
        assert await env.degraded() == 0
        [recovered] = env.events("quota.recovered")
        assert recovered["route"] == ROUTE
        assert len(env.events("quota.degraded")) == 1
        # Only the refused requests were decided without the store.
        assert await env.fallbacks("closed") == len(refused)

        # And it stays recovered: the next requests go to the store, and are admitted.
        before = await env.store_attempts()
        assert [(await env.post()).status for _ in range(3)] == [201, 201, 201]
        assert await env.store_attempts() == before + 3
        assert await env.fallbacks("closed") == len(refused)
        assert env.app.calls == 4


# -- open -----------------------------------------------------------------------------------


async def test_open_forwards_every_request_unchecked_while_redis_is_down(
    fault_env: FaultEnvFactory,
) -> None:
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(hourly(3, on_store_error="open"))
        env.proxy.blackhole(drop_abandoned=True)

        replies = [await env.post() for _ in range(8)]
        # Twice the limit, and more, all through: nothing was enforced.
        assert [r.status for r in replies] == [201] * 8
        assert env.app.calls == 8
        for reply in replies:
            assert "RateLimit" not in reply.headers
            assert "RateLimit-Policy" not in reply.headers
        assert await env.fallbacks("open") == 8
        assert await env.fallbacks("closed") == 0
        assert await env.fallbacks("local") == 0
        assert await env.degraded() == 1
        assert len(env.events("quota.degraded")) == 1
        assert await env.store_keys("acme") == []


# -- local ----------------------------------------------------------------------------------


async def test_local_holds_each_org_to_the_limit_divided_by_replicas_while_redis_is_down(
    fault_env: FaultEnvFactory,
) -> None:
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(hourly(10, on_store_error="local", replicas="2"))
        env.proxy.blackhole(drop_abandoned=True)

        acme = [await env.post("acme") for _ in range(6)]
        assert [r.status for r in acme] == [201] * 5 + [429]
        for reply in acme[:5]:
            assert reply.headers["RateLimit-Policy"] == '"hourly";q=5;w=3600'
        assert [r.headers["RateLimit"].split(";")[1] for r in acme[:5]] == [
            "r=4",
            "r=3",
            "r=2",
            "r=1",
            "r=0",
        ]
        refused = acme[5]
        assert refused.body is not None
        assert refused.body["type"] == PROBLEM + "quota-exceeded"
        assert refused.body["violated-policies"] == ["hourly"]
        # One unit of 5 an hour refills every 720 s.
        assert 1 <= int(refused.headers["Retry-After"]) <= 720

        other = [await env.post("other") for _ in range(6)]
        assert [r.status for r in other] == [201] * 5 + [429]
        assert env.app.calls == 10
        assert await env.fallbacks("local") == 12
        assert await env.fallbacks("open") == 0
        assert await env.fallbacks("closed") == 0
        assert await env.degraded() == 1
        assert len(env.events("quota.degraded")) == 1
        # Charged locally: nothing reached the real server.
        assert await env.store_keys("acme") == []
        assert await env.store_keys("other") == []


# -- back-off -------------------------------------------------------------------------------


async def test_a_failed_store_is_skipped_so_a_burst_costs_a_few_probes_not_one_timeout_each(
    fault_env: FaultEnvFactory,
) -> None:
    """Without the skip, each of the N requests would wait a whole state timeout."""
    burst = 50
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(hourly(1000, on_store_error="closed"))
        assert await env.store_attempts() == 0
        env.proxy.blackhole(drop_abandoned=True)

        first = await env.post()
        assert first.status == 503
        assert first.seconds >= STATE_TIMEOUT * 0.9  # it waited for the store
        assert await env.store_attempts() == 1
        assert await env.store_timeouts() == 1

        started = time.monotonic()
        replies = [await env.post() for _ in range(burst)]
        elapsed = time.monotonic() - started
        assert [r.status for r in replies] == [503] * burst
        probes = await env.store_attempts() - 1
        # Back-off 0.5 s, 1 s, 2 s...: a couple of probes fit in a slow burst, never 50.
        assert probes <= 4, f"{probes:g} store calls for {burst} requests"
        assert await env.store_timeouts() == 1 + probes
        assert elapsed < burst * STATE_TIMEOUT / 2, f"{burst} requests took {elapsed:.2f} s"
        fast = [r for r in replies if r.seconds < STATE_TIMEOUT * 0.9]
        assert len(fast) >= burst - probes
        assert await env.fallbacks("closed") == 1 + burst
        assert len(env.events("quota.degraded")) == 1
        assert env.app.calls == 0


async def test_after_the_back_off_one_request_at_a_time_probes_the_store(
    fault_env: FaultEnvFactory,
) -> None:
    concurrent = 20
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(hourly(1000, on_store_error="closed"))
        env.proxy.blackhole(drop_abandoned=True)
        assert (await env.post()).status == 503
        failed_at = time.monotonic()
        assert await env.store_attempts() == 1

        # The first back-off (0.5 s) runs out: time passing, not a synchronisation.
        await asyncio.sleep(max(0.0, failed_at + 0.6 - time.monotonic()))
        replies = await asyncio.gather(*(env.post() for _ in range(concurrent)))
        assert [r.status for r in replies] == [503] * concurrent
        # One probe for the whole burst; its failure restarts (and doubles) the skip.
        assert await env.store_attempts() == 2
        assert await env.store_timeouts() == 2
        assert await env.fallbacks("closed") == 1 + concurrent
        assert len(env.events("quota.degraded")) == 1


async def test_a_refusal_made_by_the_local_fallback_is_not_held_against_the_recovered_store(
    fault_env: FaultEnvFactory,
) -> None:
    """The local limiter is stricter (limit / replicas) than the store: once Redis answers
    again, the store decides, not a refusal the fallback made."""
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(hourly(10, on_store_error="local", replicas="2"))
        env.proxy.blackhole(drop_abandoned=True)
        statuses = [(await env.post()).status for _ in range(7)]
        assert statuses == [201] * 5 + [429, 429]
        # Each refusal was the local limiter's, not a remembered one.
        assert await env.fallbacks("local") == 7

        env.proxy.pass_through()
        local_before = await env.fallbacks("local")
        healed = len(env.replies)

        async def admitted() -> bool:
            return (await env.post()).status == 201

        await eventually(admitted, "the recovered store to admit the organisation")
        after = env.replies[healed:]
        refused = [r for r in after if r.status == 429]
        # Every refusal after the heal was the local limiter's, while the store was still
        # skipped; none was a remembered local refusal standing in for the store.
        assert await env.fallbacks("local") - local_before == len(refused)
        assert after[-1].headers["RateLimit-Policy"] == '"hourly";q=10;w=3600'
        assert await env.degraded() == 0
