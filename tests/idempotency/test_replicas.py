"""Several real `sidecar run` processes sharing one Redis: a replica killed mid-request,
and many identical requests racing across replicas."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.idempotency.conftest import Reply, Upstream, eventually, send
from tests.proxy.conftest import metric_value
from tests.support import SidecarProcess, free_port, run_app, write_config

# Process start-up dominates: allow for it, still bounded.
PROCESS_TEST_TIMEOUT = 30.0


async def start_replicas(
    tmp_path: Path, upstream_url: str, redis_url: str, count: int, idempotency: str
) -> list[SidecarProcess]:
    extra = (
        f'state:\n  url: "{redis_url}"\n  timeout: 1s\n'
        "routes:\n"
        "  - name: orders\n    match: {path_prefix: /}\n    timeout: 10s\n"
        f"    idempotency: {idempotency}\n"
    )
    replicas = []
    for index in range(count):
        path = str(tmp_path / f"sidecar-{index}.yaml")
        port, admin_port = free_port(), free_port()
        write_config(path, upstream_url, port, admin_port, extra=extra)
        replicas.append(SidecarProcess(path, port, admin_port))
    await asyncio.gather(*(replica.start() for replica in replicas))
    return replicas


async def stop_all(replicas: list[SidecarProcess]) -> None:
    for replica in replicas:
        await replica.stop()


async def test_a_killed_replicas_claim_holds_until_its_lease_expires_then_runs_once_more(
    tmp_path: Path, redis_url: str
) -> None:
    upstream = Upstream()
    async with run_app(upstream.app(), handler_cancellation=True) as url:
        replicas: list[SidecarProcess] = []
        try:
            async with asyncio.timeout(PROCESS_TEST_TIMEOUT), aiohttp.ClientSession() as session:
                replicas = await start_replicas(tmp_path, url, redis_url, 2, "{lease: 1s}")
                doomed, survivor = replicas
                request = asyncio.create_task(send(session, doomed.url, "/hang-first", key="c"))

                async def app_running() -> bool:
                    return upstream.executions == 1

                await eventually(app_running, "the first request to reach the app")
                doomed.signal(signal.SIGKILL)
                assert await doomed.wait_exit() == -signal.SIGKILL
                with pytest.raises(aiohttp.ClientError):
                    await request
                # The dead owner's claim still holds: a retry must not run it again yet.
                early = await send(session, survivor.url, "/hang-first", key="c")
                assert early.status == 409
                assert early.problem == "idempotency-in-progress"
                assert upstream.executions == 1
                replies: list[Reply] = []

                async def ran_again() -> bool:
                    replies.append(await send(session, survivor.url, "/hang-first", key="c"))
                    return replies[-1].status != 409

                await eventually(ran_again, "the dead owner's lease to expire", interval=0.05)
                final = replies[-1]
                assert (final.status, final.replayed, final.n) == (201, "false", 2)
                assert all(r.problem == "idempotency-in-progress" for r in replies[:-1])
                assert upstream.executions == 2

                async def replayed() -> bool:
                    reply = await send(session, survivor.url, "/hang-first", key="c")
                    assert reply.status in (201, 409)
                    return reply.replayed == "true" and reply.body == final.body

                await eventually(replayed, "the retry's outcome to be stored")
                assert upstream.executions == 2
        finally:
            upstream.release_all()
            await stop_all(replicas)


# With a wait, every retry must get the first response, none give up with a 409: the wait is
# far longer than answering 50 requests takes, even on a loaded machine.
@pytest.mark.parametrize("wait", ["0s", "10s"])
async def test_50_identical_requests_across_3_replicas_run_once(
    tmp_path: Path, redis_url: str, wait: str
) -> None:
    upstream = Upstream()
    async with run_app(upstream.app(), handler_cancellation=True) as url:
        replicas: list[SidecarProcess] = []
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with (
                asyncio.timeout(PROCESS_TEST_TIMEOUT),
                aiohttp.ClientSession(connector=connector) as session,
            ):
                replicas = await start_replicas(
                    tmp_path, url, redis_url, 3, f"{{lease: 30s, wait: {wait}}}"
                )
                tasks = [
                    asyncio.create_task(send(session, replicas[i % 3].url, "/slow", key="race"))
                    for i in range(50)
                ]

                async def all_looked_up() -> bool:
                    lookups = [
                        await metric_value(
                            replica.admin_url,
                            "sidecar_store_request_duration_seconds_count",
                            operation="idempotency_begin",
                        )
                        for replica in replicas
                    ]
                    return sum(lookups) >= 50

                # The app answers only once every request has reached the record.
                await eventually(all_looked_up, "all 50 requests to look the key up", 15)
                started = time.monotonic()
                upstream.gate.set()
                replies = await asyncio.gather(*tasks)
                # Promptly once the app answers (a bound generous for a loaded machine).
                assert time.monotonic() - started < 10
                finals: list[Reply] = []

                async def replayed() -> bool:
                    finals.append(await send(session, replicas[1].url, "/slow", key="race"))
                    return finals[-1].status != 409

                # The outcome is written just after the first response: poll for it.
                await eventually(replayed, "the outcome to be stored")
            assert upstream.executions == 1
            assert {r.status for r in replies} <= {201, 409}
            created = [r for r in replies if r.status == 201]
            conflicts = [r for r in replies if r.status == 409]
            [first] = [r for r in created if r.replayed == "false"]
            assert all(r.replayed == "true" for r in created if r is not first)
            assert all(r.body == first.body for r in created)
            assert all(r.problem == "idempotency-in-progress" for r in conflicts)
            if wait == "0s":
                assert (len(created), len(conflicts)) == (1, 49)
            else:
                assert (len(created), len(conflicts)) == (50, 0)
            assert (finals[-1].status, finals[-1].replayed) == (201, "true")
            assert finals[-1].body == first.body
            assert upstream.executions == 1
        finally:
            upstream.release_all()
            await stop_all(replicas)
