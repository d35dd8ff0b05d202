"""Quotas across real `sidecar run` processes sharing one Redis: exactly the limit is
admitted however the requests are spread, and an override set on one replica binds all."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import SidecarProcess, free_port, run_app, write_config

TOKEN = "quota-replicas-admin-token"
# Process start-up dominates: allow for it, still bounded.
TEST_TIMEOUT = 60.0
REMAINING = re.compile(r'^"hourly";r=(\d+);t=(\d+)$')


class CountingApp:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.calls[request.headers.get("X-Org-Id", "")] += 1
            return web.Response(status=201, text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def quota_route(redis_url: str) -> str:
    return (
        f'state:\n  url: "{redis_url}"\n  timeout: 2s\n'
        "routes:\n  - name: orders\n    match: {path_prefix: /}\n"
        "    quotas: {limits: [{name: hourly, kind: rate, limit: 100, window: 1h}]}\n"
    )


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[CountingApp, list[SidecarProcess]]]:
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", TOKEN)
    app = CountingApp()
    async with run_app(app.app()) as upstream:
        started: list[SidecarProcess] = []
        try:
            for index in range(3):
                path = str(tmp_path / f"sidecar-{index}.yaml")
                port, admin = free_port(), free_port()
                write_config(path, upstream, port, admin, extra=quota_route(redis_url))
                started.append(SidecarProcess(path, port, admin))
            await asyncio.gather(*(replica.start() for replica in started))
            yield app, started
        finally:
            for replica in started:
                await replica.stop()


async def post(session: aiohttp.ClientSession, url: str, org: str) -> tuple[int, str]:
    async with session.post(url + "/orders", headers={"X-Org-Id": org}) as response:
        await response.read()
        return response.status, response.headers.get("RateLimit", "")


async def test_300_concurrent_requests_over_3_replicas_admit_exactly_the_limit(
    replicas: tuple[CountingApp, list[SidecarProcess]],
) -> None:
    app, sidecars = replicas
    connector = aiohttp.TCPConnector(limit=0)
    async with asyncio.timeout(TEST_TIMEOUT), aiohttp.ClientSession(connector=connector) as session:
        replies = await asyncio.gather(
            *(post(session, sidecars[i % 3].url, "acme") for i in range(300))
        )
        statuses = Counter(status for status, _ in replies)
        assert statuses == {201: 100, 429: 200}
        assert app.calls["acme"] == 100
        # Every admission was charged atomically: each saw a different remaining count.
        remaining = []
        for status, header in replies:
            match = REMAINING.match(header)
            assert match is not None, header
            if status == 201:
                remaining.append(int(match[1]))
            else:
                assert match[1] == "0"
        assert sorted(remaining) == list(range(100))
        # Another organisation has its own, untouched budget, on every replica.
        other = [await post(session, sidecar.url, "globex") for sidecar in sidecars]
        assert [status for status, _ in other] == [201, 201, 201]
        assert [REMAINING.match(header)[1] for _, header in other] == ["99", "98", "97"]  # type: ignore[index]


async def test_an_override_set_on_one_replica_binds_admissions_on_all(
    replicas: tuple[CountingApp, list[SidecarProcess]],
) -> None:
    app, sidecars = replicas
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with asyncio.timeout(TEST_TIMEOUT), aiohttp.ClientSession() as session:
        url = sidecars[0].admin_url + "/quotas/acme/hourly"
        async with session.put(url, json={"limit": 4}, headers=auth) as response:
            assert response.status == 200, await response.text()
        # The override is read in the admission's own round trip: no replica caches it.
        statuses = [(await post(session, sidecars[1 + i % 2].url, "acme"))[0] for i in range(6)]
        assert statuses == [201, 201, 201, 201, 429, 429]
        assert app.calls["acme"] == 4
        assert (await post(session, sidecars[2].url, "globex"))[0] == 201
        async with session.delete(url, headers=auth) as response:
            assert response.status == 200, await response.text()
        # Back to the configured 100 (on a replica that has refused nobody, so nothing is
        # remembered): the four already used still count.
        status, header = await post(session, sidecars[0].url, "acme")
        assert status == 201 and header.startswith('"hourly";r=95;')
