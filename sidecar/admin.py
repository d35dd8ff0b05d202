"""The admin listener: /live, /ready, /health and /metrics, outside every policy.

Liveness checks only that this process's event loop answers; it never looks at a
dependency, so a sick app or Redis can never make Kubernetes restart the sidecar.
Readiness adds: config loaded, listener bound, not draining, upstream reachable.
The state store is reported, and gates readiness only if `server.ready_requires_state`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from sidecar import __version__
from sidecar.config import SidecarConfig, UpstreamConfig
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import Metrics
from sidecar.relaying import app_url
from sidecar.store import StateStore, StoreError

CheckFn = Callable[[], Awaitable[tuple[bool, str]]]
# Probes from several kubelets and scrapers must not each open a connection to the app.
_PROBE_CACHE_SECONDS = 1.0


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

    def __init__(self, status: Callable[[], Status], store: StateStore, metrics: Metrics) -> None:
        self._status = status
        self._store = store
        self._metrics = metrics
        self._upstream_probe = UpstreamProbe(lambda: status().config.upstream)
        self.upstream = CachedProbe(self._upstream_probe.check)
        self.store = CachedProbe(self._check_store)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/live", self.live)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
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
        reasons = await self._not_ready_reasons(self._status())
        if reasons:
            return _json(503, {"status": "not ready", "reasons": reasons})
        return _json(200, {"status": "ready"})

    async def _not_ready_reasons(
        self, status: Status, probes: tuple[ProbeResult, ProbeResult] | None = None
    ) -> list[str]:
        reasons = []
        if status.draining:
            reasons.append("draining")
        if not status.listening:
            reasons.append("listener not bound")
        upstream, store = probes or await self._probes()
        if not upstream.ok:
            reasons.append(f"upstream unreachable: {upstream.detail}")
        if status.config.server.ready_requires_state and not store.ok:
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
