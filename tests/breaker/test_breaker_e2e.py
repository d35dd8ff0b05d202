"""The circuit breaker end to end: an in-process sidecar (memory store) in front of a real,
controllable aiohttp app on 127.0.0.1. What opens it (failure rate, slow calls,
consecutive failures, bodies broken mid-stream) and what does not (4xx), what an open
breaker answers (problem+json with Retry-After, a static response, another upstream) and
how fast, the probes and the ramp of a recovery, idempotency never storing a fallback, a
reload keeping the state, and per-organisation breakers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import load_config
from tests.proxy.conftest import metric_value
from tests.support import RunningSidecar, run_app, run_sidecar, sidecar_config

PROBLEM = "urn:sidecar:problem:"
TEST_TIMEOUT = 15.0
SETTLE = 5.0
ROUTE = "r"
# Every breaker here: syncs every 50 ms, open times exactly as configured.
BASE = "jitter: 0, flush_interval: 50ms"


@dataclass
class Arrival:
    method: str
    path: str
    org: str | None
    key: str | None
    tag: object  # what App.note answered when the request arrived
    in_flight: int  # requests at the app with this one


@dataclass
class App:
    """Answers `/status/NNN` with NNN, `/broken` with a chunked body cut mid-stream,
    `/stream` with a whole chunked body, anything else with `status` and body `name`,
    each after `delay` seconds (before the headers). Records every arrival."""

    name: str = "app"
    status: int = 200
    delay: float = 0.0
    arrivals: list[Arrival] = field(default_factory=list)
    in_flight: int = 0
    note: Callable[[], object] = lambda: None

    @property
    def calls(self) -> int:
        return len(self.arrivals)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            self.arrivals.append(
                Arrival(
                    request.method,
                    request.path,
                    request.headers.get("X-Org-Id"),
                    request.headers.get("Idempotency-Key"),
                    self.note(),
                    self.in_flight + 1,
                )
            )
            self.in_flight += 1
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)  # the app being slow, not a wait for sync
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
                return web.Response(status=self.status, text=self.name)
            finally:
                self.in_flight -= 1

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def route_yaml(breaker: str, *, route_extra: str = "", top: str = "") -> str:
    """One catch-all route `r` with `circuit_breaker: {BASE, <breaker>}`."""
    return (
        f'state:\n  url: "memory://"\n{top}'
        f"routes:\n  - name: {ROUTE}\n    match: {{path_prefix: /}}\n"
        f"    circuit_breaker: {{{BASE}, {breaker}}}\n{route_extra}"
    )


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def circuit_open(self) -> bool:
        return (
            self.status == 503
            and self.headers.get("Content-Type", "").startswith("application/problem+json")
            and self.json()["type"] == PROBLEM + "circuit-open"
        )


@dataclass
class Env:
    app: App
    sidecar: RunningSidecar
    session: aiohttp.ClientSession

    async def send(
        self, path: str = "/", method: str = "GET", org: str | None = None, **headers: str
    ) -> Reply:
        if org is not None:
            headers["X-Org-Id"] = org
        async with self.session.request(
            method, self.sidecar.url + path, headers=headers
        ) as response:
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                body = b"<cut>"
            return Reply(response.status, response.headers, body)

    async def metric(self, name: str, **labels: str) -> float:
        return await metric_value(self.sidecar.admin_url, name, **labels)

    async def breaker(self, name: str = ROUTE) -> dict[str, Any]:
        """The breaker as GET /breakers on the admin port reports it."""
        async with self.session.get(self.sidecar.admin_url + "/breakers") as response:
            assert response.status == 200
            report = await response.json()
        [found] = [b for b in report["breakers"] if b["name"] == name]
        return found  # type: ignore[no-any-return]

    async def wait_shared_calls(self, calls: int, timeout: float = SETTLE) -> dict[str, Any]:
        """Poll until the shared window holds `calls` calls: every outcome so far has been
        recorded and synced (bounded)."""
        deadline = time.monotonic() + timeout
        while (found := await self.breaker())["shared_window"]["calls"] < calls:
            if time.monotonic() > deadline:
                raise AssertionError(f"shared window never reached {calls}: {found}")
            await asyncio.sleep(0.02)
        return found

    async def transitions_metric(self, before: str, after: str) -> float:
        labels = {"route": ROUTE, "from": before, "to": after}
        return await self.metric("sidecar_circuit_transitions_total", **labels)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.sidecar.log.records if r.get("event") == name]

    def transitions(self, before: str | None = None, after: str | None = None) -> list[Any]:
        return [
            r
            for r in self.events("breaker.transition")
            if (before is None or r["from"] == before) and (after is None or r["to"] == after)
        ]

    async def wait_transition(
        self, before: str, after: str, count: int = 1, timeout: float = SETTLE
    ) -> list[Any]:
        """Poll the log until `count` before->after transitions are there (bounded)."""
        deadline = time.monotonic() + timeout
        while len(found := self.transitions(before, after)) < count:
            if time.monotonic() > deadline:
                seen = [(r["from"], r["to"], r["reason"]) for r in self.transitions()]
                raise AssertionError(f"no {before}->{after} transition; seen {seen}")
            await asyncio.sleep(0.01)
        return found

    async def recover(self, path: str = "/", timeout: float = SETTLE) -> None:
        """Send requests until the breaker has gone half-open -> closed (bounded): the
        first in half-open asks for a permit, the next ones probe."""
        deadline = time.monotonic() + timeout
        while not self.transitions("half_open", "closed"):
            if time.monotonic() > deadline:
                raise AssertionError("the breaker did not close")
            await self.send(path)
            await asyncio.sleep(0.01)  # pacing the polling requests


@asynccontextmanager
async def started(yaml: str, app: App | None = None) -> AsyncIterator[Env]:
    app = app or App()
    async with (
        run_app(app.app()) as served,
        aiohttp.ClientSession() as session,
        run_sidecar(sidecar_config(served, yaml)) as sidecar,
    ):
        yield Env(app, sidecar, session)


async def open_with_failures(env: Env, count: int, path: str = "/status/503") -> None:
    """`count` failing calls, one after another; the last one opens the breaker."""
    for _ in range(count):
        assert (await env.send(path)).status == 503
    assert len(env.transitions("closed", "open")) == 1


# --- 1. failure rate ---------------------------------------------------------------------


async def test_failing_upstream_opens_after_min_requests_and_answers_circuit_open() -> None:
    open_for = 3.0
    breaker = f"min_requests: 5, failure_rate: 0.5, open_for: {open_for:g}s"
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        env.app.status = 503
        replies = [await env.send() for _ in range(5)]
        # Each of the five reached the app and was its own 503, not the breaker's.
        assert [r.status for r in replies] == [503] * 5
        assert not any(r.circuit_open for r in replies)
        assert env.app.calls == 5

        fallbacks = [await env.send() for _ in range(12)]
        assert env.app.calls == 5  # nothing reached the app while open
        for reply in fallbacks:
            assert reply.circuit_open, reply
            assert reply.json()["route"] == ROUTE
            assert 1 <= int(reply.headers["Retry-After"]) <= math.ceil(open_for)

        assert await env.metric("sidecar_circuit_state", route=ROUTE) == 2
        assert await env.metric("sidecar_circuit_rejected_total", route=ROUTE) == 12
        assert await env.transitions_metric("closed", "open") == 1
        [event] = env.transitions()
        assert event["from"] == "closed" and event["to"] == "open"
        assert event["route"] == ROUTE and event["breaker"] == ROUTE
        assert event["reason"] == "failure_rate"
        assert (event["calls"], event["failures"], event["slow"]) == (5, 5, 0)
        assert 0 < event["open_seconds"] <= open_for


# --- 2. probes and ramp ------------------------------------------------------------------


async def test_half_open_lets_at_most_probes_through_then_closes_and_ramps_up() -> None:
    probes, ramp, open_for = 2, 1.0, 0.5
    breaker = (
        f"min_requests: 5, failure_rate: 0.5, open_for: {open_for:g}s,"
        f" half_open: {{probes: {probes}, ramp: {ramp:g}s}}"
    )
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        closed_at: list[float] = []
        loop = asyncio.get_running_loop()
        # Each arrival is tagged with whether the half_open -> closed transition was logged.
        env.app.note = lambda: bool(env.transitions("half_open", "closed"))
        env.app.status = 503
        await open_with_failures(env, 5, path="/")
        assert env.app.calls == 5
        # The upstream recovers, and answers slowly so the probes are in flight together.
        env.app.status, env.app.delay = 200, 0.2

        results: list[tuple[float, Reply]] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                sent = loop.time()
                results.append((sent, await env.send()))
                await asyncio.sleep(0.005)  # pacing the load

        async def watch() -> None:
            # When the close is seen (polled every 5 ms): the ramp starts there.
            await env.wait_transition("half_open", "closed", timeout=TEST_TIMEOUT)
            closed_at.append(loop.time())
            # Real time passes the ramp, and a little more for the all-pass part.
            await asyncio.sleep(ramp + 0.4)
            stop.set()

        # 30 clients hammer the route from the open state on: through the end of open_for,
        # half-open, the close and the whole ramp.
        await asyncio.gather(watch(), *(client() for _ in range(30)))

        half_open_arrivals = [a for a in env.app.arrivals[5:] if a.tag is False]
        assert len(half_open_arrivals) == probes  # exactly the probes, however many clients
        # ... and they were at the app together, with nothing else.
        assert [a.in_flight for a in half_open_arrivals] == [1, 2]
        [to_half_open] = env.transitions("open", "half_open")
        assert to_half_open["reason"] == "open_elapsed"
        [closed] = env.transitions("half_open", "closed")
        assert closed["reason"] == "probes_passed"
        assert len(env.transitions("closed", "open")) == 1  # never reopened
        assert await env.transitions_metric("half_open", "closed") == 1

        for _, reply in results:
            assert (reply.status == 200 and reply.body == b"app") or reply.circuit_open, reply
        start = closed_at[0]

        def share(low: float, high: float) -> tuple[float, int]:
            part = [r for sent, r in results if start + low <= sent < start + high]
            passed = sum(r.status == 200 for r in part)
            return passed / len(part), len(part)

        first, first_n = share(0.0, 0.4 * ramp)
        last, last_n = share(0.6 * ramp, ramp)
        assert first_n >= 10 and last_n >= 10, (first_n, last_n)
        assert first < last, (first, last)
        assert first < 0.5 < last, (first, last)
        after = [r for sent, r in results if sent >= start + ramp + 0.05]
        assert after and all(r.status == 200 for r in after)
        env.app.delay = 0.0
        tail = [await env.send() for _ in range(10)]
        assert all(r.status == 200 and r.body == b"app" for r in tail)


# --- 3. fallbacks are fast ---------------------------------------------------------------


async def test_fallback_answers_do_not_reach_the_app_and_are_fast() -> None:
    breaker = "min_requests: 3, failure_rate: 0.5, open_for: 60s"
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        await open_with_failures(env, 3)
        calls = env.app.calls
        began = time.monotonic()
        replies = [await env.send() for _ in range(200)]
        took = time.monotonic() - began
        assert all(r.circuit_open for r in replies)
        assert env.app.calls == calls
        assert took < 2.0, f"200 fallbacks took {took:.3f} s"
        assert await env.metric("sidecar_circuit_rejected_total", route=ROUTE) == 200


# --- 4. slow calls -----------------------------------------------------------------------


async def test_slow_upstream_trips_on_slow_call_rate_though_every_answer_is_200() -> None:
    breaker = (
        "min_requests: 5, failure_rate: 0.5, open_for: 30s,"
        " slow_call: {threshold: 100ms, rate: 0.5}"
    )
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        env.app.delay = 0.3  # headers after 300 ms
        replies = [await env.send() for _ in range(5)]
        assert [(r.status, r.body) for r in replies] == [(200, b"app")] * 5
        assert (await env.send()).circuit_open
        assert env.app.calls == 5
        [event] = env.transitions("closed", "open")
        assert event["reason"] == "slow_call_rate"
        assert (event["calls"], event["failures"], event["slow"]) == (5, 0, 5)


# --- 5. 4xx ------------------------------------------------------------------------------


async def test_a_4xx_flood_trips_nothing() -> None:
    breaker = "min_requests: 5, failure_rate: 0.5, consecutive_failures: 3, open_for: 30s"
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        statuses = [(400, 404, 429)[i % 3] for i in range(50)]
        replies = [await env.send(f"/status/{status}") for status in statuses]
        assert [r.status for r in replies] == statuses
        assert env.app.calls == 50
        # Every 4xx reached the shared state too, as successes, and it stayed closed.
        report = await env.wait_shared_calls(50)
        assert report["state"] == "closed"
        assert report["shared_window"] == {"calls": 50, "failures": 0, "slow": 0}
        assert (await env.send()).status == 200
        assert env.transitions() == []
        assert await env.metric("sidecar_circuit_state", route=ROUTE) == 0
        assert await env.metric("sidecar_circuit_rejected_total", route=ROUTE) == 0


# --- 6. consecutive failures -------------------------------------------------------------


async def test_consecutive_failures_open_it_before_min_requests() -> None:
    breaker = "min_requests: 100, failure_rate: 0.5, consecutive_failures: 3, open_for: 30s"
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        # A success, then failures: the run counts from the first failure.
        assert (await env.send()).status == 200
        for _ in range(2):
            assert (await env.send("/status/503")).status == 503
        assert env.transitions() == []
        assert (await env.send("/status/503")).status == 503  # the 3rd in a row
        [event] = env.transitions("closed", "open")
        assert event["reason"] == "consecutive_failures"
        assert (await env.send()).circuit_open
        assert env.app.calls == 4


# --- 7. bodies broken mid-stream ---------------------------------------------------------

STREAM_BREAKER = "min_requests: 3, failure_rate: 1.0, consecutive_failures: 0, open_for: 30s"


async def test_a_body_broken_mid_stream_counts_as_a_failure() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(STREAM_BREAKER)) as env:
        for _ in range(3):
            reply = await env.send("/broken")
            assert reply.status == 200  # the head had gone out before the app broke off
            assert reply.body != b"part of the body, and the rest"
        # The verdict on a streamed answer comes once its body ended (after the client saw it).
        [event] = await env.wait_transition("closed", "open")
        assert event["reason"] == "failure_rate"
        assert (event["calls"], event["failures"]) == (3, 3)
        assert (await env.send("/stream")).circuit_open
        assert env.app.calls == 3


async def test_complete_streamed_bodies_do_not_count_as_failures() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(STREAM_BREAKER)) as env:
        for _ in range(10):
            reply = await env.send("/stream")
            assert (reply.status, reply.body) == (200, b"part of the body, and the rest")
        # The verdicts come once each body was sent: all ten landed, none a failure.
        report = await env.wait_shared_calls(10)
        assert report["shared_window"] == {"calls": 10, "failures": 0, "slow": 0}
        assert report["window"] == {"calls": 10, "failures": 0, "slow": 0}
        assert report["state"] == "closed"
        assert (await env.send("/stream")).status == 200
        assert env.transitions() == []
        assert env.app.calls == 11


# --- 8. fallbacks ------------------------------------------------------------------------


async def test_a_static_fallback_is_served_while_open() -> None:
    breaker = (
        "min_requests: 3, failure_rate: 0.5, open_for: 30s,"
        " fallback: {status: 200, headers: {X-Fallback: '1'}, body: cached}"
    )
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        await open_with_failures(env, 3)
        for _ in range(5):
            reply = await env.send()
            assert (reply.status, reply.body) == (200, b"cached")
            assert reply.headers["X-Fallback"] == "1"
            assert "Retry-After" not in reply.headers
        assert env.app.calls == 3
        assert await env.metric("sidecar_circuit_rejected_total", route=ROUTE) == 5


async def test_an_alternate_upstream_answers_while_open() -> None:
    other = App(name="other")
    async with asyncio.timeout(TEST_TIMEOUT), run_app(other.app()) as other_url:
        breaker = (
            f"min_requests: 3, failure_rate: 0.5, open_for: 30s,"
            f" fallback: {{upstream: {other_url}}}"
        )
        async with started(route_yaml(breaker)) as env:
            await open_with_failures(env, 3)
            assert other.calls == 0
            for i in range(5):
                reply = await env.send(f"/orders/{i}")
                assert (reply.status, reply.body) == (200, b"other")
            assert env.app.calls == 3
            assert [a.path for a in other.arrivals] == [f"/orders/{i}" for i in range(5)]
            assert await env.metric("sidecar_circuit_rejected_total", route=ROUTE) == 5


# --- 9. idempotency ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fallback",
    ["", ", fallback: {status: 200, body: cached}"],
    ids=["problem-503", "static-200"],
)
async def test_idempotency_never_stores_a_fallback(fallback: str) -> None:
    breaker = (
        "min_requests: 3, failure_rate: 0.5, open_for: 500ms,"
        f" half_open: {{probes: 1, ramp: 0s}}{fallback}"
    )
    yaml = route_yaml(breaker, route_extra="    idempotency: {}\n")
    async with asyncio.timeout(TEST_TIMEOUT), started(yaml) as env:
        await open_with_failures(env, 3)  # GETs: idempotency does not protect them
        key = {"Idempotency-Key": "k-1"}
        first = await env.send("/orders", "POST", org="acme", **key)
        if fallback:
            assert (first.status, first.body) == (200, b"cached")
        else:
            assert first.circuit_open
        assert [a.method for a in env.app.arrivals] == ["GET"] * 3

        env.app.status = 201
        await asyncio.sleep(0.5)  # real time passes open_for
        await env.recover()

        def posts() -> list[Arrival]:
            return [a for a in env.app.arrivals if a.method == "POST"]

        assert posts() == []

        again = await env.send("/orders", "POST", org="acme", **key)
        assert (again.status, again.body) == (201, b"app")  # executed, not replayed
        assert again.headers["Idempotent-Replayed"] == "false"
        assert [(a.path, a.key) for a in posts()] == [("/orders", "k-1")]
        # And now the key holds the app's answer.
        third = await env.send("/orders", "POST", org="acme", **key)
        assert (third.status, third.body) == (201, b"app")
        assert third.headers["Idempotent-Replayed"] == "true"
        assert len(posts()) == 1


# --- 10. reload --------------------------------------------------------------------------


def write_config(path: Path, upstream_url: str, timeout: str) -> None:
    text = (
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n  drain: 0s\n"
        "  shutdown_grace: 5s\n  reload_interval: 50ms\n"
        f"upstream:\n  url: {upstream_url}\n"
        + route_yaml(
            "min_requests: 3, failure_rate: 0.5, open_for: 30s",
            route_extra=f"    timeout: {timeout}\n",
        )
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, as a ConfigMap update is


async def test_a_reload_keeps_the_breaker_open(tmp_path: Path) -> None:
    app = App()
    path = tmp_path / "sidecar.yaml"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_app(app.app()) as served,
        aiohttp.ClientSession() as session,
    ):
        write_config(path, served, "5s")
        async with run_sidecar(load_config(path), str(path)) as sidecar:
            env = Env(app, sidecar, session)
            await open_with_failures(env, 3)
            assert (await env.send()).circuit_open

            write_config(path, served, "7s")
            deadline = time.monotonic() + SETTLE
            while not env.events("config.reloaded"):
                assert time.monotonic() < deadline, env.events("config.reload_failed")
                await asyncio.sleep(0.02)
            [route] = sidecar.sidecar.holder.runtime.config.routes
            assert route.timeout == 7.0  # the new config is the one serving

            for _ in range(5):
                reply = await env.send()
                assert reply.circuit_open
                # The same open period: most of its 30 s are still ahead.
                assert int(reply.headers["Retry-After"]) >= 20
            assert app.calls == 3
            assert len(env.transitions()) == 1
            assert await env.metric("sidecar_circuit_state", route=ROUTE) == 2


# --- 11. per organisation ----------------------------------------------------------------


async def test_route_org_scope_opens_only_the_failing_organisations_breaker() -> None:
    breaker = "scope: route_org, min_requests: 5, failure_rate: 0.5, open_for: 30s"
    async with asyncio.timeout(TEST_TIMEOUT), started(route_yaml(breaker)) as env:
        for _ in range(5):
            assert (await env.send("/status/503", org="A")).status == 503
        [event] = env.transitions("closed", "open")
        assert event["breaker"] == f"{ROUTE}/A"
        # A is refused even where the app would succeed; B still reaches the app.
        assert (await env.send("/", org="A")).circuit_open
        for _ in range(5):
            reply = await env.send("/", org="B")
            assert (reply.status, reply.body) == (200, b"app")
        assert [a.org for a in env.app.arrivals] == ["A"] * 5 + ["B"] * 5
        assert len(env.transitions()) == 1
        # The gauge shows the worst of the route's organisations.
        assert await env.metric("sidecar_circuit_state", route=ROUTE) == 2
