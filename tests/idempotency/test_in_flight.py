"""A key whose first request is still running: conflicts, waiting for its result, and
what the record becomes when the upstream fails, times out, or the client hangs up."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from aiohttp import web

from tests.idempotency.conftest import (
    BODY,
    ROUTE,
    TEST_TIMEOUT,
    Env,
    EnvFactory,
    Reply,
    eventually,
)
from tests.proxy.conftest import metric_value
from tests.support import free_port


async def test_second_request_while_the_first_runs_gets_409_with_retry_after(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        first = asyncio.create_task(env.send("/slow", key="busy"))
        await env.wait_executions(1)
        second = await env.send("/slow", key="busy")
        assert second.status == 409
        assert second.problem == "idempotency-in-progress"
        assert 1 <= int(second.headers["Retry-After"]) <= 5
        assert "Idempotent-Replayed" not in second.headers
        assert env.upstream.executions == 1
        env.upstream.gate.set()
        one = await first
        assert (one.status, one.replayed, one.n) == (201, "false", 1)
        assert await env.records.settled() == [b"c"]
        third = await env.send("/slow", key="busy")
        assert (third.status, third.replayed, third.body) == (201, "true", one.body)
        assert env.upstream.executions == 1
        assert await env.outcomes() == {"claimed": 1, "conflict": 1, "replayed": 1}


async def first_running_second_waiting(
    env: Env, path: str, key: str
) -> tuple[asyncio.Task[Reply], asyncio.Task[Reply]]:
    """The first request held upstream, and a second with the same key waiting for it."""
    first = asyncio.create_task(env.send(path, key=key))
    await env.wait_executions(1)
    begins = await env.store_calls("idempotency_begin")
    second = asyncio.create_task(env.send(path, key=key))

    async def second_is_polling() -> bool:
        return await env.store_calls("idempotency_begin") >= begins + 2

    # Two lookups by the second request: it found the key in progress and is waiting.
    await eventually(second_is_polling, "the second request to wait")
    return first, second


async def test_with_wait_the_second_request_gets_the_first_ones_response(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s, wait: 2s}")
        first, second = await first_running_second_waiting(env, "/slow", "wait")
        assert not second.done()
        env.upstream.gate.set()
        one, two = await first, await second
        assert (one.status, one.replayed) == (201, "false")
        assert (two.status, two.replayed) == (201, "true")
        assert two.body == one.body
        # The first answer leaves before its record is stored; the replay reads it.
        assert "Idempotency-Expires" not in one.headers
        assert "Idempotency-Expires" in two.headers
        assert env.upstream.executions == 1
        assert await env.outcomes() == {"claimed": 1, "replayed": 1}


async def test_with_wait_a_released_first_outcome_lets_the_waiting_retry_run_it(
    make_env: EnvFactory,
) -> None:
    """The first answer is one a retry may repeat (503): the waiting request claims the key
    and runs it itself, rather than getting the 503 or a 409."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s, wait: 2s}")
        first, second = await first_running_second_waiting(env, "/slow/status/503", "w")
        env.upstream.gate.set()
        one, two = await first, await second
        assert (one.status, one.n) == (503, 1)
        assert (two.status, two.n) == (503, 2)
        assert two.replayed != "true"
        assert env.upstream.executions == 2


async def test_the_owner_renews_its_lease_while_the_app_runs(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 600ms}")
        first = asyncio.create_task(env.send("/slow", key="long"))
        await env.wait_executions(1)
        claimed_at = time.monotonic()

        async def renewed_for_twice_the_lease() -> bool:
            # The owner renews every lease/3 (200 ms): 6 renewals are 1.2 s at least.
            renewals = await env.store_calls("idempotency_renew")
            return renewals >= 6 and time.monotonic() - claimed_at >= 1.2

        # Outlive the lease twice over; the owner's renewals keep the claim alive.
        await eventually(renewed_for_twice_the_lease, "six renewals of the claim")
        retry = await env.send("/slow", key="long")
        assert retry.status == 409
        assert retry.problem == "idempotency-in-progress"
        assert env.upstream.executions == 1
        env.upstream.gate.set()
        assert (await first).status == 201
        assert await env.records.settled() == [b"c"]
        assert (await env.send("/slow", key="long")).replayed == "true"
        assert env.upstream.executions == 1


async def test_wait_gives_up_with_409_when_the_first_outlasts_it(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s, wait: 300ms}")
        first = asyncio.create_task(env.send("/slow", key="wait"))
        await env.wait_executions(1)
        started = time.monotonic()
        second = await env.send("/slow", key="wait")
        assert time.monotonic() - started >= 0.29
        assert second.status == 409
        assert second.problem == "idempotency-in-progress"
        env.upstream.gate.set()
        assert (await first).status == 201
        assert env.upstream.executions == 1


