"""The admin listener: /live, /ready, /health and /metrics, outside every policy.

Liveness checks only that this process's event loop answers; it never looks at a
dependency, so a sick app or Redis can never make Kubernetes restart the sidecar.
Readiness adds: config loaded, listener bound, not draining, upstream reachable.
The state store is reported, and gates readiness only if `server.ready_requires_state`.

The quota endpoints (`/quotas/{org}`, `/quotas/{org}/{limit}`) read an organisation's
usage and set or remove its overrides; the breaker endpoints (`/breakers`,
`/breakers/{route}/open|close|reset`) list the circuit breakers and force one on every
replica. With `SIDECAR_ADMIN_TOKEN` set, all of them need
`Authorization: Bearer <token>`; without it, reads are open (the admin port is internal,
like /metrics) and writes are refused. See docs/admin-api.md.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from sidecar import __version__
from sidecar.chain import Problem
from sidecar.config import SidecarConfig, UpstreamConfig
from sidecar.errors import problem_response
from sidecar.handler import new_request_id, valid_request_id
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import Metrics
from sidecar.policies.base import PolicyState
from sidecar.policies.breaker.admin import ACTIONS, BreakerAdmin, UnknownBreaker
from sidecar.policies.quota.usage import QuotaAdmin, UnknownLimit
from sidecar.relaying import app_url
from sidecar.store import StateStore, StoreError

CheckFn = Callable[[], Awaitable[tuple[bool, str]]]
# Probes from several kubelets and scrapers must not each open a connection to the app.
_PROBE_CACHE_SECONDS = 1.0

ADMIN_TOKEN_ENV = "SIDECAR_ADMIN_TOKEN"
# A PUT body is `{"limit": N}`: anything much larger is not one.
MAX_ADMIN_BODY = 4096
# Overrides are counted in Lua numbers (doubles): larger integers would lose precision.
MAX_OVERRIDE = 2**53 - 1
_REALM = 'Bearer realm="sidecar-admin"'

# The admin API's own problem types (the proxy's catalogue is sidecar.errors).
ADMIN_UNAUTHORIZED = Problem(
    "admin-unauthorized", 401, "This admin endpoint needs a valid bearer token"
)
ADMIN_WRITES_DISABLED = Problem(
    "admin-writes-disabled", 403, "Admin writes are disabled: no admin token is configured"
)
ADMIN_BAD_REQUEST = Problem("admin-bad-request", 400, "The admin request is not valid")
ADMIN_BODY_TOO_LARGE = Problem("admin-body-too-large", 413, "The admin request body is too large")
ADMIN_STORE_UNAVAILABLE = Problem(
    "admin-store-unavailable", 503, "The state store is unavailable; retry later"
)
BREAKER_UNKNOWN = Problem(
    "breaker-unknown", 404, "No route of the current config has this circuit breaker"
)
QUOTA_LIMIT_UNKNOWN = Problem(
    "quota-limit-unknown", 404, "No route of the current config has a limit of this name"
)
QUOTA_OVERRIDE_MISSING = Problem(
    "quota-override-missing", 404, "This organisation has no override of this limit"
)

ADMIN_PROBLEMS: tuple[Problem, ...] = (
    ADMIN_UNAUTHORIZED,
    ADMIN_WRITES_DISABLED,
    ADMIN_BAD_REQUEST,
    ADMIN_BODY_TOO_LARGE,
    ADMIN_STORE_UNAVAILABLE,
    QUOTA_LIMIT_UNKNOWN,
    QUOTA_OVERRIDE_MISSING,
    BREAKER_UNKNOWN,
)
# The checks `/ready?exclude=...` may leave out (kube-apiserver's /readyz convention): a
# native sidecar's startup probe excludes the upstream, since the app starts only after it.
READY_EXCLUDABLE = frozenset({"upstream", "state"})
# The admin paths behind the bearer token.
_GUARDED = ("/quotas", "/breakers")
BREAKER_ACTIONS = tuple(ACTIONS)


class _FromEnv(enum.Enum):
    TOKEN = "from-env"


FROM_ENV = _FromEnv.TOKEN


@dataclass(frozen=True, slots=True)
class Status:
    """What the process reports about itself, as of now (injected: admin knows no app)."""

    config: SidecarConfig
    draining: bool
    listening: bool
    pid: int
    uptime_seconds: float
    reloads: int
    last_reload_error: str | None
    state_backend: str


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    rtt_seconds: float | None
    checked_at: float


class CachedProbe:
    """Runs a check at most once per second; concurrent callers share one attempt."""

    def __init__(self, check: CheckFn) -> None:
        self._check = check
        self._last: ProbeResult | None = None
        self._running: asyncio.Task[ProbeResult] | None = None

    async def result(self) -> ProbeResult:
        last = self._last
        if last is not None and time.monotonic() - last.checked_at < _PROBE_CACHE_SECONDS:
            return last
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        return await asyncio.shield(self._running)

    async def _run(self) -> ProbeResult:
        started = time.monotonic()
        try:
            ok, detail = await self._check()
        except Exception as exc:  # a probe reports failures, it never raises them
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        finally:
            self._running = None
        now = time.monotonic()
        self._last = ProbeResult(ok, detail, now - started if ok else None, now)
        return self._last


async def _skipped() -> ProbeResult:
    return ProbeResult(True, "not checked", None, time.monotonic())


class UpstreamProbe:
    """TCP connect to the app, or GET `upstream.health_path` expecting a status below 500.

    It has a client of its own, never the proxy's pool: a saturated pool must not make
    every replica unready at once (and a probe must not queue behind the traffic).
    """

    def __init__(self, upstream: Callable[[], UpstreamConfig]) -> None:
        self._upstream = upstream
        self._session: aiohttp.ClientSession | None = None

    async def check(self) -> tuple[bool, str]:
        upstream = self._upstream()
        if upstream.health_path is None:
            async with asyncio.timeout(upstream.connect_timeout):
                _, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.close()
            await writer.wait_closed()
            return True, "tcp connect ok"
        if self._session is None:
            # One connection at most, closed after each probe: probes are a second apart.
            connector = aiohttp.TCPConnector(limit=1, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        url = app_url(upstream, upstream.health_path)
        timeout = aiohttp.ClientTimeout(total=max(upstream.connect_timeout, 1.0) * 2)
        async with self._session.get(url, timeout=timeout, allow_redirects=False) as response:
            return response.status < 500, f"GET {upstream.health_path} -> {response.status}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Admin:
    """Handlers for the admin listener; what they report is injected by the app."""

    def __init__(
        self,
        status: Callable[[], Status],
        store: StateStore,
        metrics: Metrics,
        *,
        admin_token: str | _FromEnv | None = FROM_ENV,
        policy_state: PolicyState | None = None,
    ) -> None:
        if admin_token is FROM_ENV:
            admin_token = os.environ.get(ADMIN_TOKEN_ENV)
        # An empty token would let an empty bearer in: it means none is configured.
        self._token = admin_token.encode() if admin_token else None
        self._status = status
        self._store = store
        self._metrics = metrics
        self._policy_state = policy_state or PolicyState()
        self._upstream_probe = UpstreamProbe(lambda: status().config.upstream)
        self.upstream = CachedProbe(self._upstream_probe.check)
        self.store = CachedProbe(self._check_store)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard_api])
        app.router.add_get("/live", self.live)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/quotas/{org}", self.quota_get)
        app.router.add_put("/quotas/{org}/{limit}", self.quota_put)
        app.router.add_delete("/quotas/{org}/{limit}", self.quota_delete)
        app.router.add_get("/breakers", self.breakers_get)
        app.router.add_post("/breakers/{route}/{action}", self.breaker_force)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        await self._upstream_probe.close()

    async def _check_store(self) -> tuple[bool, str]:
        try:
            rtt = await self._store.ping()
        except StoreError as exc:
            return False, str(exc)
        return True, f"ping {rtt * 1000:.2f} ms"

    async def live(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        excluded = frozenset(request.query.getall("exclude", ()))
        unknown = sorted(excluded - READY_EXCLUDABLE)
        if unknown:
            detail = (
                f"exclude={','.join(unknown)}: /ready can exclude only "
                f"{', '.join(sorted(READY_EXCLUDABLE))}"
            )
            return _problem(request, ADMIN_BAD_REQUEST, detail)
        reasons = await self._not_ready_reasons(self._status(), excluded=excluded)
        if reasons:
            return _json(503, {"status": "not ready", "reasons": reasons})
        return _json(200, {"status": "ready"})

    async def _not_ready_reasons(
        self,
        status: Status,
        probes: tuple[ProbeResult, ProbeResult] | None = None,
        *,
        excluded: frozenset[str] = frozenset(),
    ) -> list[str]:
        reasons = []
        if status.draining:
            reasons.append("draining")
        if not status.listening:
            reasons.append("listener not bound")
        check_upstream = "upstream" not in excluded
        check_store = status.config.server.ready_requires_state and "state" not in excluded
        if probes is None:
            # Only what is checked is probed: a startup probe must not dial the app.
            upstream, store = await asyncio.gather(
                self.upstream.result() if check_upstream else _skipped(),
                self.store.result() if check_store else _skipped(),
            )
        else:
            upstream, store = probes
        if check_upstream and not upstream.ok:
            reasons.append(f"upstream unreachable: {upstream.detail}")
        if check_store and not store.ok:
            reasons.append(f"state store unavailable: {store.detail}")
        return reasons

    async def _probes(self) -> tuple[ProbeResult, ProbeResult]:
        upstream, store = await asyncio.gather(self.upstream.result(), self.store.result())
        return upstream, store

    async def health(self, request: web.Request) -> web.Response:
        upstream, store = await self._probes()
        status = self._status()
        config = status.config
        reasons = await self._not_ready_reasons(status, (upstream, store))
        body = {
            "status": "ready" if not reasons else "not ready",
            "reasons": reasons,
            "version": __version__,
            "pid": status.pid,
            "uptime_seconds": round(status.uptime_seconds, 3),
            "draining": status.draining,
            "config": {
                "source": config.source,
                "sha256": config.sha256,
                "loaded_at": config.loaded_at,
                "reloads": status.reloads,
                "last_reload_error": status.last_reload_error,
            },
            "routes": [{"name": r.name, "timeout": r.timeout} for r in config.routes],
            "upstream": _probe_json(upstream) | {"url": config.upstream.url},
            "state": _probe_json(store) | {"backend": status.state_backend},
        }
        return _json(200, body)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self._metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    @web.middleware
    async def _guard_api(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every /quotas and /breakers path (even one that matches nothing) passes the token
        check first, so an unauthenticated caller learns nothing about what exists."""
        path = request.path
        if any(path == base or path.startswith(base + "/") for base in _GUARDED):
            if self._token is not None:
                if not self._authorized(request.headers.get("Authorization")):
                    response = _problem(request, ADMIN_UNAUTHORIZED)
                    response.headers["WWW-Authenticate"] = _REALM
                    return response
            elif request.method not in ("GET", "HEAD"):
                return _problem(
                    request,
                    ADMIN_WRITES_DISABLED,
                    f"set {ADMIN_TOKEN_ENV} to enable changes through the admin API",
                )
        return await handler(request)

    def _authorized(self, header: str | None) -> bool:
        assert self._token is not None
        scheme, _, credentials = (header or "").strip().partition(" ")
        presented = credentials.strip().encode("utf-8", "surrogateescape")
        # Compared even when the scheme is wrong: the time taken does not tell them apart.
        same = hmac.compare_digest(presented, self._token)
        return same and scheme.lower() == "bearer"

    def _quotas(self) -> QuotaAdmin:
        return QuotaAdmin(self._status().config, self._store)

    async def quota_get(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        try:
            return _json(200, await self._quotas().usage(org))
        except StoreError as exc:
            return _store_down(request, exc)

    async def quota_put(self, request: web.Request) -> web.Response:
        org, limit = request.match_info["org"], request.match_info["limit"]
        body = await _read_body(request)
        if body is None:
            return _problem(
                request,
                ADMIN_BODY_TOO_LARGE,
                f"the body is larger than {MAX_ADMIN_BODY} bytes",
                max_body=MAX_ADMIN_BODY,
            )
        value = _override_value(body)
        if isinstance(value, str):
            return _problem(request, ADMIN_BAD_REQUEST, value)
        quotas = self._quotas()
        try:
            await quotas.set_override(org, limit, value)
            return _json(200, await quotas.usage(org))
        except UnknownLimit:
            return _unknown_limit(request, limit)
        except StoreError as exc:
            return _store_down(request, exc)

    async def quota_delete(self, request: web.Request) -> web.Response:
        org, limit = request.match_info["org"], request.match_info["limit"]
        quotas = self._quotas()
        try:
            if not await quotas.delete_override(org, limit):
                return _problem(
                    request,
                    QUOTA_OVERRIDE_MISSING,
                    f"organisation {org!r} has no override of limit {limit!r}",
                )
            return _json(200, await quotas.usage(org))
        except UnknownLimit:
            return _unknown_limit(request, limit)
        except StoreError as exc:
            return _store_down(request, exc)

    async def breakers_get(self, request: web.Request) -> web.Response:
        return _json(200, BreakerAdmin(self._policy_state).report())

    async def breaker_force(self, request: web.Request) -> web.Response:
        route, action = request.match_info["route"], request.match_info["action"]
        if action not in BREAKER_ACTIONS:
            return _problem(
                request,
                ADMIN_BAD_REQUEST,
                f"the action must be one of {', '.join(BREAKER_ACTIONS)}, not {action!r}",
            )
        try:
            forced = await BreakerAdmin(self._policy_state).force(
                route, action, request.query.get("org")
            )
        except UnknownBreaker as exc:
            return _problem(request, BREAKER_UNKNOWN, str(exc))
        except StoreError as exc:
            return _store_down(request, exc)
        return _json(200, forced)


async def _read_body(request: web.Request) -> bytes | None:
    """The request body, or None if it is longer than MAX_ADMIN_BODY (declared or sent)."""
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        return None
    data = bytearray()
    while True:
        chunk = await request.content.read(MAX_ADMIN_BODY + 1 - len(data))
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_ADMIN_BODY:
            return None


def _override_value(body: bytes) -> int | str:
    """The `limit` of a `{"limit": N}` body, or what is wrong with the body."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 'the body must be a JSON object: {"limit": N}'
    if not isinstance(parsed, dict) or set(parsed) != {"limit"}:
        return 'the body must be a JSON object with exactly one member: {"limit": N}'
    value = parsed["limit"]
    if isinstance(value, bool) or not isinstance(value, int):
        return '"limit" must be an integer'
    if not 0 <= value <= MAX_OVERRIDE:
        return f'"limit" must be between 0 and {MAX_OVERRIDE}'
    return value


def _problem(
    request: web.Request, problem: Problem, detail: str | None = None, **members: object
) -> web.Response:
    client_id = request.headers.get("X-Request-Id")
    request_id = client_id if client_id is not None and valid_request_id(client_id) else None
    answer = problem_response(
        problem, request_id or new_request_id(), detail, members=members or None
    )
    assert isinstance(answer.body, bytes)
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body)


def _unknown_limit(request: web.Request, limit: str) -> web.Response:
    return _problem(request, QUOTA_LIMIT_UNKNOWN, f"no route has a limit named {limit!r}")


def _store_down(request: web.Request, exc: StoreError) -> web.Response:
    response = _problem(request, ADMIN_STORE_UNAVAILABLE, str(exc))
    response.headers["Retry-After"] = "1"
    return response


def _probe_json(result: ProbeResult) -> dict[str, object]:
    rtt = None if result.rtt_seconds is None else round(result.rtt_seconds * 1000, 3)
    return {"status": "up" if result.ok else "down", "detail": result.detail, "rtt_ms": rtt}


def _json(status: int, body: object) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
