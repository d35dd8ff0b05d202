"""Exactly once while the link to Redis fails: a FaultProxy (tests/fault_proxy.py) sits
between the sidecar and a real redis-server, and each test breaks it at the moment that
matters. Records are read straight from the server, never through the proxy.

- an owner's lease outlives an outage shorter than the lease (renewals retried, not
  skipped to the next slot), and a claim that does run out is counted and logged then;
- a retry waiting for the first request answers 409 when the store goes away, never
  forwards (even with on_store_error: open);
- a claim that landed but whose reply was lost is given back once the store answers;
- the completion written after the response survives a short blip.

The blackholes drop what a client abandons (`drop_abandoned=True`): a call the sidecar
gave up on and whose connection it dropped never lands later, so only the sidecar's own
retries can make a write land.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fault_proxy import FaultProxy, Mode
from tests.idempotency.conftest import (
    ROUTE,
    Backend,
    Env,
    Records,
    Reply,
    Upstream,
    config_text,
    eventually,
)
from tests.proxy.conftest import config_from_yaml, metric_value
from tests.redis_fixture import RedisServer
from tests.support import run_app, run_sidecar

# Faults last seconds: each test is bounded, but by more than TEST_TIMEOUT.
FAULT_TEST_TIMEOUT = 20.0
STATE_TIMEOUT = "200ms"
CLAIMS_LOST = "sidecar_idempotency_claims_lost_total"


class FaultUpstream(Upstream):
    """The recording Upstream, plus a hook run as a `/blip...` handler is about to return
    its answer (after the app's work, before the sidecar sees a byte of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.before_answer: Callable[[], None] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = await super().handle(request)
        if request.path.startswith("/blip") and self.before_answer is not None:
            self.before_answer()
        return response


@dataclass
class FaultEnv(Env):
    proxy: FaultProxy


FaultEnvFactory = Callable[..., Awaitable[FaultEnv]]


@pytest.fixture
async def fault_env(redis_server: RedisServer, redis_url: str) -> AsyncIterator[FaultEnvFactory]:
    """`await fault_env("{...}")`: a sidecar whose Redis is behind a FaultProxy, in front
    of a FaultUpstream; `env.records` reads the real server directly."""
    stack = AsyncExitStack()

    async def make(idempotency: str, **kwargs: Any) -> FaultEnv:
        proxy = await stack.enter_async_context(FaultProxy(redis_server.port))
        upstream = FaultUpstream()
        upstream_url = await stack.enter_async_context(
            run_app(upstream.app(), handler_cancellation=True)
        )
        kwargs.setdefault("state_timeout", STATE_TIMEOUT)
        text = config_text(proxy.redis_url(), upstream_url, idempotency, **kwargs)
        sidecar = await stack.enter_async_context(run_sidecar(config_from_yaml(text)))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        backend = Backend("redis", redis_url, redis_server)
        records = Records(backend, sidecar)
        stack.push_async_callback(records.close)

        def heal() -> None:
            # First thing at teardown: nothing may hang the sidecar's shutdown.
            upstream.release_all()
            proxy.resume()

        stack.callback(heal)
        return FaultEnv(sidecar, upstream, records, session, backend, proxy)

    try:
        yield make
    finally:
        await stack.aclose()


async def until(moment: float) -> None:
    """Let time pass until `moment` (time.monotonic()): a fault's or a lease's duration."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def record_fields(env: Env) -> dict[str, bytes] | None:
    records = await env.records.all()
    assert len(records) <= 1, records
    return next(iter(records.values()), None)


async def claims_lost(env: Env) -> float:
    return await metric_value(env.sidecar.admin_url, CLAIMS_LOST, route=ROUTE)


def upstream_of(env: Env) -> FaultUpstream:
    assert isinstance(env.upstream, FaultUpstream)
    return env.upstream


# -- 1. the owner's lease -------------------------------------------------------------------


async def test_the_lease_outlives_an_outage_that_spans_two_renewals(
    fault_env: FaultEnvFactory,
) -> None:
    """Lease 3 s, renewals due every second: Redis unreachable from 0.5 s to 2.5 s after
    the claim. Retrying each failed renewal until the local deadline keeps the claim; a
    renewal that waits for the next slot (1.0, then 2.2 s) lets it run out at 3 s."""
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env("{lease: 3s}")
        first = asyncio.create_task(env.send("/slow", key="long"))
        await env.wait_executions(1)
        claimed_at = time.monotonic()
        fields = await record_fields(env)
        assert fields is not None and fields["s"] == b"p"
        token = fields["t"]

        await until(claimed_at + 0.5)
        env.proxy.blackhole(drop_abandoned=True)
        await until(claimed_at + 2.5)
        env.proxy.resume()
        await until(claimed_at + 3.3)  # the claim's first 3 s are over

        fields = await record_fields(env)
        assert fields is not None, "the claim ran out while its owner was alive"
        assert (fields["s"], fields["t"]) == (b"p", token)
        retry = await env.send("/slow", key="long")
        assert (retry.status, retry.problem) == (409, "idempotency-in-progress")
        assert env.upstream.executions == 1
        assert await claims_lost(env) == 0

        env.upstream.gate.set()
        one = await first
        assert (one.status, one.replayed) == (201, "false")
        assert await env.records.settled() == [b"c"]
        replay = await env.send("/slow", key="long")
        assert (replay.status, replay.replayed, replay.body) == (201, "true", one.body)
        assert env.upstream.executions == 1


async def test_a_lost_claim_is_counted_and_logged_while_redis_is_still_down(
    fault_env: FaultEnvFactory,
) -> None:
    """Lease 1 s, Redis unreachable from the claim on for 2.5 s: the owner's deadline
    passes unrenewed at 1 s, and the loss is reported then, not when the request ends."""
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env("{lease: 1s}")
        first = asyncio.create_task(env.send("/slow", key="lost"))
        await env.wait_executions(1)
        env.proxy.blackhole(drop_abandoned=True)
        down_at = time.monotonic()

        async def lost_reported() -> bool:
            events = env.events("idempotency.claim_lost")
            return await claims_lost(env) == 1 and len(events) == 1

        # The admin /metrics needs no Redis: polled while the link is down.
        await eventually(lost_reported, "the claim's loss to be counted and logged", 2.3)
        assert env.proxy.mode is Mode.BLACKHOLE
        assert time.monotonic() - down_at < 2.5
        [event] = env.events("idempotency.claim_lost")
        assert event.get("route") == ROUTE

        await until(down_at + 2.5)
        env.proxy.resume()
        env.upstream.gate.set()
        await first
        # Reported once, whatever follows.
        assert await claims_lost(env) == 1
        assert len(env.events("idempotency.claim_lost")) == 1


# -- 3. a waiting retry never fails open ----------------------------------------------------


@pytest.mark.parametrize("on_store_error", ["open", "closed"])
@pytest.mark.parametrize("fault", ["blackhole", "drop_replies"])
async def test_a_waiting_retry_answers_409_when_the_store_goes_away(
    fault_env: FaultEnvFactory, on_store_error: str, fault: str
) -> None:
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env(f"{{lease: 10s, wait: 5s, on_store_error: {on_store_error}}}")
        first = asyncio.create_task(env.send("/slow", key="w"))
        await env.wait_executions(1)
        begins = await env.store_calls("idempotency_begin")
        second = asyncio.create_task(env.send("/slow", key="w"))

        async def second_is_polling() -> bool:
            return await env.store_calls("idempotency_begin") >= begins + 2

        await eventually(second_is_polling, "the retry to wait for the first request")
        assert not second.done()
        if fault == "blackhole":
            env.proxy.blackhole(drop_abandoned=True)
        else:
            env.proxy.drop_replies()
        faulted_at = time.monotonic()

        async def second_settled() -> bool:
            return second.done() or env.upstream.executions > 1

        await eventually(second_settled, "the waiting retry to answer", 3.0)
        assert env.upstream.executions == 1, "the waiting retry was forwarded to the app"
        two = await second
        assert time.monotonic() - faulted_at < 2.5
        assert (two.status, two.problem) == (409, "idempotency-in-progress")

        env.proxy.resume()
        env.upstream.gate.set()
        one = await first
        assert one.status == 201
        assert await env.records.settled() == [b"c"]
        assert env.upstream.executions == 1


# -- 4. a claim whose reply was lost --------------------------------------------------------


async def lost_claim_reply(env: FaultEnv, key: str) -> asyncio.Task[Reply]:
    """A request whose claim lands in Redis while its reply is lost on the way back."""
    env.proxy.drop_replies()
    request = asyncio.create_task(env.send(key=key))

    async def claim_landed() -> bool:
        fields = await record_fields(env)
        return fields is not None and fields.get("s") == b"p"

    await eventually(claim_landed, "the claim to land in Redis", interval=0.002)
    return request


async def given_back_then_runs_once(env: FaultEnv, key: str) -> None:
    async def given_back() -> bool:
        return await env.records.all() == {}

    # The lease is 30 s: only a release can free the key this soon.
    await eventually(given_back, "the lost claim to be given back", 5.0)
    retry = await env.send(key=key)
    assert (retry.status, retry.replayed, retry.n) == (201, "false", 1)
    assert env.upstream.executions == 1


async def test_a_claim_whose_reply_was_lost_is_given_back(fault_env: FaultEnvFactory) -> None:
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env("{lease: 30s, on_store_error: closed}")
        request = await lost_claim_reply(env, "lost-reply")
        reply = await request
        assert (reply.status, reply.problem) == (503, "idempotency-unavailable")
        assert env.upstream.executions == 0
        assert env.proxy.dropped_reply_bytes > 0
        env.proxy.resume()
        await given_back_then_runs_once(env, "lost-reply")


async def test_a_claim_whose_reply_was_lost_is_given_back_once_the_store_answers_again(
    fault_env: FaultEnvFactory,
) -> None:
    """The link dies entirely just after the claim landed: nothing can give it back during
    the outage, and the release goes out once Redis is reachable again."""
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env("{lease: 30s, on_store_error: closed}")
        request = await lost_claim_reply(env, "outage")
        env.proxy.blackhole(drop_abandoned=True)
        reply = await request
        assert (reply.status, reply.problem) == (503, "idempotency-unavailable")
        await asyncio.sleep(1.0)  # the outage goes on
        fields = await record_fields(env)
        assert fields is not None and fields["s"] == b"p"
        assert env.upstream.executions == 0
        env.proxy.resume()
        await given_back_then_runs_once(env, "outage")


async def test_a_client_that_hangs_up_while_its_claims_reply_is_lost_frees_the_key(
    fault_env: FaultEnvFactory,
) -> None:
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env("{lease: 30s, on_store_error: closed}")
        request = await lost_claim_reply(env, "hung-up")
        env.proxy.blackhole(drop_abandoned=True)
        request.cancel()  # the client hangs up while the claim's answer is owed
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await asyncio.sleep(1.0)  # the outage goes on
        fields = await record_fields(env)
        assert fields is not None and fields["s"] == b"p"
        env.proxy.resume()
        assert env.upstream.executions == 0
        await given_back_then_runs_once(env, "hung-up")


# -- 5. the completion write ----------------------------------------------------------------


async def test_the_completion_survives_a_blip_right_after_the_response(
    fault_env: FaultEnvFactory,
) -> None:
    """The link goes down as the app answers, so the completion write after the response
    meets it; 1.5 s later it is back. The record must be completed within the lease, and a
    retry after the lease would have run out is a replay."""
    async with asyncio.timeout(FAULT_TEST_TIMEOUT):
        env = await fault_env("{lease: 3s}")
        upstream = upstream_of(env)
        upstream.before_answer = lambda: env.proxy.blackhole(drop_abandoned=True)
        sent_at = time.monotonic()  # the claim is sent after this
        one = await env.send("/blip", key="done")
        down_at = time.monotonic()
        assert (one.status, one.replayed) == (201, "false")
        assert env.proxy.mode is Mode.BLACKHOLE
        await until(down_at + 1.5)
        env.proxy.resume()

        async def completed() -> bool:
            fields = await record_fields(env)
            return fields is not None and fields.get("s") == b"c"

        lease_left = sent_at + 3.0 - time.monotonic()
        await eventually(completed, "the completion to be stored within the lease", lease_left)
        await until(sent_at + 3.3)  # the claim's lease would have run out by now
        retry = await env.send("/blip", key="done")
        assert (retry.status, retry.replayed, retry.body) == (201, "true", one.body)
        assert env.upstream.executions == 1
