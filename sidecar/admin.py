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
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web

from sidecar import __version__
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.store import StoreError

if TYPE_CHECKING:
    from sidecar.app import Sidecar

CheckFn = Callable[[], Awaitable[tuple[bool, str]]]
# Probes from several kubelets and scrapers must not each open a connection to the app.
_PROBE_CACHE_SECONDS = 1.0


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


def upstream_check(sidecar: Sidecar) -> CheckFn:
    """TCP connect to the app, or GET `upstream.health_path` expecting a status below 500."""

    async def check() -> tuple[bool, str]:
        upstream = sidecar.holder.runtime.config.upstream
        if upstream.health_path is None:
            async with asyncio.timeout(upstream.connect_timeout):
                _, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.close()
            await writer.wait_closed()
            return True, "tcp connect ok"
        url = sidecar.forwarder.upstream_url(upstream.health_path)
        timeout = aiohttp.ClientTimeout(total=max(upstream.connect_timeout, 1.0) * 2)
        async with sidecar.forwarder.session.get(url, timeout=timeout) as response:
            return response.status < 500, f"GET {upstream.health_path} -> {response.status}"

    return check


def store_check(sidecar: Sidecar) -> CheckFn:
    async def check() -> tuple[bool, str]:
        try:
            rtt = await sidecar.store.ping()
        except StoreError as exc:
            return False, str(exc)
        return True, f"ping {rtt * 1000:.2f} ms"

    return check


class Admin:
    """Handlers for the admin listener."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.upstream = CachedProbe(upstream_check(sidecar))
        self.store = CachedProbe(store_check(sidecar))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/live", self.live)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def live(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        reasons = await self._not_ready_reasons()
        if reasons:
            return _json(503, {"status": "not ready", "reasons": reasons})
        return _json(200, {"status": "ready"})

    async def _not_ready_reasons(
        self, probes: tuple[ProbeResult, ProbeResult] | None = None
    ) -> list[str]:
        sidecar = self.sidecar
        reasons = []
        if sidecar.holder.draining:
            reasons.append("draining")
        if not sidecar.listening:
            reasons.append("listener not bound")
        upstream, store = probes or await self._probes()
        if not upstream.ok:
            reasons.append(f"upstream unreachable: {upstream.detail}")
        if sidecar.holder.runtime.config.server.ready_requires_state and not store.ok:
            reasons.append(f"state store unavailable: {store.detail}")
        return reasons

    async def _probes(self) -> tuple[ProbeResult, ProbeResult]:
        upstream, store = await asyncio.gather(self.upstream.result(), self.store.result())
        return upstream, store

    async def health(self, request: web.Request) -> web.Response:
        sidecar = self.sidecar
        config = sidecar.holder.runtime.config
        upstream, store = await self._probes()
        reasons = await self._not_ready_reasons((upstream, store))
        body = {
            "status": "ready" if not reasons else "not ready",
            "reasons": reasons,
            "version": __version__,
            "pid": sidecar.pid,
            "uptime_seconds": round(time.monotonic() - sidecar.started_monotonic, 3),
            "draining": sidecar.holder.draining,
            "config": {
                "source": config.source,
                "sha256": config.sha256,
                "loaded_at": config.loaded_at,
                "reloads": sidecar.reload_count,
                "last_reload_error": sidecar.last_reload_error,
            },
            "routes": [
                {"name": r.config.name, "timeout": r.config.timeout}
                for r in sidecar.holder.runtime.routes.routes
            ],
            "upstream": _probe_json(upstream) | {"url": config.upstream.url},
            "state": _probe_json(store) | {"backend": sidecar.store.backend},
        }
        return _json(200, body)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.sidecar.metrics.render()
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
