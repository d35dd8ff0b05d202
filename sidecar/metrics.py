"""Every Prometheus metric the sidecar exports, defined in one place.

Labels are bounded: route names come from the config, methods are folded to the standard
set, status codes are three digits. Label children are cached per route so the hot path
does a dict lookup, not a `labels()` call (which hashes and locks on every use).

With `server.workers > 1` the workers share values through prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the supervisor before import);
`render()` then merges every worker's files so /metrics adds up whichever worker answers.
"""

from __future__ import annotations

import os
import platform

import aiohttp
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.metrics import MetricWrapperBase

from sidecar import __version__

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
# Request latency as a client sees it: 5 ms to 30 s, ~10 buckets keeps observe() cheap.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Store round trips are sub-millisecond when healthy; the tail is what matters.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The sidecar's metrics, registered in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sidecar_requests",
            "Requests answered, by route, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request received to response completely sent, by route.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors",
            "Requests the upstream could not answer, by route and kind "
            "(connect, connect_timeout, pool, timeout, reset, bad_response, stream).",
            ["route", "kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests",
            "Requests being processed, by route.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_connections = Gauge(
            "sidecar_client_connections",
            "Client connections open on the proxy listener.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_connections_closed = Counter(
            "sidecar_client_connections_closed",
            "Client connections the sidecar closed on its own, by reason (header_timeout:"
            " the request head did not arrive in time; over_limit: server.max_connections).",
            ["reason"],
            registry=r,
        )
        self.config_reloads = Counter(
            "sidecar_config_reloads",
            "Configuration reload attempts, by result (success, error).",
            ["result"],
            registry=r,
        )
        self.config_last_reload = Gauge(
            "sidecar_config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (Unix time).",
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info = Gauge(
            "sidecar_build_info",
            "Always 1; the labels describe the running build.",
            ["version", "python_version", "aiohttp_version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.store_duration = Histogram(
            "sidecar_store_request_duration_seconds",
            "State store round trips, by operation (script names, or ping).",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "sidecar_store_errors",
            "State store failures, by operation and kind (timeout, unavailable, script).",
            ["operation", "kind"],
            registry=r,
        )
        self.idempotency = Counter(
            "sidecar_idempotency",
            "Idempotency decisions, by route and outcome (claimed, replayed, conflict, "
            "mismatch, bypassed, not_replayable, not_acceptable, store_error).",
            ["route", "outcome"],
            registry=r,
        )
        self.idempotency_claims_lost = Counter(
            "sidecar_idempotency_claims_lost",
            "In-progress claims whose owner could no longer prove it held them (renewals "
            "failed until the lease ran out, or another owner took the key), by route.",
            ["route"],
            registry=r,
        )
        self.ratelimit_decisions = Counter(
            "sidecar_ratelimit_decisions",
            "Rate-limit and quota decisions, by route, limit and decision (allowed, denied, "
            "shadow_denied: a shadow limit that would have refused).",
            ["route", "limit", "decision"],
            registry=r,
        )
        self.ratelimit_near_limit = Counter(
            "sidecar_ratelimit_near_limit",
            "Admitted requests that took an organisation's usage of a limit across its "
            "near_limit_ratio, by route and limit.",
            ["route", "limit"],
            registry=r,
        )
        self.ratelimit_store_fallbacks = Counter(
            "sidecar_ratelimit_store_fallbacks",
            "Requests decided without the state store (it failed or is being skipped after "
            "a failure), by route and action (local, open, closed).",
            ["route", "action"],
            registry=r,
        )
        self.ratelimit_degraded = Gauge(
            "sidecar_ratelimit_degraded",
            "1 while a route's limits run without the state store (on_store_error), else 0.",
            ["route"],
            registry=r,
            multiprocess_mode="max",
        )
        self.ratelimit_refunds = Counter(
            "sidecar_ratelimit_refunds",
            "Charges given back, by route and result (queued: a request that did not count; "
            "dropped: the store did not take the refund in time).",
            ["route", "result"],
            registry=r,
        )
        self.quota_usage_ratio = Gauge(
            "sidecar_quota_usage_ratio",
            "Share of a limit used, as of the organisation's last request on this replica; "
            "only for the organisations a route lists in report_orgs.",
            ["route", "limit", "org"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.circuit_state = Gauge(
            "sidecar_circuit_state",
            "A route's circuit breaker: 0 closed, 1 half-open, 2 open (with scope: route_org, "
            "the worst of the route's organisations).",
            ["route"],
            registry=r,
            multiprocess_mode="max",
        )
        self.circuit_transitions = Counter(
            "sidecar_circuit_transitions",
            "Circuit breaker state changes seen by this replica, by route, from and to.",
            ["route", "from", "to"],
            registry=r,
        )
        self.circuit_rejected = Counter(
            "sidecar_circuit_rejected",
            "Requests answered by the fallback because the breaker was open, half-open "
            "without a probe permit, or ramping, by route.",
            ["route"],
            registry=r,
        )
        self.circuit_degraded = Gauge(
            "sidecar_circuit_degraded",
            "1 while a route's breakers decide on this replica's numbers alone because the "
            "state store failed, else 0.",
            ["route"],
            registry=r,
            multiprocess_mode="max",
        )
        self.retries = Counter(
            "sidecar_retries",
            "Attempts after the first, by route and the reason of the attempt before "
            "(a status, or connect_error, timeout, reset).",
            ["route", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "sidecar_retry_budget_exhausted",
            "Retries not made because the route's retry budget was spent, by route.",
            ["route"],
            registry=r,
        )
        self.bulkhead_rejected = Counter(
            "sidecar_bulkhead_rejected",
            "Requests refused at once (503) because max_in_flight requests of the route "
            "were under way, by route.",
            ["route"],
            registry=r,
        )
        self.spans_exported = Counter(
            "sidecar_spans_exported",
            "Spans accepted by the OTLP collector.",
            registry=r,
        )
        self.spans_dropped = Counter(
            "sidecar_spans_dropped",
            "Spans not exported, by reason (queue_full, export_failed).",
            ["reason"],
            registry=r,
        )
        self.log_lines_dropped = Counter(
            "sidecar_log_lines_dropped",
            "Log lines lost: stdout too slow and the log buffer full, or the write failed.",
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version(), aiohttp.__version__).set(1)
        self._routes: dict[str, RouteMetrics] = {}
        self._store_children: dict[str, MetricWrapperBase] = {}

    def route(self, name: str) -> RouteMetrics:
        """The cached label children of one route (made once, at config load)."""
        metrics = self._routes.get(name)
        if metrics is None:
            metrics = self._routes[name] = RouteMetrics(self, name)
        return metrics

    def observe_store(self, operation: str, seconds: float, error_kind: str | None) -> None:
        # Operations are script names (a fixed set): cache their children like routes'.
        child = self._store_children.get(operation)
        if child is None:
            child = self._store_children[operation] = self.store_duration.labels(operation)
        child.observe(seconds)  # type: ignore[attr-defined]
        if error_kind is not None:
            self.store_errors.labels(operation, error_kind).inc()

    def render(self) -> bytes:
        """The /metrics page: this process's registry, or every worker's when multiprocess."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


class RouteMetrics:
    """Label children for one route, so recording a request costs a few dict lookups."""

    __slots__ = ("_errors", "_metrics", "_requests", "duration", "in_flight", "name")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self.name = name
        self.duration = metrics.request_duration.labels(name)
        self.in_flight = metrics.in_flight.labels(name)
        self._requests: dict[tuple[str, int], MetricWrapperBase] = {}
        self._errors: dict[str, MetricWrapperBase] = {}

    def count_request(self, method: str, status: int) -> None:
        # Methods are client input: fold unknown ones before they become a key or a label.
        key = (method if method in KNOWN_METHODS else "OTHER", status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.requests.labels(
                self.name, key[0], str(status)
            )
        child.inc()  # type: ignore[attr-defined]

    def count_upstream_error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._metrics.upstream_errors.labels(self.name, kind)
        child.inc()  # type: ignore[attr-defined]
