"""A circuit breaker shared by real `sidecar run` processes on one Redis: failures seen by
one replica open it on all within about two flush intervals, half-open probes across all
replicas never exceed `probes`, and an operator's forced state set on one applies on all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support import SidecarProcess, free_port, run_app, write_config

TOKEN = "breaker-replicas-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEST_TIMEOUT = 60.0
FLUSH = 0.1
PROBES = 3


@dataclass
class App:
    """503 or 200 as the test says, optionally after a delay; counts what reaches it."""

    status: int = 200
    delay: float = 0.0
    calls: int = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.calls += 1
            if self.delay:
                await asyncio.sleep(self.delay)  # the app being slow, not a synchronisation
            return web.Response(status=self.status, text="x")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def breaker_route(redis_url: str) -> str:
    return (
        f'state:\n  url: "{redis_url}"\n  timeout: 2s\n'
        "routes:\n  - name: orders\n    match: {path_prefix: /}\n"
        "    circuit_breaker:\n"
        "      min_requests: 10\n      failure_rate: 0.5\n      consecutive_failures: 0\n"
        "      open_for: 1s\n      max_open_for: 10s\n      jitter: 0\n"
        f"      half_open: {{probes: {PROBES}, ramp: 0s}}\n"
        f"      flush_interval: {int(FLUSH * 1000)}ms\n"
    )


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[App, list[SidecarProcess]]]:
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", TOKEN)
    app = App()
    async with run_app(app.app()) as upstream:
        started: list[SidecarProcess] = []
        try:
            for index in range(3):
                path = str(tmp_path / f"sidecar-{index}.yaml")
                port, admin = free_port(), free_port()
                write_config(path, upstream, port, admin, extra=breaker_route(redis_url))
                started.append(SidecarProcess(path, port, admin))
            await asyncio.gather(*(replica.start() for replica in started))
            yield app, started
        finally:
            for replica in started:
                await replica.stop()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any] | None]:
    async with session.get(url + "/orders") as response:
        body = await response.read()
        problem = None
        if response.headers.get("Content-Type", "").startswith("application/problem+json"):
            problem = await response.json(content_type=None)
        del body
        return response.status, problem


async def breaker_of(session: aiohttp.ClientSession, sidecar: SidecarProcess) -> dict[str, Any]:
    async with session.get(sidecar.admin_url + "/breakers", headers=AUTH) as response:
        assert response.status == 200, await response.text()
        [breaker] = (await response.json())["breakers"]
        return dict(breaker)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> float:
    """Poll `check` every 10 ms; the seconds it took, or fail after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_failures_seen_by_one_replica_open_the_breaker_on_all(
    replicas: tuple[App, list[SidecarProcess]],
) -> None:
    app, sidecars = replicas
    async with asyncio.timeout(TEST_TIMEOUT), aiohttp.ClientSession() as session:
        app.status = 503
        for _ in range(10):
            status, _ = await get(session, sidecars[0].url)
            assert status == 503
        assert app.calls == 10
        opened_at = time.monotonic()
        # The 11th on the same replica is the fallback: it opened on its own numbers at once.
        status, problem = await get(session, sidecars[0].url)
        assert problem is not None and problem["type"] == "urn:sidecar:problem:circuit-open"
        assert app.calls == 10

        async def all_open() -> bool:
            states = [(await breaker_of(session, s))["state"] for s in sidecars[1:]]
            return states == ["open", "open"]

        await eventually(all_open, "replicas 1 and 2 to learn the breaker opened", 5.0)
        # One flush of replica 0 and one of each other replica, plus the round trips.
        assert time.monotonic() - opened_at < 4 * FLUSH + 0.5
        for sidecar in sidecars[1:]:
            status, problem = await get(session, sidecar.url)
            assert status == 503 and problem is not None
            assert problem["type"] == "urn:sidecar:problem:circuit-open"
        assert app.calls == 10, "a replica forwarded a request while the breaker was open"
        reports = [await breaker_of(session, s) for s in sidecars]
        assert {r["reason"] for r in reports} == {"failure_rate"}
        assert {r["trips"] for r in reports} == {1}


