"""What a quota charge becomes once the request's outcome is known, through an in-process
sidecar on memory and a real Redis: `count: success` refunds (5xx, `refund_statuses`, a
body cut mid-stream), refunds of requests that never reached the app (a connect failure,
an idempotent replay), shadow limits, near-limit crossings, per-organisation time zones,
and organisations taken from a verified JWT."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import jwt
import pytest
from aiohttp import web

from sidecar.policies.quota.usage import QuotaAdmin
from tests.proxy.conftest import metric_value
from tests.support import RunningSidecar, free_port, run_app, run_sidecar, sidecar_config

PROBLEM = "urn:sidecar:problem:"
TIMEOUT = 20.0
SETTLE = 8.0
SECRET = "q" * 40


@dataclass
class App:
    """Answers `/status/NNN` with NNN, `/broken` with a body cut mid-stream, `/stream`
    with a whole streamed body, anything else with 201."""

    calls: int = 0
    paths: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            self.calls += 1
            self.paths.append(request.path)
            if request.path.startswith("/status/"):
                return web.Response(status=int(request.path.rsplit("/", 1)[1]), text="x")
            if request.path in ("/broken", "/stream"):
                response = web.StreamResponse(status=200)
                response.enable_chunked_encoding()
                await response.prepare(request)
                await response.write(b"part of the body, ")
                if request.path == "/broken":
                    assert request.transport is not None
                    request.transport.close()  # cut off: no terminating chunk
                    return response
                await response.write(b"and the rest")
                await response.write_eof()
                return response
            return web.Response(status=201, text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture(params=["memory", "redis"])
def state_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


def route_yaml(state_url: str, quotas: str, extra: str = "", top: str = "") -> str:
    return (
        f'state:\n  url: "{state_url}"\n  timeout: 1s\n{top}'
        "routes:\n  - name: r\n    match: {path_prefix: /}\n"
        f"    quotas: {quotas}\n{extra}"
    )


@dataclass
class Env:
    app: App
    sidecar: RunningSidecar
    session: aiohttp.ClientSession

    async def send(
        self, path: str = "/orders", org: str | None = "acme", **headers: str
    ) -> tuple[int, Any, bytes]:
        """Status, headers and the body (as far as it came) of one POST."""
        if org is not None:
            headers["X-Org-Id"] = org
        async with self.session.post(self.sidecar.url + path, headers=headers) as response:
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                body = b"<cut>"
            return response.status, response.headers, body

    async def used(self, org: str) -> dict[str, int]:
        """Each limit's `used` for `org`, as the admin API reads it."""
        return {name: int(entry["used"]) for name, entry in (await self.usage(org)).items()}

    async def usage(self, org: str) -> dict[str, dict[str, Any]]:
        sidecar = self.sidecar.sidecar
        admin = QuotaAdmin(sidecar.holder.runtime.config, sidecar.store)
        report = await admin.usage(org)
        return {entry["name"]: entry for entry in report["routes"][0]["limits"]}

    async def wait_used(self, org: str, expected: dict[str, int], timeout: float = SETTLE) -> None:
        """Poll usage until it is `expected` (refunds land in the background)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            seen = await self.used(org)
            if all(seen.get(name) == value for name, value in expected.items()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{org}: usage {seen}, expected {expected}")
            await asyncio.sleep(0.02)

    async def metric(self, name: str, **labels: str) -> float:
        return await metric_value(self.sidecar.admin_url, name, **labels)

    async def wait_events(self, event: str, count: int, timeout: float = SETTLE) -> list[Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [r for r in self.sidecar.log.records if r.get("event") == event]
            if len(found) >= count:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(found)} {event} events, expected {count}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def started(
    yaml: Callable[[str], str], *, upstream_url: str | None = None
) -> AsyncIterator[Env]:
    """A sidecar for `yaml(upstream_url)` in front of an App (or of `upstream_url`)."""
    app = App()
    async with run_app(app.app()) as served, aiohttp.ClientSession() as session:
        url = upstream_url or served
        async with run_sidecar(sidecar_config(url, yaml(url))) as sidecar:
            yield Env(app, sidecar, session)


# --- count: success ---------------------------------------------------------------------

SUCCESS_LIMITS = (
    "{limits: [{name: any5xx, kind: quota, limit: 100, window: 1d, count: success},"
    " {name: only409, kind: quota, limit: 100, window: 1d, count: success,"
    " refund_statuses: [409]},"
    " {name: every, kind: quota, limit: 100, window: 1d}]}"
)


async def test_count_success_refunds_5xx_and_the_configured_statuses_but_not_a_success(
    state_url: str,
) -> None:
    async with (
        asyncio.timeout(TIMEOUT),
        started(lambda _: route_yaml(state_url, SUCCESS_LIMITS)) as env,
    ):
        status, headers, _ = await env.send("/status/201")
        assert status == 201 and "RateLimit" in headers
        status, _, _ = await env.send("/status/500")
        assert status == 500
        # The 500 is given back to the default (every 5xx) limit only; `count: all` keeps it.
        await env.wait_used("acme", {"any5xx": 1, "only409": 2, "every": 2})
        status, _, _ = await env.send("/status/409")
        assert status == 409
        # 409 is in only409's refund_statuses, and not a 5xx for any5xx.
        await env.wait_used("acme", {"any5xx": 2, "only409": 2, "every": 3})
        # A barrier: once another organisation's 500 is refunded, every refund queued
        # before it has landed too: nothing more is given back to acme.
        assert (await env.send("/status/503", org="barrier"))[0] == 503
        await env.wait_used("barrier", {"any5xx": 0, "only409": 1, "every": 1})
        assert await env.used("acme") == {"any5xx": 2, "only409": 2, "every": 3}
        assert env.app.calls == 4
        queued = await env.metric("sidecar_ratelimit_refunds_total", route="r", result="queued")
        assert queued == 3  # any5xx for the 500 and the 503, only409 for the 409


async def test_count_success_refunds_a_response_body_cut_mid_stream(state_url: str) -> None:
    quotas = (
        "{limits: [{name: daily, kind: quota, limit: 100, window: 1d, count: success},"
        " {name: every, kind: quota, limit: 100, window: 1d}]}"
    )
    async with asyncio.timeout(TIMEOUT), started(lambda _: route_yaml(state_url, quotas)) as env:
        status, _, body = await env.send("/stream")
        assert status == 200 and body == b"part of the body, and the rest"
        status, _, body = await env.send("/broken")
        assert status == 200  # the head had gone out before the app broke off
        assert body != b"part of the body, and the rest"
        # The whole stream counts; the broken one is refunded, under count: success only.
        await env.wait_used("acme", {"daily": 1, "every": 2})
        assert (await env.send("/status/500", org="barrier"))[0] == 500
        await env.wait_used("barrier", {"daily": 0})
        assert await env.used("acme") == {"daily": 1, "every": 2}
        assert env.app.paths == ["/stream", "/broken", "/status/500"]


# --- never reached the app ----------------------------------------------------------------


async def test_a_connect_failure_is_refunded_even_under_count_all(state_url: str) -> None:
    quotas = (
        "{limits: [{name: daily, kind: quota, limit: 5, window: 1d},"
        " {name: hourly, kind: rate, limit: 10, window: 1h}]}"
    )
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with (
        asyncio.timeout(TIMEOUT),
        started(lambda _: route_yaml(state_url, quotas), upstream_url=dead) as env,
    ):
        for _ in range(3):
            status, _, body = await env.send()
            assert status == 502, body
            assert b"upstream-connect-failed" in body
        await env.wait_used("acme", {"daily": 0, "hourly": 0})
        queued = await env.metric("sidecar_ratelimit_refunds_total", route="r", result="queued")
        assert queued == 6  # two limits, three requests
        # More requests than the daily limit still pass it: each was given back.
        for _ in range(6):
            assert (await env.send())[0] == 502
        await env.wait_used("acme", {"daily": 0, "hourly": 0})
        assert env.app.calls == 0


async def test_an_idempotent_replay_consumes_no_quota(state_url: str) -> None:
    quotas = "{limits: [{name: daily, kind: quota, limit: 10, window: 1d}]}"
    extra = "    idempotency: {}\n"
    async with (
        asyncio.timeout(TIMEOUT),
        started(lambda _: route_yaml(state_url, quotas, extra)) as env,
    ):
        status, headers, body = await env.send(**{"Idempotency-Key": "k1"})
        assert status == 201 and body == b"ok"
        assert headers["Idempotent-Replayed"] == "false"
        await env.wait_used("acme", {"daily": 1})
        for _ in range(3):
            status, headers, body = await env.send(**{"Idempotency-Key": "k1"})
            assert status == 201 and body == b"ok"
            assert headers["Idempotent-Replayed"] == "true"
        assert env.app.calls == 1
        # The docs: a replay did not reach the app, so its charge is refunded.
        await env.wait_used("acme", {"daily": 1})
        # A barrier: another organisation's replay refunded means acme's have landed.
        for _ in range(2):
            assert (await env.send(org="barrier", **{"Idempotency-Key": "k1"}))[0] == 201
        await env.wait_used("barrier", {"daily": 1})
        assert await env.used("acme") == {"daily": 1}
        assert env.app.calls == 2


# --- shadow limits and near-limit crossings -----------------------------------------------


async def test_a_shadow_limit_never_refuses_is_never_shown_and_counts_its_denials(
    state_url: str,
) -> None:
    quotas = (
        "{limits: [{name: trial, kind: rate, limit: 1, window: 1h, shadow: true},"
        " {name: hourly, kind: rate, limit: 100, window: 1h}]}"
    )
    async with asyncio.timeout(TIMEOUT), started(lambda _: route_yaml(state_url, quotas)) as env:
        for expected_remaining in (99, 98, 97, 96):
            status, headers, _ = await env.send()
            assert status == 201
            assert headers["RateLimit-Policy"] == '"hourly";q=100;w=3600'
            assert headers["RateLimit"].startswith(f'"hourly";r={expected_remaining};')
            assert "trial" not in headers["RateLimit-Policy"] + headers["RateLimit"]
        assert env.app.calls == 4
        decisions = {
            decision: await env.metric(
                "sidecar_ratelimit_decisions_total", route="r", limit="trial", decision=decision
            )
            for decision in ("allowed", "denied", "shadow_denied")
        }
        assert decisions == {"allowed": 1, "denied": 0, "shadow_denied": 3}
        hourly_allowed = await env.metric(
            "sidecar_ratelimit_decisions_total", route="r", limit="hourly", decision="allowed"
        )
        assert hourly_allowed == 4
        events = await env.wait_events("quota.shadow_denied", 3)
        assert len(events) == 3 and all(e["limit"] == "trial" for e in events)
        assert not [r for r in env.sidecar.log.records if r.get("event") == "quota.denied"]


async def test_near_limit_counts_and_logs_the_one_request_that_crosses_the_ratio(
    state_url: str,
) -> None:
    quotas = "{near_limit_ratio: 0.5, limits: [{name: daily, kind: quota, limit: 4, window: 1d}]}"
    async with asyncio.timeout(TIMEOUT), started(lambda _: route_yaml(state_url, quotas)) as env:

        async def near() -> float:
            return await env.metric("sidecar_ratelimit_near_limit_total", route="r", limit="daily")

        assert (await env.send())[0] == 201  # 1 of 4: below half
        assert await near() == 0
        assert (await env.send())[0] == 201  # 2 of 4: crosses 50 %
        assert await near() == 1
        assert [(await env.send())[0] for _ in range(3)] == [201, 201, 429]  # 3, 4, refused
        assert await near() == 1
        events = await env.wait_events("quota.near_limit", 1)
        assert len(events) == 1
        assert (events[0]["limit"], events[0]["used"], events[0]["of"]) == ("daily", 2, 4)
        # Another organisation crosses on its own.
        assert [(await env.send(org="other"))[0] for _ in range(2)] == [201, 201]
        assert await near() == 2


# --- per-organisation time zones ------------------------------------------------------------


def next_midnight_ms(zone: str, unix: float) -> int:
    local = dt.datetime.fromtimestamp(unix, ZoneInfo(zone))
    midnight = dt.datetime.combine(
        local.date() + dt.timedelta(days=1), dt.time(), tzinfo=ZoneInfo(zone)
    )
    return int(midnight.timestamp() * 1000)


async def test_an_organisations_time_zone_moves_its_daily_reset_to_its_own_midnight(
    state_url: str,
) -> None:
    quotas = (
        "{timezones: {tokyo-org: Asia/Tokyo},"
        " limits: [{name: daily, kind: quota, limit: 10, window: 1d}]}"
    )
    async with asyncio.timeout(TIMEOUT), started(lambda _: route_yaml(state_url, quotas)) as env:
        before = time.time()
        resets = {}
        for org in ("tokyo-org", "utc-org"):
            status, headers, _ = await env.send(org=org)
            assert status == 201
            resets[org] = int(headers["RateLimit"].rsplit("t=", 1)[1])
        usage = {org: (await env.usage(org))["daily"] for org in ("tokyo-org", "utc-org")}
        after = time.time()
        for org, zone in (("tokyo-org", "Asia/Tokyo"), ("utc-org", "UTC")):
            end_ms = usage[org]["period"]["end_ms"]
            assert end_ms in {next_midnight_ms(zone, before), next_midnight_ms(zone, after)}, org
            assert usage[org]["used"] == 1
            # `t` is the seconds until that midnight, as of the request.
            assert end_ms / 1000 - after - 2 <= resets[org] <= end_ms / 1000 - before + 2, org
        # Tokyo's midnight is 15:00 UTC: never the same instant as UTC's.
        assert usage["tokyo-org"]["period"]["end_ms"] != usage["utc-org"]["period"]["end_ms"]
        assert abs(resets["tokyo-org"] - resets["utc-org"]) >= 9 * 3600 - 5


# --- the organisation from a verified JWT --------------------------------------------------


def hs256_token(org: str, *, secret: str = SECRET, expires_in: int = 600) -> str:
    now = int(time.time())
    claims = {"org_id": org, "sub": "u1", "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_quotas_charge_the_verified_tokens_organisation_and_refuse_bad_tokens(
    state_url: str,
) -> None:
    quotas = "{limits: [{name: daily, kind: quota, limit: 10, window: 1d}]}"
    top = f"identity:\n  jwt: {{algorithms: [HS256], secret: {SECRET}, org_claim: org_id}}\n"
    async with (
        asyncio.timeout(TIMEOUT),
        started(lambda _: route_yaml(state_url, quotas, top=top)) as env,
    ):
        bad_tokens = {
            "forged": hs256_token("org-a", secret="f" * 40),
            "expired": hs256_token("org-a", expires_in=-3600),  # past the 60 s leeway
        }
        for why, bad in bad_tokens.items():
            for org_header in (None, "org-b"):
                status, headers, body = await env.send(
                    org=org_header, Authorization=f"Bearer {bad}"
                )
                assert status == 401, why
                assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', why
                assert json.loads(body)["type"] == PROBLEM + "identity-invalid", why
        assert env.app.calls == 0
        assert await env.used("org-a") == {"daily": 0}
        assert await env.used("org-b") == {"daily": 0}
        # A valid token for org-a: org-a is charged, whatever X-Org-Id claims.
        for expected_remaining in (9, 8):
            status, headers, _ = await env.send(
                org="org-b", Authorization=f"Bearer {hs256_token('org-a')}"
            )
            assert status == 201
            assert headers["RateLimit"].startswith(f'"daily";r={expected_remaining};')
        assert env.app.calls == 2
        assert await env.used("org-a") == {"daily": 2}
        assert await env.used("org-b") == {"daily": 0}
        # Without a token the identity headers are not believed either: no organisation.
        status, _, body = await env.send(org="org-b")
        assert status == 401 and b"organisation-unknown" in body
        assert await env.used("org-b") == {"daily": 0}