async def test_timeout_after_sending_keeps_the_claim_until_the_lease_expires(
    make_env: EnvFactory,
) -> None:
    """The app may have acted: a retry must not run it again while the lease holds."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 1s}", timeout="300ms")
        claimed_at = time.monotonic()
        first = await env.send("/hang-first", key="slow-app")
        assert first.status == 504
        assert first.problem == "upstream-timeout"
        assert await env.records.states() == [b"p"]
        retry = await env.send("/hang-first", key="slow-app")
        assert retry.status == 409
        assert retry.problem == "idempotency-in-progress"
        assert env.upstream.executions == 1
        replies = []

        async def ran_again() -> bool:
            replies.append(await env.send("/hang-first", key="slow-app"))
            return replies[-1].status != 409

        await eventually(ran_again, "the lease to expire", interval=0.05)
        assert time.monotonic() - claimed_at >= 0.9
        final = replies[-1]
        assert (final.status, final.replayed, final.n) == (201, "false", 2)
        assert env.upstream.executions == 2
        assert await env.records.settled() == [b"c"]
        replay = await env.send("/hang-first", key="slow-app")
        assert (replay.replayed, replay.n) == ("true", 2)
        assert env.upstream.executions == 2


async def test_response_body_breaking_off_keeps_the_claim_until_the_lease_expires(
    make_env: EnvFactory,
) -> None:
    """The app answered, then its body broke off: it may have acted, so no second run."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 1s}")
        first = await env.send("/broken", key="cut")
        assert first.status == 502
        assert first.problem == "upstream-body-broken"
        [key] = await env.records.all()
        assert await env.records.states() == [b"p"]
        # Left to expire: no longer renewed by anyone.
        assert 0 < await env.records.pttl(key) <= 1000
        retry = await env.send("/broken", key="cut")
        assert retry.status == 409
        assert retry.problem == "idempotency-in-progress"
        assert env.upstream.executions == 1


async def test_connect_failure_releases_the_key(make_env: EnvFactory) -> None:
    port = free_port()
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(upstream_url=f"http://127.0.0.1:{port}")
        first = await env.send(key="down")
        assert first.status == 502
        assert first.problem == "upstream-connect-failed"
        # Nothing reached the app: the claim is given up at once.
        assert await env.records.settled() == []
        runner = web.AppRunner(env.upstream.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            retry = await env.send(key="down")
            assert (retry.status, retry.replayed, retry.n) == (201, "false", 1)
            assert env.upstream.executions == 1
            assert await env.records.settled() == [b"c"]
        finally:
            await runner.cleanup()


async def test_client_hanging_up_neither_cancels_the_app_nor_loses_the_outcome(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        _, writer = await asyncio.open_connection("127.0.0.1", env.sidecar.port)
        writer.write(
            b"POST /slow HTTP/1.1\r\nHost: sidecar.test\r\nX-Org-Id: acme\r\nX-User-Id: bob\r\n"
            b"Content-Type: application/json\r\nIdempotency-Key: gone\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
        )
        await writer.drain()
        await env.wait_executions(1)
        writer.close()
        await writer.wait_closed()

        async def client_request_ended() -> bool:
            in_flight = await metric_value(
                env.sidecar.admin_url, "sidecar_in_flight_requests", route=ROUTE
            )
            return in_flight == 0

        # The sidecar has seen the client go (its handler for the request is over)...
        await eventually(client_request_ended, "the sidecar to see the client leave")
        assert env.upstream.finished == 0
        env.upstream.gate.set()

        async def app_finished() -> bool:
            return env.upstream.finished == 1

        # ...and still the app's handler runs to its end (it is cancelled if we hang up).
        await eventually(app_finished, "the app's handler to finish")
        assert await env.records.settled() == [b"c"]
        retry = await env.send("/slow", key="gone")
        assert (retry.status, retry.replayed, retry.n) == (201, "true", 1)
        assert env.upstream.executions == 1


def unread_bytes_at(port: int) -> int:
    """Bytes the kernel holds for the server listening on 127.0.0.1:`port` that the server
    has not read yet, over all its established connections (Linux /proc/net/tcp)."""
    total = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "01" and int(local.split(":")[1], 16) == port:
                total += int(queues.split(":")[1], 16)
    return total


@pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="needs /proc/net/tcp to see the claim reach Redis"
)
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_client_leaving_while_its_claim_is_on_the_way_gives_the_claim_back(
    make_env: EnvFactory,
) -> None:
    """Redis is paused (SIGSTOP) so the claim is provably sent but not yet run when the
    client hangs up. The claim lands when Redis resumes, with nobody to run the request or
    renew it: the sidecar must give it back, not block every retry for a whole lease."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 30s}", state_timeout="5s")
        server = env.backend.server
        assert server is not None
        # Warm up: a pooled connection to Redis, the scripts loaded.
        assert (await env.send(key="warm")).status == 201
        assert await env.records.settled() == [b"c"]
        os.kill(server.pid, signal.SIGSTOP)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", env.sidecar.port)
            writer.write(
                b"POST /orders HTTP/1.1\r\nHost: sidecar.test\r\nX-Org-Id: acme\r\n"
                b"X-User-Id: bob\r\nContent-Type: application/json\r\nIdempotency-Key: left\r\n"
                b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
            )
            await writer.drain()

            async def claim_sent() -> bool:
                return unread_bytes_at(server.port) > 0

            await eventually(claim_sent, "the claim to reach Redis")
            writer.close()
            await writer.wait_closed()

            async def client_request_ended() -> bool:
                in_flight = await metric_value(
                    env.sidecar.admin_url, "sidecar_in_flight_requests", route=ROUTE
                )
                return in_flight == 0

            await eventually(client_request_ended, "the sidecar to see the client leave")
        finally:
            os.kill(server.pid, signal.SIGCONT)

        async def claim_given_back() -> bool:
            return await env.records.states() == [b"c"]  # b"p" gone, only "warm" left

        await eventually(claim_given_back, "the claim to be given back")
        retry = await env.send(key="left")
        assert (retry.status, retry.replayed, retry.n) == (201, "false", 2)
        assert env.upstream.executions == 2
