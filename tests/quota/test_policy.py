"""The quota policy through an in-process sidecar in front of a real app, on memory and a
real Redis: headers, refusals, costs, the concurrency cap, the body never read on a
refusal, remembered refusals, and calendar quotas across a DST change (injected clock)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from sidecar.policies.quota import policy as quota_policy
from sidecar.policies.quota.usage import QuotaAdmin
from sidecar.store import MemoryStore
from tests.proxy.conftest import metric_value
from tests.support import RunningSidecar, run_app, run_sidecar, sidecar_config

PROBLEM = "urn:sidecar:problem:"
TIMEOUT = 15.0


@dataclass
class App:
    calls: int = 0
    gate: asyncio.Event | None = None

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.calls += 1
            if request.path.startswith("/slow") and self.gate is not None:
                await self.gate.wait()
            return web.Response(status=201, text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture(params=["memory", "redis"])
def state_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


def route_yaml(state_url: str, quotas: str) -> str:
    return (
        f'state:\n  url: "{state_url}"\n  timeout: 1s\n'
        "routes:\n  - name: r\n    match: {path_prefix: /}\n"
        f"    quotas: {quotas}\n"
    )


@pytest.fixture
async def env(state_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    quotas = request.param if hasattr(request, "param") else "{}"
    app = App()
    async with run_app(app.app()) as upstream, aiohttp.ClientSession() as session:
        config = sidecar_config(upstream, route_yaml(state_url, quotas))
        async with run_sidecar(config) as sidecar:
            yield Env(app, sidecar, session)


@dataclass
class Env:
    app: App
    sidecar: RunningSidecar
    session: aiohttp.ClientSession

    async def post(
        self, org: str | None = "acme", **headers: str
    ) -> tuple[int, aiohttp.typedefs.LooseHeaders, dict[str, object] | None]:
        if org is not None:
            headers["X-Org-Id"] = org
        async with self.session.post(self.sidecar.url + "/orders", headers=headers) as response:
            body = await response.json() if response.status != 201 else None
            return response.status, response.headers, body


def quotas(text: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("env", [text], indirect=True)


@quotas(
    "{limits: [{name: burst, kind: rate, limit: 3, window: 1h},"
    " {name: daily, kind: quota, limit: 100, window: 1d}]}"
)
async def test_admitted_requests_carry_the_draft_headers_and_a_refusal_is_a_429_problem(
    env: Env,
) -> None:
    async with asyncio.timeout(TIMEOUT):
        seen = []
        for _ in range(3):
            status, headers, _ = await env.post()
            assert status == 201
            assert headers["RateLimit-Policy"] == '"burst";q=3;w=3600, "daily";q=100;w=86400'
            seen.append(headers["RateLimit"].split(";")[:2])
        assert seen == [['"burst"', "r=2"], ['"burst"', "r=1"], ['"burst"', "r=0"]]
        status, headers, body = await env.post()
        assert status == 429
        assert body is not None
        assert body["type"] == PROBLEM + "quota-exceeded"
        assert body["violated-policies"] == ["burst"]
        # One unit refills every 1200 s: the request could pass no earlier.
        assert 1199 <= int(headers["Retry-After"]) <= 1200
        assert headers["RateLimit"].startswith('"burst";r=0;t=')
        assert env.app.calls == 3
        # The daily quota was not charged by the refusal: 97 left, not 96.
        status, headers, _ = await env.post(org="other")
        assert status == 201
        decisions = await metric_value(
            env.sidecar.admin_url,
            "sidecar_ratelimit_decisions_total",
            route="r",
            limit="burst",
            decision="denied",
        )
        assert decisions == 1


@quotas(
    "{limits: [{name: small, kind: quota, limit: 1, window: 1d},"
    " {name: big, kind: rate, limit: 100, window: 1h}]}"
)
async def test_a_request_refused_by_one_limit_consumes_none_of_them(env: Env) -> None:
    async with asyncio.timeout(TIMEOUT):
        assert (await env.post())[0] == 201
        for _ in range(3):
            status, _, body = await env.post()
            assert status == 429
            assert body is not None and body["violated-policies"] == ["small"]
        # Only the first request charged "big": the three refusals left it at 99.
        sidecar = env.sidecar.sidecar
        admin = QuotaAdmin(sidecar.holder.runtime.config, sidecar.store)
        usage = await admin.usage("acme")
        limits = {limit["name"]: limit for limit in usage["routes"][0]["limits"]}
        assert limits["big"]["used"] == 1 and limits["big"]["remaining"] == 99
        assert limits["small"]["used"] == 1 and limits["small"]["remaining"] == 0


@quotas(
    "{limits: [{name: units, kind: rate, limit: 10, window: 1h,"
    " cost: {header: X-Cost, default: 1, min: 1, max: 5}}]}"
)
async def test_the_cost_comes_from_the_header_within_bounds(env: Env) -> None:
    async with asyncio.timeout(TIMEOUT):
        status, headers, _ = await env.post(**{"X-Cost": "4"})
        assert status == 201 and headers["RateLimit"].startswith('"units";r=6;')
        for bad in ("0", "6", "abc", "-1", "1.5"):
            status, _, body = await env.post(**{"X-Cost": bad})
            assert status == 400, bad
            assert body is not None and body["type"] == PROBLEM + "quota-cost-invalid"
        status, headers, _ = await env.post()  # no header: the default
        assert status == 201 and headers["RateLimit"].startswith('"units";r=5;')
        assert env.app.calls == 2


@quotas("{limits: [{name: hourly, kind: rate, limit: 5, window: 1h}], anonymous: reject}")
async def test_a_request_without_an_organisation_is_refused_with_401(env: Env) -> None:
    async with asyncio.timeout(TIMEOUT):
        status, headers, body = await env.post(org=None)
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert body is not None and body["type"] == PROBLEM + "organisation-unknown"
        assert env.app.calls == 0


@quotas("{limits: [{name: hourly, kind: rate, limit: 2, window: 1h}], anonymous: limit}")
async def test_anonymous_requests_share_one_bucket_per_client_address(env: Env) -> None:
    async with asyncio.timeout(TIMEOUT):
        assert [(await env.post(org=None))[0] for _ in range(3)] == [201, 201, 429]
        assert (await env.post(org="acme"))[0] == 201


@quotas("{limits: [{name: hourly, kind: rate, limit: 2, window: 1h}]}")
async def test_a_refused_client_never_uploads_its_body(env: Env) -> None:
    async with asyncio.timeout(TIMEOUT):
        assert [(await env.post())[0] for _ in range(2)] == [201, 201]
        reader, writer = await asyncio.open_connection("127.0.0.1", env.sidecar.port)
        writer.write(
            b"POST /orders HTTP/1.1\r\nHost: x\r\nX-Org-Id: acme\r\n"
            b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        # The final answer comes first: no 100 Continue, so the body is never sent.
        assert status_line.startswith(b"HTTP/1.1 429"), status_line


@quotas("{limits: [{name: hourly, kind: rate, limit: 100, window: 1h}], max_in_flight: 2}")
async def test_an_organisations_requests_beyond_max_in_flight_are_refused_at_once(
    env: Env,
) -> None:
    env.app.gate = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        url = env.sidecar.url + "/slow"
        slow = [
            asyncio.create_task(env.session.post(url, headers={"X-Org-Id": "acme"}))
            for _ in range(2)
        ]
        while env.app.calls < 2:
            await asyncio.sleep(0.01)
        status, headers, body = await env.post()
        assert status == 429 and headers["Retry-After"] == "1"
        assert body is not None and body["type"] == PROBLEM + "too-many-in-flight"
        assert (await env.post(org="other"))[0] == 201  # another org is not held back
        env.app.gate.set()
        for task in slow:
            response = await task
            assert response.status == 201
            response.release()
        assert (await env.post())[0] == 201  # the slots came back


@quotas("{limits: [{name: hourly, kind: rate, limit: 1, window: 1h}]}")
async def test_a_remembered_refusal_is_answered_without_the_store(env: Env) -> None:
    async with asyncio.timeout(TIMEOUT):
        assert (await env.post())[0] == 201
        assert (await env.post())[0] == 429
        before = await metric_value(
            env.sidecar.admin_url,
            "sidecar_store_request_duration_seconds_count",
            operation="quota_admit",
        )
        assert before >= 2
        for _ in range(5):
            status, headers, _ = await env.post()
            assert status == 429 and int(headers["Retry-After"]) >= 3599
        after = await metric_value(
            env.sidecar.admin_url,
            "sidecar_store_request_duration_seconds_count",
            operation="quota_admit",
        )
        assert after == before


# --- calendar quotas, with the sidecar's clock injected -----------------------------------


class FakeClock:
    def __init__(self, at: dt.datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


async def test_a_daily_quota_resets_at_the_zones_midnight_across_a_dst_change() -> None:
    """Europe/Berlin, 2026-10-25 has 25 hours: its midnight is 22:00Z before, 23:00Z after."""
    from sidecar.background import BackgroundTasks
    from sidecar.chain import ProxyResponse
    from sidecar.config import parse_config
    from sidecar.identity import IdentityResolver
    from sidecar.logs import LogSink
    from sidecar.metrics import Metrics
    from sidecar.policies import PolicyDeps, PolicyState

    config = parse_config(
        "routes:\n  - name: r\n    match: {path_prefix: /}\n"
        "    quotas: {limits: [{name: daily, kind: quota, limit: 2, window: 1d,"
        " timezone: Europe/Berlin}]}\n"
    )
    route = config.routes[0]
    clock = FakeClock(dt.datetime(2026, 10, 24, 21, 0, tzinfo=dt.UTC))  # 23:00 CEST, Oct 24
    store = MemoryStore()
    deps = PolicyDeps(
        config=config,
        store=store,
        metrics=Metrics(),
        log=LogSink(level="error"),
        spans=None,
        background=BackgroundTasks(),
        state=PolicyState(),
        identity=IdentityResolver(config.identity),
    )
    assert route.quotas is not None
    policy = quota_policy.QuotaPolicy(route.quotas, route, deps, clock=clock)
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        proxy_request = _proxy_request(request, route)
        response = await policy(proxy_request, _ok)
        return web.Response(status=response.status, headers=response.headers)

    async def _ok(request: object) -> ProxyResponse:
        from multidict import CIMultiDict

        return ProxyResponse(201, CIMultiDict())

    app.router.add_post("/", answer)
    async with run_app(app) as url, aiohttp.ClientSession() as session:

        async def post() -> tuple[int, str]:
            async with session.post(url + "/", headers={"X-Org-Id": "acme"}) as response:
                return response.status, response.headers.get("RateLimit-Policy", "")

        assert [(await post())[0] for _ in range(3)] == [201, 201, 429]
        clock.now = dt.datetime(2026, 10, 24, 21, 59, 59, tzinfo=dt.UTC).timestamp()
        assert (await post())[0] == 429  # 23:59:59 local: still the 24th
        clock.now = dt.datetime(2026, 10, 24, 22, 0, 0, tzinfo=dt.UTC).timestamp()
        status, policy_header = await post()  # local midnight: the 25th, a 25-hour day
        assert status == 201
        assert policy_header == '"daily";q=2;w=90000'
        assert (await post())[0] == 201
        assert (await post())[0] == 429
        # 23:00Z on the 25th is midnight of the 26th in CET (+1): the quota resets then.
        clock.now = dt.datetime(2026, 10, 25, 22, 59, 59, tzinfo=dt.UTC).timestamp()
        assert (await post())[0] == 429
        clock.now = dt.datetime(2026, 10, 25, 23, 0, 0, tzinfo=dt.UTC).timestamp()
        status, policy_header = await post()
        assert status == 201 and policy_header == '"daily";q=2;w=86400'


def _proxy_request(request: web.Request, route: object) -> object:
    from multidict import CIMultiDict

    from sidecar.chain import ProxyRequest

    return ProxyRequest(
        method=request.method,
        target=request.path_qs,
        path=request.path,
        headers=CIMultiDict(request.headers),
        route=route,  # type: ignore[arg-type]
        request_id="test",
        client_ip="127.0.0.1",
        raw=request,
    )
