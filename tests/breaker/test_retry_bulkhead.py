"""Route retries (`retry:`) and the route bulkhead (`max_in_flight:`), through an in-process
sidecar in front of real aiohttp apps and raw TCP servers on 127.0.0.1: which answers are
retried and which never are (a POST that reached the app, a streamed body), the claim that
makes a POST retry-safe, the retry budget, the deadline and per-try timeouts, the backoff,
and a bulkhead's 503 and the slot freed when a response completes or its client leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.proxy.conftest import metric_value, scripted_upstream
from tests.support import (
    RawExchange,
    RunningSidecar,
    free_port,
    run_app,
    run_sidecar,
    sidecar_config,
)

PROBLEM = "urn:sidecar:problem:"
TEST_TIMEOUT = 15.0
ROUTE = "r"

# One attempt's behaviour: a status, or (seconds to sleep first, status).
Step = int | tuple[float, int]


@dataclass
class App:
    """Answers attempt n (from 1) as `script[n-1]` (the last step repeats); a request to
    /hold waits for `release` first. Counts attempts as they arrive."""

    script: list[Step] = field(default_factory=lambda: [200])
    calls: int = 0
    bodies: list[int] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            step = self.script[min(self.calls, len(self.script)) - 1]
            body = await request.read()
            self.bodies.append(len(body))
            if request.path == "/hold":
                self.held += 1
                try:
                    await self.release.wait()
                finally:
                    self.held -= 1
            delay, status = step if isinstance(step, tuple) else (0.0, step)
            if delay:
                await asyncio.sleep(delay)
            return web.Response(status=status, text=f"attempt {self.calls}")

        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def route_yaml(retry: str | None = None, *, extra: str = "", timeout: str = "5s") -> str:
    lines = [
        "routes:",
        f"  - name: {ROUTE}",
        "    match: {path_prefix: /}",
        f"    timeout: {timeout}",
    ]
    if retry is not None:
        lines.append(f"    retry: {retry}")
    return "\n".join(lines) + "\n" + extra


@dataclass
class Env:
    app: App
    sidecar: RunningSidecar
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.sidecar.url

    async def send(
        self, method: str = "GET", path: str = "/x", **kwargs: Any
    ) -> tuple[int, Any, bytes, float]:
        """Status, headers, body and the client's wait for one request."""
        started = time.monotonic()
        async with self.session.request(method, self.url + path, **kwargs) as response:
            body = await response.read()
            return response.status, response.headers, body, time.monotonic() - started

    async def metric(self, name: str, **labels: str) -> float:
        return await metric_value(self.sidecar.admin_url, name, route=ROUTE, **labels)

    async def retries(self, reason: str) -> float:
        return await self.metric("sidecar_retries_total", reason=reason)


