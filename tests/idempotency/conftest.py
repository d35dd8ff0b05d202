"""Fixtures and helpers for the idempotency tests.

- `Upstream`: a real aiohttp app on 127.0.0.1 that records every request it *executes*
  (`calls`, so `executions` is what "the app ran it once" is measured by) and answers
  by path: `/slow...` waits for `gate`, `/hang-first...` hangs on its first call only,
  `.../status/NNN` answers NNN, `/big` and `/big-stream` send 10 KiB (with a
  Content-Length, or chunked), `/broken` cuts its body off midway,
  `/gzip` answers a gzip-encoded body, `/sse` streams events (`/sse-whole`: with a Content-Length),
  anything else 201 with a JSON body naming the execution (`n`).
- `backend`: "memory" (`memory://`) or "redis" (the `redis_url` fixture, a real
  redis-server), so every semantic test runs on both.
- `make_env(...)`: an in-process sidecar in front of a fresh `Upstream`, with a client
  session and `Records`, a view of the idempotency records behind the sidecar's back.

Nothing here sleeps for synchronisation: `eventually` polls a condition, bounded.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.store import MemoryStore
from tests.proxy.conftest import config_from_yaml, metric_samples, metric_value
from tests.redis_fixture import RedisServer
from tests.support import RunningSidecar, run_app, run_sidecar

# Every test body runs inside `asyncio.timeout(TEST_TIMEOUT)`: a hang fails, never blocks.
TEST_TIMEOUT = 10.0
PROBLEM = "urn:sidecar:problem:"
ROUTE = "orders"
RECORD_PREFIX = "sidecar:idem:"
# What the app puts in Date: a replay must carry a fresh one, never this.
OLD_DATE = "Mon, 01 Jan 2001 00:00:00 GMT"
BODY = b'{"amount": 10, "currency": "EUR"}'
BIG_SIZE = 10 * 1024
IDEMPOTENCY_TOTAL = "sidecar_idempotency_total"


# --- the upstream app ----------------------------------------------------------------------


@dataclass
class Call:
    """One request the app executed, as it received it."""

    method: str
    target: str
    headers: CIMultiDictProxy[str]
    body: bytes


def big_body() -> bytes:
    """10 KiB that differ along their length (so a cut or reordered copy shows)."""
    return b"".join(f"{i:08d}".encode() for i in range(BIG_SIZE // 8))


class Upstream:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        # Requests whose handler ran to the end (a cancelled handler never counts).
        self.finished = 0
        self.gate = asyncio.Event()
        self._never = asyncio.Event()

    @property
    def executions(self) -> int:
        return len(self.calls)

    def release_all(self) -> None:
        """Let every waiting handler end (teardown: nothing may hang the sidecar's drain)."""
        self.gate.set()
        self._never.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append(Call(request.method, request.path_qs, request.headers, body))
        n = len(self.calls)
        path = request.path
        if path.startswith("/slow"):
            await self.gate.wait()
        elif path.startswith("/hang-first") and n == 1:
            await self._never.wait()
        if path.startswith("/sse-whole"):
            response = web.Response(body=sse_body(n), headers={"Content-Type": "text/event-stream"})
        elif path.startswith("/sse"):
            response = await self._sse(request, n)
        elif path.startswith("/gzip"):
            response = web.Response(
                status=201,
                body=gzip.compress(b'{"compressed": true}' * 20, mtime=0),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        elif path.startswith("/broken"):
            response = await self._broken(request)
        elif path.startswith("/big-stream"):
            response = await self._stream(request, big_body())
        elif path.startswith("/big"):
            response = web.Response(
                status=201, body=big_body(), headers={"Content-Type": "application/octet-stream"}
            )
        elif "/status/" in path:
            response = self._answer(request, n, body, int(path.rsplit("/", 1)[1]))
        else:
            response = self._answer(request, n, body, 201)
        self.finished += 1
        return response

    def _answer(self, request: web.Request, n: int, body: bytes, status: int) -> web.Response:
        headers = CIMultiDict(
            {
                "Content-Type": "application/vnd.orders+json",
                "Location": f"/orders/{n}",
                "ETag": f'"v{n}"',
                "Cache-Control": "private, max-age=60",
                "Link": f'</orders/{n}>; rel="self"',
                "Content-Language": "en",
                "Last-Modified": "Tue, 02 Jan 2001 00:00:00 GMT",
                "Set-Cookie": f"session=s{n}; HttpOnly",
                "WWW-Authenticate": 'Bearer realm="orders"',
                "X-App-Only": f"app-{n}",
                "Date": OLD_DATE,
            }
        )
        # A repeated field: replays keep every line of it, in order.
        headers.add("Link", '</orders>; rel="collection"')
        if status == 204:
            return web.Response(status=204, headers=headers)
        payload = {
            "n": n,
            "org": request.headers.get("X-Org-Id"),
            "user": request.headers.get("X-User-Id"),
            "method": request.method,
            "target": request.path_qs,
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)

    async def _stream(self, request: web.Request, data: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=201)
        response.content_type = "application/octet-stream"
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 1024):
            await response.write(data[start : start + 1024])
        await response.write_eof()
        return response

    async def _broken(self, request: web.Request) -> web.StreamResponse:
        """A 201 whose chunked body stops midway: the connection is cut after one chunk."""
        response = web.StreamResponse(status=201)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"partial": ')
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _sse(self, request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        for i in range(3):
            await response.write(f"id: {i}\ndata: run {n} event {i}\n\n".encode())
        await response.write_eof()
        return response


def sse_body(n: int) -> bytes:
    return b"".join(f"id: {i}\ndata: run {n} event {i}\n\n".encode() for i in range(3))


# --- backends and the records behind the sidecar ---------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    server: RedisServer | None = None


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The state backend under test: every semantic test runs on both."""
    if request.param == "memory":
        return Backend("memory", "memory://")
    url: str = request.getfixturevalue("redis_url")
    server: RedisServer = request.getfixturevalue("redis_server")
    return Backend("redis", url, server)


class Records:
    """The idempotency records a sidecar holds, read without going through the sidecar."""

    def __init__(self, backend: Backend, sidecar: RunningSidecar) -> None:
        self._memory: MemoryStore | None = None
        self._redis: aioredis.Redis | None = None
        if backend.server is None:
            store = sidecar.sidecar.store
            assert isinstance(store, MemoryStore)
            self._memory = store
        else:
            self._redis = aioredis.Redis(port=backend.server.port, socket_timeout=5)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def all(self) -> dict[str, dict[str, bytes]]:
        """Every record key (prefix included) with its fields."""
        if self._memory is not None:
            keyspace = self._memory.keyspace
            return {
                key: keyspace.hgetall(key)
                for key in keyspace.live_keys()
                if key.startswith(RECORD_PREFIX)
            }
        assert self._redis is not None
        out = {}
        async for raw_key in self._redis.scan_iter(match=RECORD_PREFIX + "*"):
            fields = await self._redis.hgetall(raw_key)
            out[raw_key.decode()] = {name.decode(): value for name, value in fields.items()}
        return out

    async def pttl(self, key: str) -> int:
        if self._memory is not None:
            return self._memory.keyspace.pttl(key)
        assert self._redis is not None
        return int(await self._redis.pttl(key))

    async def states(self) -> list[bytes]:
        return sorted(fields.get("s", b"?") for fields in (await self.all()).values())

    async def settled(self) -> list[bytes]:
        """The records' states once none is in progress (b"p"): the outcome of a finished
        request is written just after its response, so a test waits for it (bounded)."""

        async def none_in_progress() -> bool:
            return b"p" not in await self.states()

        await eventually(none_in_progress, "no record in progress")
        return await self.states()


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Await `check()` until it is true; bounded, so a miss fails instead of hanging."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(interval)
    except TimeoutError:
        pytest.fail(f"gave up waiting for {what} after {timeout}s")


# --- requests and replies ------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> str | None:
        """The problem type, for a problem+json answer."""
        if self.headers.get("Content-Type", "").startswith("application/problem+json"):
            value = self.json()["type"]
            assert isinstance(value, str)
            return value.removeprefix(PROBLEM)
        return None

    @property
    def replayed(self) -> str | None:
        return self.headers.get("Idempotent-Replayed")

    @property
    def n(self) -> int:
        value = self.json()["n"]
        assert isinstance(value, int)
        return value


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    path: str = "/orders",
    *,
    method: str = "POST",
    key: str | None = "k-1",
    org: str | None = "acme",
    user: str | None = "bob",
    body: bytes = BODY,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
) -> Reply:
    sent: dict[str, str] = {}
    if key is not None:
        sent["Idempotency-Key"] = key
    if org is not None:
        sent["X-Org-Id"] = org
    if user is not None:
        sent["X-User-Id"] = user
    if content_type is not None:
        sent["Content-Type"] = content_type
    sent.update(headers or {})
    data = body if method not in ("GET", "HEAD") else None
    async with session.request(
        method,
        base_url + path,
        headers=sent,
        data=data,
        skip_auto_headers=["Content-Type"],
        allow_redirects=False,
    ) as response:
        return Reply(response.status, response.headers, await response.read())


def config_text(
    state_url: str,
    upstream_url: str,
    idempotency: str = "{}",
    *,
    timeout: str = "5s",
    routes: str | None = None,
    extra: str = "",
    state_timeout: str = "1s",
) -> str:
    """A whole config: one catch-all route `orders` with `idempotency` (a YAML flow map),
    unless `routes` (YAML list items) replaces it."""
    if routes is None:
        routes = (
            f"  - name: {ROUTE}\n"
            "    match: {path_prefix: /}\n"
            f"    timeout: {timeout}\n"
            f"    idempotency: {idempotency}\n"
        )
    return (
        f"upstream:\n  url: {upstream_url}\n  connect_timeout: 1s\n"
        f'state:\n  url: "{state_url}"\n  timeout: {state_timeout}\n' + extra + "routes:\n" + routes
    )


@dataclass
class Env:
    """One sidecar in front of one recording upstream, and how to poke at both."""

    sidecar: RunningSidecar
    upstream: Upstream
    records: Records
    session: aiohttp.ClientSession
    backend: Backend

    @property
    def url(self) -> str:
        return self.sidecar.url

    async def send(self, path: str = "/orders", **kwargs: Any) -> Reply:
        return await send(self.session, self.sidecar.url, path, **kwargs)

    async def outcome(self, outcome: str, route: str = ROUTE) -> float:
        return await metric_value(
            self.sidecar.admin_url, IDEMPOTENCY_TOTAL, route=route, outcome=outcome
        )

    async def outcomes(self, route: str = ROUTE) -> dict[str, float]:
        samples = await metric_samples(self.sidecar.admin_url, IDEMPOTENCY_TOTAL)
        return {
            dict(labels)["outcome"]: value
            for labels, value in samples.items()
            if dict(labels)["route"] == route and value
        }

    async def store_calls(self, operation: str) -> float:
        return await metric_value(
            self.sidecar.admin_url,
            "sidecar_store_request_duration_seconds_count",
            operation=operation,
        )

    async def wait_executions(self, count: int) -> None:
        async def reached() -> bool:
            return self.upstream.executions >= count

        await eventually(reached, f"{count} upstream executions")

    def events(self, name: str) -> list[dict[str, object]]:
        return [record for record in self.sidecar.log.records if record.get("event") == name]


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(backend: Backend) -> AsyncIterator[EnvFactory]:
    """`await make_env(idempotency="{...}", ...)`: a sidecar on `backend` (config_text's
    arguments), in front of a new Upstream (or `upstream_url`); all torn down after."""
    stack = AsyncExitStack()
    upstreams: list[Upstream] = []
    records: list[Records] = []

    async def make(
        idempotency: str = "{}", *, upstream_url: str | None = None, **kwargs: Any
    ) -> Env:
        upstream = Upstream()
        upstreams.append(upstream)
        if upstream_url is None:
            # A handler whose client (the sidecar) hangs up is cancelled: so "the app's
            # work ran to the end" (`finished`) is evidence the sidecar did not hang up.
            upstream_url = await stack.enter_async_context(
                run_app(upstream.app(), handler_cancellation=True)
            )
        config = config_from_yaml(config_text(backend.url, upstream_url, idempotency, **kwargs))
        sidecar = await stack.enter_async_context(run_sidecar(config))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        view = Records(backend, sidecar)
        records.append(view)
        return Env(sidecar, upstream, view, session, backend)

    try:
        yield make
    finally:
        for upstream in upstreams:
            upstream.release_all()
        for view in records:
            await view.close()
        await stack.aclose()