async def test_half_open_probes_across_all_replicas_never_exceed_probes(
    replicas: tuple[App, list[SidecarProcess]],
) -> None:
    app, sidecars = replicas
    connector = aiohttp.TCPConnector(limit=0)
    async with asyncio.timeout(TEST_TIMEOUT), aiohttp.ClientSession(connector=connector) as session:
        app.status = 503
        for _ in range(10):
            await get(session, sidecars[0].url)

        async def all_open() -> bool:
            return all([(await breaker_of(session, s))["state"] == "open" for s in sidecars])

        await eventually(all_open, "every replica to see the breaker open", 5.0)
        # The app is still failing, and slowly: the probes are in flight together, fail,
        # and reopen it for twice as long (2 s).
        app.calls = 0
        app.delay = 0.3
        report = await breaker_of(session, sidecars[0])
        await asyncio.sleep(report["next"]["in_seconds"])  # the open time running out
        waves_until = time.monotonic() + 1.5
        statuses: list[int] = []
        while time.monotonic() < waves_until:
            wave = await asyncio.gather(
                *(get(session, sidecars[i % 3].url) for i in range(30)), return_exceptions=False
            )
            statuses += [status for status, _ in wave]
        assert 1 <= app.calls <= PROBES, f"{app.calls} requests reached the app while half-open"
        reports = [await breaker_of(session, s) for s in sidecars]
        assert {r["state"] for r in reports} == {"open"}
        assert {r["trips"] for r in reports} == {2}
        assert {r["reason"] for r in reports} == {"probes_failed"}
        assert statuses.count(503) == len(statuses)


async def test_a_forced_open_on_one_replica_applies_on_all_and_reset_closes_all(
    replicas: tuple[App, list[SidecarProcess]],
) -> None:
    app, sidecars = replicas
    async with asyncio.timeout(TEST_TIMEOUT), aiohttp.ClientSession() as session:
        assert [(await get(session, s.url))[0] for s in sidecars] == [200, 200, 200]
        assert app.calls == 3
        url = sidecars[0].admin_url + "/breakers/orders/open"
        async with session.post(url) as response:
            assert response.status == 401  # the bearer token is required
        async with session.post(url, headers=AUTH) as response:
            assert response.status == 200, await response.text()
            forced = await response.json()
        assert (forced["state"], forced["forced"]) == ("open", "open")
        # Forced here at once.
        assert (await get(session, sidecars[0].url))[0] == 503

        async def forced_everywhere() -> bool:
            reports = [await breaker_of(session, s) for s in sidecars]
            return all(r["forced"] == "open" for r in reports)

        await eventually(forced_everywhere, "every replica to adopt the forced open", 5.0)
        for sidecar in sidecars:
            status, problem = await get(session, sidecar.url)
            assert status == 503 and problem is not None
        assert app.calls == 3
        # A forced open does not end by itself: no half-open probe after open_for.
        report = await breaker_of(session, sidecars[2])
        assert report["next"] is None

        async with session.post(
            sidecars[1].admin_url + "/breakers/orders/reset", headers=AUTH
        ) as response:
            assert response.status == 200, await response.text()

        async def closed_everywhere() -> bool:
            reports = [await breaker_of(session, s) for s in sidecars]
            return all(r["state"] == "closed" and r["forced"] is None for r in reports)

        await eventually(closed_everywhere, "every replica to adopt the reset", 5.0)
        assert [(await get(session, s.url))[0] for s in sidecars] == [200, 200, 200]
        assert app.calls == 6
        async with session.post(
            sidecars[0].admin_url + "/breakers/nope/open", headers=AUTH
        ) as response:
            assert response.status == 404
            assert (await response.json(content_type=None))["type"].endswith("breaker-unknown")