async def poll(check: Callable[[], Any], *, timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Await `check()` until it returns something truthy; bounded by `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout:g}s (last: {result!r})")
        await asyncio.sleep(interval)


@asynccontextmanager
async def env(
    script: list[Step], yaml: str, *, upstream_url: str | None = None
) -> AsyncIterator[Env]:
    """The app, a sidecar in front of it (or of `upstream_url`) and a client session; the
    whole test runs under TEST_TIMEOUT so a hang fails instead of blocking the suite."""
    app = App(script)
    async with asyncio.timeout(TEST_TIMEOUT), run_app(app.app()) as app_url:
        config = sidecar_config(upstream_url or app_url, yaml)
        try:
            async with run_sidecar(config) as sidecar, aiohttp.ClientSession() as session:
                yield Env(app, sidecar, session)
        finally:
            app.release.set()  # no held handler outlives the test (the runner waits for it)


FAST = "backoff: 1ms, max_backoff: 1ms"


# -- 1, 2: which answers are retried ---------------------------------------------------------


async def test_get_503_is_retried_until_it_succeeds() -> None:
    async with env([503, 503, 200], route_yaml(f"{{attempts: 3, {FAST}}}")) as e:
        status, _, body, _ = await e.send()
        assert (status, body) == (200, b"attempt 3")
        assert e.app.calls == 3
        assert await e.retries("503") == 2


async def test_attempts_bound_the_tries_and_the_last_answer_is_relayed() -> None:
    async with env([503, 503, 200], route_yaml(f"{{attempts: 2, {FAST}}}")) as e:
        status, _, body, _ = await e.send()
        assert (status, body) == (503, b"attempt 2")
        assert e.app.calls == 2
        assert await e.retries("503") == 1


async def test_a_status_not_in_on_is_not_retried() -> None:
    async with env([500, 200], route_yaml(f"{{attempts: 3, {FAST}, on: [503]}}")) as e:
        status, _, body, _ = await e.send()
        assert (status, body) == (500, b"attempt 1")
        assert e.app.calls == 1
        assert await e.retries("500") == 0
        assert await e.retries("503") == 0


# -- 3, 4: what may be resent --------------------------------------------------------------


async def test_a_post_that_reached_the_app_is_never_retried() -> None:
    async with env([503, 201], route_yaml(f"{{attempts: 3, {FAST}}}")) as e:
        status, _, body, _ = await e.send("POST", data=b"order")
        assert (status, body) == (503, b"attempt 1")
        assert e.app.calls == 1
        assert await e.retries("503") == 0


async def test_a_post_whose_connect_failed_is_retried() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    yaml = route_yaml(f"{{attempts: 3, {FAST}, on: [connect_error, 503]}}")
    async with env([200], yaml, upstream_url=closed) as e:
        status, headers, body, _ = await e.send("POST", data=b"order")
        assert status == 502
        assert headers["Content-Type"].startswith("application/problem+json")
        assert (await _json(body))["type"] == PROBLEM + "upstream-connect-failed"
        assert await e.retries("connect_error") == 2  # attempts - 1


async def test_a_streamed_post_whose_connect_failed_is_retried_with_its_whole_body() -> None:
    """No byte of a streamed body was taken by a failed connect: it may still be sent."""
    port = free_port()
    # min_retries 10: the budget (3 retries by default) must not be what stops them.
    yaml = route_yaml(
        f"{{attempts: 5, min_retries: 10, {FAST}}}", extra="    request_buffer: 1KiB\n"
    )
    body = b"x" * (64 * 1024)
    async with env([201], yaml, upstream_url=f"http://127.0.0.1:{port}") as e:
        status, _, _, _ = await e.send("POST", data=body)
        assert status == 502
        assert await e.retries("connect_error") == 4


async def test_a_post_holding_an_idempotency_claim_is_retried_and_its_result_stored() -> None:
    yaml = route_yaml(f"{{attempts: 3, {FAST}}}", extra="    idempotency: {}\n")
    headers = {"Idempotency-Key": "k-1", "X-Org-Id": "acme", "X-User-Id": "bob"}
    async with env([503, 201], yaml) as e:
        status, _, body, _ = await e.send("POST", data=b'{"n":1}', headers=headers)
        assert (status, body) == (201, b"attempt 2")
        assert e.app.calls == 2
        assert await e.retries("503") == 1
        # The app's 201 is the key's result: a replay answers it without reaching the app.
        status, replay_headers, body, _ = await e.send("POST", data=b'{"n":1}', headers=headers)
        assert (status, body) == (201, b"attempt 2")
        assert replay_headers.get("Idempotent-Replayed") == "true"
        assert e.app.calls == 2


async def test_a_reset_is_retried_for_a_get_but_not_for_a_post() -> None:
    """A raw upstream that closes the first connection without answering: the GET (it may
    have reached the app, but resending is harmless) is retried, the POST is not."""
    seen: list[RawExchange] = []

    def respond(exchange: RawExchange) -> bytes | None:
        seen.append(exchange)
        if len(seen) % 2 == 1:
            return None  # every odd request: close without an answer
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    yaml = route_yaml(f"{{attempts: 3, {FAST}, on: [reset, 503]}}")
    async with (
        scripted_upstream(respond, close_after=True) as upstream,
        env([200], yaml, upstream_url=upstream.url) as e,
    ):
        status, _, body, _ = await e.send()
        assert (status, body) == (200, b"ok")
        assert len(seen) == 2
        assert await e.retries("reset") == 1
        status, _, _, _ = await e.send("POST", data=b"order")
        assert status == 502
        assert len(seen) == 3
        assert seen[2].request_line.startswith(b"POST ")
        assert await e.retries("reset") == 1


# -- 5: the budget -------------------------------------------------------------------------


BUDGET = "{attempts: 3, budget: 0.2, min_retries: 1, budget_window: 10s, " + FAST + "}"


async def test_the_budget_caps_retries_at_a_share_of_the_requests() -> None:
    async with env([503], route_yaml(BUDGET)) as e:
        for sent in range(1, 11):
            status, _, _, _ = await e.send()
            assert status == 503
            retries = await e.retries("503")
            assert retries <= max(1, 0.2 * sent), (sent, retries)
            assert e.app.calls == sent + retries


async def test_a_spent_budget_stops_retries_and_is_counted() -> None:
    """What holds today, bug above aside: the budget bites, is metered, and every retry
    it grants is one more attempt at the app."""
    async with env([503], route_yaml(BUDGET)) as e:
        for sent in range(1, 11):
            status, _, _, _ = await e.send()
            assert status == 503
            retries = await e.retries("503")
            assert retries < max(1, 0.2 * sent) + 1, (sent, retries)
            assert e.app.calls == sent + retries
        assert 1 <= retries <= 3  # not the 20 that attempts: 3 alone would allow
        assert await e.metric("sidecar_retry_budget_exhausted_total") > 0


# -- 6: the deadline and per-try timeouts --------------------------------------------------


async def test_retries_never_outlast_the_route_timeout() -> None:
    retry = "{attempts: 5, backoff: 10ms, max_backoff: 10ms, on: [503, timeout]}"
    async with env([(0.4, 503)], route_yaml(retry, timeout="500ms")) as e:
        status, _, _, waited = await e.send()
        assert status in (503, 504)
        assert e.app.calls <= 2  # at most one retry fits in what is left of 500 ms
        assert waited < 0.5 + 0.3  # the route timeout and a margin, not 5 x 400 ms


async def test_a_per_try_timeout_is_retried_when_on_names_timeout() -> None:
    retry = f"{{attempts: 2, {FAST}, per_try_timeout: 100ms, on: [timeout]}}"
    async with env([(1.0, 200), 200], route_yaml(retry)) as e:
        status, _, body, waited = await e.send()
        assert (status, body) == (200, b"attempt 2")
        assert e.app.calls == 2
        assert waited < 0.9
        assert await e.retries("timeout") == 1


async def test_per_try_timeouts_end_each_attempt() -> None:
    retry = f"{{attempts: 2, {FAST}, per_try_timeout: 100ms, on: [timeout]}}"
    async with env([(1.0, 200)], route_yaml(retry)) as e:
        status, _, body, waited = await e.send()
        assert status == 504
        assert (await _json(body))["type"] == PROBLEM + "upstream-timeout"
        assert e.app.calls == 2
        assert waited < 0.9  # two tries of 100 ms, not the route's 5 s


async def test_a_per_try_timeout_504_names_the_per_try_limit() -> None:
    retry = f"{{attempts: 2, {FAST}, per_try_timeout: 100ms, on: [timeout]}}"
    async with env([(1.0, 200)], route_yaml(retry)) as e:
        status, _, body, _ = await e.send()
        assert status == 504
        assert "5s" not in str((await _json(body))["detail"])


# -- 7: a streamed body ----------------------------------------------------------------------


async def test_a_streamed_request_body_is_never_resent() -> None:
    yaml = route_yaml(f"{{attempts: 3, {FAST}}}", extra="    request_buffer: 1KiB\n")

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"y" * 4096  # 64 KiB, chunked: larger than the 1 KiB buffer

    async with env([503, 200], yaml) as e:
        status, _, body, _ = await e.send("PUT", data=upload())  # PUT: idempotent
        assert (status, body) == (503, b"attempt 1")
        assert e.app.calls == 1
        assert e.app.bodies == [64 * 1024]
        assert await e.retries("503") == 0


# -- 8: backoff ----------------------------------------------------------------------------


async def test_the_backoff_delay_is_bounded_by_max_backoff() -> None:
    retry = "{attempts: 2, backoff: 200ms, max_backoff: 200ms}"
    async with env([503, 200], route_yaml(retry)) as e:
        status, _, _, waited = await e.send()
        assert status == 200
        assert e.app.calls == 2
        assert waited < 1.0


# -- 9: the bulkhead -----------------------------------------------------------------------


async def test_the_bulkhead_refuses_at_once_past_max_in_flight_and_frees_the_slot() -> None:
    async with env([200], route_yaml(extra="    max_in_flight: 2\n")) as e:
        held = [asyncio.create_task(e.send(path="/hold")) for _ in range(2)]
        await poll(lambda: _true(e.app.held == 2))
        status, headers, body, waited = await e.send()
        assert status == 503
        assert headers["Content-Type"].startswith("application/problem+json")
        assert headers["Retry-After"] == "1"
        assert (await _json(body))["type"] == PROBLEM + "route-overloaded"
        assert e.app.calls == 2  # never reached the app
        assert waited < 0.5
        assert await e.metric("sidecar_bulkhead_rejected_total") == 1
        e.app.release.set()
        assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
        status, _, _, _ = await e.send()
        assert status == 200
        assert await e.metric("sidecar_bulkhead_rejected_total") == 1


async def test_a_client_that_hangs_up_frees_its_bulkhead_slot() -> None:
    async with env([200], route_yaml(extra="    max_in_flight: 1\n")) as e:
        _, writer = await asyncio.open_connection("127.0.0.1", e.sidecar.port)
        writer.write(b"GET /hold HTTP/1.1\r\nHost: sidecar.test\r\n\r\n")
        await writer.drain()
        await poll(lambda: _true(e.app.held == 1))
        assert (await e.send())[0] == 503
        writer.close()  # hang up while the app still holds the request

        async def passes() -> bool:
            return (await e.send())[0] == 200

        await poll(passes)
        assert e.app.release.is_set() is False  # freed by the hang-up, not the app


async def _true(value: bool) -> bool:
    return value


async def _json(body: bytes) -> dict[str, Any]:
    return json.loads(body)  # type: ignore[no-any-return]
