"""The sidecar's lifecycle: start listeners, swap configs on reload, drain on SIGTERM.

Shutdown follows what Kubernetes needs for a rollout that loses no request:
1. SIGTERM: /ready turns 503 at once and responses carry `Connection: close`, while
   traffic keeps flowing for `server.drain` (endpoints are removed asynchronously);
2. the listener closes; idle keep-alive connections are closed;
3. in-flight requests get `server.shutdown_grace` in total to finish, then are cancelled;
4. background store writes get what is left of that deadline (at least a second); exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar.admin import Admin, Status
from sidecar.background import BackgroundTasks
from sidecar.chain import build_chain
from sidecar.config import ConfigError, RouteConfig, RouteMatch, SidecarConfig, load_config
from sidecar.config.jwt import warnings_for
from sidecar.handler import (
    ProxyHandler,
    ProxyServer,
    Runtime,
    RuntimeHolder,
    answer_unrouted,
    protected_headers,
)
from sidecar.identity import IdentityResolver
from sidecar.logs import AccessLog, IdentityHasher, LogSink, route_library_logs
from sidecar.metrics import Metrics
from sidecar.policies import PolicyDeps, PolicyState, build_policies, tracing
from sidecar.routing import UNROUTED, CompiledRoute, RouteTable, compile_matcher
from sidecar.spans import SpanExporter
from sidecar.store import StateStore, check_state_config, open_store
from sidecar.upstream import ConnectionBudget, Forwarder

# After the requests' deadline: the last steps of cancelled requests and store writes that
# outlived their requests (idempotency outcomes) finish within this window.
_LAST_WRITES_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What tells us a config file may have changed (a ConfigMap swap changes all of it)."""

    device: int
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str) -> FileStamp | None:
        try:
            st = os.stat(path)  # follows the ..data symlink of a ConfigMap mount
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Sidecar:
    """One sidecar process: a proxy listener, an admin listener, one config at a time."""

    def __init__(
        self,
        config: SidecarConfig,
        config_path: str | None = None,
        *,
        log: LogSink | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config_path = config_path
        self.log = log or LogSink(level=config.logging.level)
        self.metrics = Metrics()
        self.log.count_drops_with(self.metrics.log_lines_dropped)
        self.reuse_port = reuse_port
        self.pid = os.getpid()
        self._random_id_key = os.urandom(32)
        self.started_monotonic = time.monotonic()
        self.listening = False
        self.reload_count = 0
        self.last_reload_error: str | None = None
        self.store: StateStore = open_store(config.state, self.metrics.observe_store)
        self.spans = (
            SpanExporter(config.tracing.export, self.metrics, self.log)
            if config.tracing.export.endpoint is not None
            else None
        )
        # One budget of upstream connections for every pool this process makes.
        self.budget = ConnectionBudget(config.upstream.max_connections)
        self.forwarder = Forwarder(config.upstream, self.budget)
        self.background = BackgroundTasks()
        self.policy_state = PolicyState()
        self.holder = RuntimeHolder(self.build_runtime(config))
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._proxy_server: ProxyServer | None = None
        self._listener: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: set[Forwarder] = set()
        self.metrics.config_last_reload.set(config.loaded_at)

    # -- building a config generation ------------------------------------------------

    def build_runtime(self, config: SidecarConfig, forwarder: Forwarder | None = None) -> Runtime:
        """Compile every route's chain; nothing here runs per request."""
        forwarder = forwarder or self.forwarder
        deps = PolicyDeps(
            config=config,
            store=self.store,
            metrics=self.metrics,
            log=self.log,
            spans=self.spans,
            background=self.background,
            state=self.policy_state,
            identity=IdentityResolver(config.identity),
        )
        compiled = []
        for route in config.routes:
            chain = build_chain(build_policies(route, deps), forwarder.for_route(route))
            compiled.append(
                CompiledRoute(
                    config=route,
                    chain=chain,
                    metrics=self.metrics.route(route.name),
                    matches=compile_matcher(route.match),
                )
            )
        access_log = None
        if config.logging.access.enabled:
            access_log = AccessLog(
                config.logging.access, self.log, config.identity, self._id_hasher(config)
            )
        return Runtime(
            config=config,
            routes=RouteTable(compiled),
            unrouted=self._unrouted_chain(config, deps),
            access_log=access_log,
            request_id_header=config.tracing.request_id_header,
            protected_headers=protected_headers(config),
            forwarder=forwarder,
        )

    def _id_hasher(self, config: SidecarConfig) -> IdentityHasher:
        if config.logging.ids == "clear":
            return IdentityHasher(None)
        key = config.logging.id_hash_key
        # Without a configured key, one random key per process: hashes still correlate
        # within this process's logs and reveal nothing.
        return IdentityHasher(key.encode() if key else self._random_id_key)

    def _unrouted_chain(self, config: SidecarConfig, deps: PolicyDeps) -> CompiledRoute:
        """Requests no route takes still get trace headers on their 404 (or 400)."""
        route = RouteConfig(name=UNROUTED, match=RouteMatch(), max_body=config.server.max_body)
        tracer = tracing.build(route, deps)
        return CompiledRoute(
            config=route,
            chain=build_chain([tracer] if tracer is not None else [], answer_unrouted),
            metrics=self.metrics.route(UNROUTED),
            matches=lambda method, host, path: False,
        )

    # -- start and stop --------------------------------------------------------------

    async def start(self) -> None:
        config = self.holder.runtime.config
        loop = asyncio.get_running_loop()
        handler = ProxyHandler(self.holder, self.metrics, self.log)
        self._proxy_server = ProxyServer(
            handler,
            handler_cancellation=True,
            auto_decompress=False,
            access_log=None,
            keepalive_timeout=config.server.keepalive_timeout,
        )
        listen = config.server.listen
        self._listener = await loop.create_server(
            self._proxy_server,
            listen.host,
            listen.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        admin_app = Admin(
            self.status, self.store, self.metrics, policy_state=self.policy_state
        ).app()
        self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        admin = config.server.admin_listen
        site = web.TCPSite(
            self._admin_runner, admin.host, admin.port, reuse_port=self.reuse_port or None
        )
        await site.start()
        if self.spans is not None:
            self.spans.start()
        self.listening = True
        self._spawn(self._watch_config())
        # Everything made so far (modules, config, routes) lives as long as the process:
        # move it out of the collector's sight so per-request collections stay short.
        gc.freeze()
        self.log.event(
            "sidecar.started",
            pid=self.pid,
            listen=str(listen),
            admin_listen=str(admin),
            upstream=config.upstream.url,
            state=self.store.backend,
            config=config.source,
            config_sha256=config.sha256,
            routes=len(config.routes),
        )
        if config.identity.jwt is not None:
            for warning in warnings_for(config.identity.jwt):
                self.log.event("identity.jwt_warning", "warning", detail=warning)

    def status(self) -> Status:
        """A snapshot of this process for the admin endpoints."""
        return Status(
            config=self.holder.runtime.config,
            draining=self.holder.draining,
            listening=self.listening,
            pid=self.pid,
            uptime_seconds=time.monotonic() - self.started_monotonic,
            reloads=self.reload_count,
            last_reload_error=self.last_reload_error,
            state_backend=self.store.backend,
        )

    @property
    def bound_ports(self) -> tuple[int, int]:
        """The (proxy, admin) ports actually bound (useful when the config says port 0)."""
        assert self._listener is not None and self._admin_runner is not None
        proxy = self._listener.sockets[0].getsockname()[1]
        admin = self._admin_runner.addresses[0][1]
        return int(proxy), int(admin)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    def request_stop(self) -> None:
        if not self.holder.draining:
            self.holder.draining = True
            drain = self.holder.runtime.config.server.drain
            self.log.event("sidecar.draining", drain_seconds=drain)
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain, stop listening, let in-flight requests finish, release everything.

        One deadline for the requests: `shutdown_grace` after the drain, then whatever
        still runs is cancelled (aiohttp's own shutdown would wait the grace twice). Store
        writes that outlived their requests (idempotency outcomes) get what is left of it,
        and at least the second after it, which also covers the cancelled requests' last
        steps; so the stop takes at most drain + shutdown_grace + 1 s (plus the span
        exporter's final flush, bounded by tracing.export.timeout, when spans are exported).
        """
        loop = asyncio.get_running_loop()
        server_config = self.holder.runtime.config.server
        self.holder.draining = True
        await asyncio.sleep(server_config.drain)
        deadline = loop.time() + server_config.shutdown_grace
        if self._listener is not None:
            self._listener.close()
        self.listening = False
        self.log.event("sidecar.stopping", grace_seconds=server_config.shutdown_grace)
        # WebSocket sessions never end by themselves: 1001 both ways now, not at the deadline.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                await asyncio.gather(
                    *(
                        forwarder.websockets.close()
                        for forwarder in (*self._retired, self.forwarder)
                    )
                )
        if self._proxy_server is not None:
            self._proxy_server.close_idle()
            await self._proxy_server.cancel_running(deadline, deadline + _LAST_WRITES_SECONDS / 2)
        retired = set(self._retired)  # their retiring tasks end below; they close here
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.policy_state.aclose()  # sync loops stop before the last writes drain
        await self.background.drain(max(deadline + _LAST_WRITES_SECONDS - loop.time(), 0.1))
        # Bounded too: a WebSocket peer that reads nothing must not hold up the exit.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline + _LAST_WRITES_SECONDS - loop.time(), 0.1)):
                for forwarder in (*retired, self.forwarder):
                    await forwarder.close()
        await self.store.close()
        if self.spans is not None:
            await self.spans.close()
        served = self._proxy_server.requests_count if self._proxy_server else 0
        self.log.event("sidecar.stopped", requests_served=served)
        self.log.flush()

    # -- hot reload ------------------------------------------------------------------

    async def _watch_config(self) -> None:
        path = self.config_path
        interval = self.holder.runtime.config.server.reload_interval
        # Unknown at first, so the first look compares the file with the loaded config: a
        # change written between loading it and this task starting is not missed.
        stamp: FileStamp | None = None
        looked = False
        while True:
            forced = False
            if path is None or interval <= 0:
                await self._reload_requested.wait()
                forced = True
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._reload_requested.wait()
                        forced = True
            self._reload_requested.clear()
            if path is None:
                continue
            new_stamp = FileStamp.of(path)
            if forced or not looked or new_stamp != stamp:
                stamp, looked = new_stamp, True
                try:
                    self.reload(forced=forced)
                except Exception as exc:  # never let one bad reload end watching for good
                    self._reload_failed([f"reloading failed: {type(exc).__name__}"])

    def reload(self, *, forced: bool = False) -> bool:
        """Load, validate and swap in the config file; keep the old one if it is invalid."""
        assert self.config_path is not None
        current = self.holder.runtime.config
        if not forced and _file_sha256(self.config_path) == current.sha256:
            return False
        try:
            config = load_config(self.config_path, check_state=check_state_config)
        except ConfigError as exc:
            return self._reload_failed([str(issue) for issue in exc.issues])
        except OSError as exc:
            return self._reload_failed([f"{self.config_path}: {exc.strerror or exc}"])
        restart_only = _restart_only_changes(current, config)
        self.budget.resize(config.upstream.max_connections)
        forwarder = (
            Forwarder(config.upstream, self.budget) if config.upstream != current.upstream else None
        )
        try:
            runtime = self.build_runtime(config, forwarder)
        except Exception as exc:  # a bug rather than a bad file: keep serving the old config
            if forwarder is not None:
                self._spawn(forwarder.close())
            return self._reload_failed([f"building the new config failed: {type(exc).__name__}"])
        if forwarder is not None:
            self._retire(self.forwarder, config.server.shutdown_grace)
            self.forwarder = forwarder
        self.holder.runtime = runtime
        self.policy_state.retain(route.name for route in config.routes)
        self._spawn(self.policy_state.close_retired())
        self.reload_count += 1
        self.last_reload_error = None
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload.set(config.loaded_at)
        self.log.event(
            "config.reloaded",
            config=config.source,
            config_sha256=config.sha256,
            routes=len(config.routes),
            needs_restart=restart_only or None,
        )
        return True

    def _reload_failed(self, issues: list[str]) -> bool:
        self.last_reload_error = "; ".join(issues)
        self.metrics.config_reloads.labels("error").inc()
        self.log.event("config.reload_failed", level="error", errors=issues)
        return False

    def _retire(self, forwarder: Forwarder, grace: float) -> None:
        """Requests under way on a replaced upstream pool finish on it; it closes after the
        last, and at `grace` what still runs is cut (so no client waits on a closed pool)."""
        self._retired.add(forwarder)
        deadline = asyncio.get_running_loop().time() + grace

        async def retire() -> None:
            try:
                await forwarder.retire(deadline)
            finally:
                self._retired.discard(forwarder)

        self._spawn(retire())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _restart_only_changes(old: SidecarConfig, new: SidecarConfig) -> list[str]:
    """Settings a running process cannot change: they apply at the next restart."""
    changed = []
    for name in ("listen", "admin_listen", "workers", "keepalive_timeout", "reload_interval"):
        if getattr(old.server, name) != getattr(new.server, name):
            changed.append(f"server.{name}")
    if old.state != new.state:
        changed.append("state")
    if old.logging.level != new.logging.level:
        changed.append("logging.level")
    if old.tracing.export != new.tracing.export:
        changed.append("tracing.export")
    return changed


async def serve(config: SidecarConfig, config_path: str | None, *, reuse_port: bool = False) -> int:
    """Run one sidecar process until SIGTERM/SIGINT; returns the exit code."""
    sidecar = Sidecar(config, config_path, reuse_port=reuse_port)
    route_library_logs(sidecar.log)
    await sidecar.start()
    sidecar.install_signal_handlers()
    await sidecar.wait_stopped()
    await sidecar.shutdown()
    return 0
