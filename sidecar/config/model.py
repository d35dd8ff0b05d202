"""The frozen, precompiled configuration the rest of the sidecar reads.

Everything here is built once by the loader; the hot path only reads these objects.
Durations are float seconds, sizes are int bytes, header names are lower-case.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address = Address("0.0.0.0", 8000)
    admin_listen: Address = Address("0.0.0.0", 9901)
    max_body: int = 10 * 1024 * 1024
    drain: float = 5.0
    shutdown_grace: float = 25.0
    workers: int = 1
    # Client-side keep-alive; above common load-balancer idle timeouts (AWS ALB: 60 s)
    # so the LB, not the sidecar, closes idle connections and never races us.
    keepalive_timeout: float = 75.0
    # Peers whose X-Forwarded-Proto/-Host are believed; everyone else's are replaced.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # How often the config file is checked for changes (0 turns watching off).
    reload_interval: float = 1.0
    # Gate /ready on the state backend's health (reported only, by default).
    ready_requires_state: bool = False
    # The whole request head (request line and headers) must arrive within this long of
    # its first byte (or of the connection opening); a slowloris connection is then closed.
    header_timeout: float = 10.0
    # Client connections open at once per process; one more is answered 503 and closed.
    max_connections: int = 4096


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8080"
    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8080
    # Path prefix of `url` (no trailing slash), prepended to every forwarded path.
    base_path: str = ""
    connect_timeout: float = 1.0
    max_connections: int = 256
    # Pooled keep-alive connections are dropped after this long idle: below gunicorn's 2 s and
    # uvicorn's/Node's 5 s, so the app never closes a connection we are about to reuse.
    idle_timeout: float = 1.5
    # Longest wait for a free connection when all max_connections are busy (then 503).
    pool_timeout: float = 1.0
    # Largest response head (status line and header fields, 1xx heads included) accepted.
    max_response_header_size: int = 64 * 1024
    # Readiness probes the upstream with a TCP connect, or an HTTP GET of this path if set.
    health_path: str | None = None
    # Largest WebSocket message relayed (aiohttp's default is 4 MiB on both sides).
    websocket_max_message: int = 4 * 1024 * 1024
    # A WebSocket session with no frame either way for this long is closed, 1001 both ways
    # (0: never); the sidecar's own heartbeat pings and pongs do not count as frames.
    websocket_idle_timeout: float = 300.0
    # The sidecar pings a client silent for this long (0: no heartbeat), and closes the
    # session if the pong has not come back within websocket_pong_timeout.
    websocket_heartbeat: float = 30.0
    websocket_pong_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    url: str = "memory://"
    key_prefix: str = "sidecar:"
    timeout: float = 0.1
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Organisation and user from a verified JWT's claims instead of the identity headers."""

    # Where the token is; a "Bearer " scheme in front of it is taken off.
    header: str = "authorization"
    algorithms: tuple[str, ...] = ("RS256",)
    # Exactly one source of keys (unless verify is false): a PEM public key (RS*/ES*/PS*),
    # a JWKS file (keys picked by `kid`), or a shared secret (HS*).
    key_file: str | None = None
    jwks_file: str | None = None
    secret: str | None = None
    org_claim: str = "org_id"
    user_claim: str = "sub"
    # Checked when set: the token's `iss` must equal it, its `aud` must contain it.
    issuer: str | None = None
    audience: str | None = None
    # Clock skew allowed on exp/nbf/iat (Envoy's jwt_authn default).
    leeway: float = 60.0
    # false takes claims from unverified tokens (must be explicit; warned about at start).
    verify: bool = True
    # The verification keys, read and parsed at load (not part of the config's identity).
    keys: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    org_header: str = "x-org-id"
    user_header: str = "x-user-id"
    jwt: JwtConfig | None = None


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = True
    # Fraction of requests logged, 0.0-1.0 (errors, status >= 500, are always logged).
    sample: float = 1.0
    include_query: bool = False
    # Request headers logged as `req_headers` (lower-case); redacted ones are never logged.
    headers: tuple[str, ...] = ()
    # Never logged, whatever `headers` says; the built-in set is always included.
    redact_headers: frozenset[str] = frozenset(
        {"authorization", "proxy-authorization", "cookie", "set-cookie"}
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    access: AccessLogConfig = AccessLogConfig()
    # How organisation and user ids appear in logs: "hashed" (HMAC-SHA256 with
    # `id_hash_key`, so lines correlate without exposing ids) or "clear".
    ids: str = "hashed"
    # The HMAC key; without one each process draws a random key (hashes then differ
    # between replicas and restarts).
    id_hash_key: str | None = None


@dataclass(frozen=True, slots=True)
class SpanExportConfig:
    """OTLP/HTTP span export (needs the `otel` extra); off while `endpoint` is None."""

    endpoint: str | None = None
    service_name: str = "sidecar"
    # Spans waiting to be sent; beyond this new spans are dropped (and counted).
    queue_size: int = 2048
    batch_size: int = 512
    interval: float = 1.0
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class TracingConfig:
    # Header names as they are written on responses (matching ignores case).
    request_id_header: str = "X-Request-Id"
    trace_id_header: str = "X-Trace-Id"
    # Share of new traces (no valid parent) that are sampled; a parent's decision is kept.
    sample_ratio: float = 1.0
    # B3: accept it when there is no traceparent; emit it upstream ("none", "single", "multi").
    b3_accept: bool = True
    b3_emit: str = "none"
    export: SpanExportConfig = SpanExportConfig()


@dataclass(frozen=True, slots=True)
class RouteTracing:
    """Per route: whether trace headers are read, made and propagated."""

    enabled: bool = True


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """How a request is matched; every condition that is set must hold."""

    path: str | None = None
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None
    # Exact host (lower-case, no port), or a "*.example.com" suffix wildcard.
    host: str | None = None
    # Upper-case method names; None matches every method.
    methods: frozenset[str] | None = None

    @property
    def is_catch_all(self) -> bool:
        """True when this match accepts every request (so later routes are unreachable)."""
        return (
            self.path is None
            and self.path_regex is None
            and self.host is None
            and self.methods is None
            and self.path_prefix in (None, "/")
        )


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """A retried request with the same key runs once; retries get the first response."""

    enabled: bool = True
    methods: frozenset[str] = frozenset({"POST", "PATCH"})
    # A listed method without a key gets 400 when required; else it passes unprotected.
    required: bool = False
    header: str = "idempotency-key"
    # How long a completed record (and its replayable response) is kept.
    ttl: float = 24 * 3600.0
    # How long an in-progress claim lives without renewal (its owner renews it while the
    # upstream runs); after a crash, retries execute again once it has expired.
    lease: float = 30.0
    # A retry arriving while the first is in flight waits this long for its result (0: 409).
    wait: float = 0.0
    max_request_body: int = 1024 * 1024
    max_response_body: int = 256 * 1024
    # Statuses meaning "not acted upon, a retry may pass": the key is released and the
    # answer not kept (408, 425, 429, 503: not processed; 401, 403, 407, 409, 412: refused).
    release_statuses: frozenset[int] = frozenset({401, 403, 407, 408, 409, 412, 425, 429, 503})
    # Any other 5xx from the app is an unknown outcome: stored and replayed, as Stripe does
    # (false: released instead, so a retry runs again).
    cache_5xx: bool = True
    # What happens when the store cannot answer: "closed" (503) or "open" (forward unprotected).
    on_store_error: str = "closed"
    mismatch_status: int = 422
    # A caller with neither identity header: "credentials" (records scoped by a hash of
    # credentials_header; refused without it), "reject" (400), or "bypass" (unprotected).
    anonymous: str = "credentials"
    credentials_header: str = "authorization"
    # The header that tells the app the claim's token (time-ordered: an app can fence on
    # it); None sends none. A client-sent header of this name never reaches the app.
    claim_header: str | None = "Idempotency-Claim"
    # Records are kept under this name (the route's name when None): renaming a route while
    # keeping its namespace keeps its records.
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class CostConfig:
    """What one request spends of each limit: `amount`, or a header's value within bounds."""

    amount: int = 1
    header: str | None = None
    minimum: int = 0
    maximum: int = 1000


# Quota periods: the calendar unit of a `window: 1d | 1w | 1mo` quota.
QUOTA_PERIODS = {"1d": "day", "1w": "week", "1mo": "month"}


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """One rate limit (rolling, GCRA) or quota (a calendar period in a time zone)."""

    name: str
    kind: str  # "rate" or "quota"
    limit: int
    # rate: the window in seconds. quota: the period's nominal length (1d = 86400).
    window: float
    # quota: "day", "week" (from Monday) or "month"; None for a rate limit.
    period: str | None = None
    # rate: requests that may be spent at once (None: the whole limit).
    burst: int | None = None
    # quota: the zone whose midnight ends a period (overridable per org).
    timezone: str = "UTC"
    cost: CostConfig = CostConfig()
    # "org", "org_user" (each user of an org on its own) or "route" (one for everybody).
    scope: str = "org"
    # Counted, reported and logged, never enforced.
    shadow: bool = False
    # "all": every admitted request that reached the app counts; "success": those whose
    # answer is in refund_statuses (default: every 5xx) or that broke off are refunded.
    count: str = "all"
    refund_statuses: frozenset[int] | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Per-organisation rate limits and quotas on a route."""

    limits: tuple[LimitConfig, ...] = ()
    # org -> limit name -> limit, over the configured ones (the admin API's win over these).
    overrides: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    # org -> time zone of its calendar quotas (over each limit's `timezone`).
    timezones: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # A request without an organisation: "reject" (401) or "limit" (one `anonymous`
    # bucket per client address).
    anonymous: str = "reject"
    # "local": an in-process limiter at limit / replicas; "open": let through; "closed": 503.
    on_store_error: str = "local"
    replicas: int = 1
    # Requests of one organisation in flight at once on this route, per process (None: no cap).
    max_in_flight: int | None = None
    # RateLimit-Policy and RateLimit (the IETF draft), X-RateLimit-* (the de-facto trio).
    draft_headers: bool = True
    legacy_headers: bool = False
    # Usage crossing this share of a limit is counted and logged (near_limit).
    near_limit_ratio: float = 0.8
    # Organisations whose usage is exported as a gauge (labels stay bounded).
    report_orgs: tuple[str, ...] = ()
    # Counters are kept under this name (the route's when None): routes sharing a
    # namespace share the counters of their same-named limits.
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class SlowCallConfig:
    """A call whose response headers take `threshold` or longer is slow; the breaker opens
    when at least `rate` of the window's calls were slow."""

    threshold: float = 2.0
    rate: float = 0.8


@dataclass(frozen=True, slots=True)
class HalfOpenConfig:
    # Requests let through to probe the app, across all replicas together.
    probes: int = 5
    # After the probes succeed, the share of traffic let through grows from 0 to all
    # over this long (0: everything at once).
    ramp: float = 10.0


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    """What an open breaker answers: a static response, another upstream, or (by default)
    503 problem+json with Retry-After."""

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    body: str = ""
    # Another upstream that answers instead of the app (default connection settings).
    upstream: UpstreamConfig | None = None

    @property
    def static(self) -> bool:
        return self.status is not None


# What a breaker counts as a failure by default: the app's 502/503/504, and a request the
# sidecar could not complete because the app refused, timed out, reset or broke off.
DEFAULT_BREAKER_FAILURES: frozenset[int | str] = frozenset(
    {502, 503, 504, "connect_error", "timeout", "reset", "stream"}
)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """A circuit breaker on a route (docs/breakers.md): shared across replicas."""

    # "route": one breaker for the route; "route_org": one per route and organisation.
    scope: str = "route"
    window: float = 10.0
    min_requests: int = 20
    failure_rate: float = 0.5
    slow_call: SlowCallConfig | None = SlowCallConfig()
    # Opens after this many failures in a row, whatever the rate (0: off).
    consecutive_failures: int = 10
    open_for: float = 5.0
    max_open_for: float = 120.0
    # Each open time is scaled by a random factor within ±jitter.
    jitter: float = 0.15
    half_open: HalfOpenConfig = HalfOpenConfig()
    # App statuses and failure kinds (connect_error, timeout, reset, stream) that count.
    failures: frozenset[int | str] = DEFAULT_BREAKER_FAILURES
    fallback: FallbackConfig = FallbackConfig()
    # How often a replica sends its counts to the store and learns the shared state.
    flush_interval: float = 0.25
    # False: each replica's breaker decides alone (the store is not used).
    shared: bool = True


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries of a failed attempt (docs/breakers.md#retries)."""

    # Attempts in all, the first included.
    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 1.0
    # App statuses and failure kinds (connect_error, timeout, reset) that are retried.
    on: frozenset[int | str] = frozenset({"connect_error", 502, 503, 504})
    # Retries may be at most this share of the route's requests over `budget_window`...
    budget: float = 0.2
    # ... but this many retries are always allowed (Envoy's min_retry_concurrency).
    min_retries: int = 3
    budget_window: float = 10.0
    # Each attempt's own limit for the response headers (None: the route's timeout).
    per_try_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: RouteMatch
    # Deadline for the upstream's response headers; past it the client gets 504.
    timeout: float = 15.0
    # Longest silence allowed between two body chunks, either way.
    idle_timeout: float = 300.0
    # Largest request body accepted on this route (defaults to server.max_body).
    max_body: int = 10 * 1024 * 1024
    # Request bodies up to this size are read completely before an upstream connection is
    # taken (nginx's proxy_request_buffering); larger ones stream (0: always stream).
    request_buffer: int = 64 * 1024
    # A request body must arrive within body_timeout, extended by one second per
    # min_upload_rate bytes received (0 turns the rate rule off; idle_timeout still holds).
    body_timeout: float = 10.0
    min_upload_rate: int = 1024
    tracing: RouteTracing = RouteTracing()
    idempotency: IdempotencyConfig | None = None
    quotas: QuotaConfig | None = None
    circuit_breaker: BreakerConfig | None = None
    retry: RetryConfig | None = None
    # Requests under way on this route at once, per process; the next gets 503 at once
    # instead of queueing (a bulkhead). None: no cap.
    max_in_flight: int | None = None
    # The YAML line the route starts on, for messages.
    line: int = 0


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    state: StateConfig = StateConfig()
    identity: IdentityConfig = IdentityConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    routes: tuple[RouteConfig, ...] = ()
    # Where it came from: the file path ("<embedded>" for the built-in default),
    # the SHA-256 of its bytes, and when it was loaded (Unix time).
    source: str = "<embedded>"
    sha256: str = ""
    loaded_at: float = 0.0
