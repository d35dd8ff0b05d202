"""Stage 2 and the entry points: the raw tree, checked against the schema, to a SidecarConfig.

Every check happens here, once, at load time; what comes out is frozen and precompiled so
the request path never re-validates. Problems are collected, not raised one by one, so a
broken file is fixed in one pass.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sidecar.config.issues import DOCUMENT, ConfigError, ConfigIssue, IssueLog, join
from sidecar.config.jwt import jwt_section
from sidecar.config.model import (
    QUOTA_PERIODS,
    AccessLogConfig,
    Address,
    CostConfig,
    IdempotencyConfig,
    IdentityConfig,
    LimitConfig,
    LoggingConfig,
    QuotaConfig,
    RouteConfig,
    RouteMatch,
    RouteTracing,
    ServerConfig,
    SidecarConfig,
    SpanExportConfig,
    StateConfig,
    TracingConfig,
    UpstreamConfig,
)
from sidecar.config.raw import RawEntry, RawMap, RawNode, RawScalar, RawSeq, compose
from sidecar.config.resilience import breaker_section, retry_section
from sidecar.config.schema import (
    MISSING,
    Converter,
    Invalid,
    Missing,
    Schema,
    boolean,
    choice,
    convert,
    describe,
    duration,
    entry_line,
    fraction,
    integer,
    list_of,
    mapping_of,
    one_of_integers,
    optional,
    read_fields,
    section,
    size,
    text,
    unknown_key,
)
from sidecar.config.units import UnitError, parse_duration
from sidecar.config.values import (
    ADDRESS_EXPECTED,
    UpstreamTarget,
    parse_address,
    parse_header_name,
    parse_header_name_as_written,
    parse_host,
    parse_key_prefix,
    parse_method,
    parse_network,
    parse_otlp_endpoint,
    parse_path,
    parse_path_regex,
    parse_route_name,
    parse_state_url,
    parse_upstream_url,
)

__all__ = ["EMBEDDED_SOURCE", "embedded_config", "load_config", "parse_config"]

EMBEDDED_SOURCE = "<embedded>"
EXTENSION_PREFIX = "x-"
DEFAULT_ROUTE_NAME = "default"

_address = text(parse_address, ADDRESS_EXPECTED)
_header_name = text(parse_header_name, "a header name like X-Org-Id")
_header_names = list_of(_header_name, "a list of header names like [User-Agent]")
_path = text(parse_path, "a path starting with '/'")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _secret(node: RawNode, path: str, log: IssueLog) -> str:
    # Never quote the value back: config errors are logged and shown on /health.
    if isinstance(node, RawScalar) and isinstance(node.value, str) and node.value:
        return node.value
    raise Invalid("expected a non-empty string (the value is not shown: it is a secret)")


def _non_empty(text: str) -> str:
    if not text:
        raise ValueError("expected a non-empty string")
    return text


# --- server -----------------------------------------------------------------------------------


def _check_server(server: ServerConfig, node: RawMap, path: str, log: IssueLog) -> None:
    if _same_socket(server.listen, server.admin_listen):
        key = "admin_listen" if "admin_listen" in node.entries else "listen"
        message = f"admin_listen {server.admin_listen} collides with listen {server.listen}"
        log.add(entry_line(node, key), join(path, key), message)


def _same_socket(one: Address, other: Address) -> bool:
    # Port 0 asks the kernel for a free port, so two of them never collide.
    if one.port != other.port or one.port == 0:
        return False
    return one.host == other.host or bool({one.host, other.host} & _WILDCARD_HOSTS)


SERVER: Schema = {
    "listen": _address,
    "admin_listen": _address,
    "max_body": size(),
    "drain": duration(allow_zero=True),
    "shutdown_grace": duration(allow_zero=True),
    "workers": integer(minimum=1),
    "keepalive_timeout": duration(allow_zero=False),
    "trusted_proxies": list_of(
        text(parse_network, "an IP address or CIDR like 10.0.0.0/8"),
        "a list of IP addresses or CIDRs like [10.0.0.0/8]",
    ),
    "reload_interval": duration(allow_zero=True),
    "ready_requires_state": boolean,
    "header_timeout": duration(allow_zero=False),
    "max_connections": integer(minimum=1),
}


# --- upstream, state, identity, logging -------------------------------------------------------


def _upstream(url: UpstreamTarget | None = None, **values: Any) -> UpstreamConfig:
    # One `url:` key fills five fields: the URL as written and the parts the proxy needs.
    if url is not None:
        values.update(
            url=url.url, scheme=url.scheme, host=url.host, port=url.port, base_path=url.base_path
        )
    return UpstreamConfig(**values)


UPSTREAM: Schema = {
    "url": text(parse_upstream_url, "a URL like http://127.0.0.1:8080"),
    "connect_timeout": duration(allow_zero=False),
    "max_connections": integer(minimum=1),
    "idle_timeout": duration(allow_zero=False),
    "pool_timeout": duration(allow_zero=False),
    "max_response_header_size": size(minimum=1024),
    "health_path": optional(_path),
    "websocket_max_message": size(minimum=1),
    "websocket_idle_timeout": duration(allow_zero=True),
    "websocket_heartbeat": duration(allow_zero=True),
    "websocket_pong_timeout": duration(allow_zero=False),
}

STATE: Schema = {
    "url": text(parse_state_url, "a URL like memory:// or redis://host:6379/0"),
    "key_prefix": text(parse_key_prefix, "a string"),
    "timeout": duration(allow_zero=False),
    "max_connections": integer(minimum=1),
}

IDENTITY: Schema = {
    "org_header": _header_name,
    "user_header": _header_name,
    "jwt": optional(jwt_section),
}


def _access_log(redact_headers: tuple[str, ...] = (), **values: Any) -> AccessLogConfig:
    # Listed headers add to the built-in set: a config can never un-redact Authorization.
    builtin = AccessLogConfig().redact_headers
    return AccessLogConfig(redact_headers=builtin | frozenset(redact_headers), **values)


ACCESS_LOG: Schema = {
    "enabled": boolean,
    "sample": fraction,
    "include_query": boolean,
    "headers": _header_names,
    "redact_headers": _header_names,
}

LOGGING: Schema = {
    "level": choice(("debug", "info", "warning", "error")),
    "access": section(_access_log, ACCESS_LOG),
    "ids": choice(("hashed", "clear")),
    "id_hash_key": optional(_secret),
}


# --- tracing ----------------------------------------------------------------------------------

_written_header = text(parse_header_name_as_written, "a header name like X-Request-Id")

SPAN_EXPORT: Schema = {
    "endpoint": optional(
        text(parse_otlp_endpoint, "a URL like http://otel-collector:4318/v1/traces")
    ),
    "service_name": text(_non_empty, "a service name"),
    "queue_size": integer(minimum=1),
    "batch_size": integer(minimum=1),
    "interval": duration(allow_zero=False),
    "timeout": duration(allow_zero=False),
}


def _tracing(b3: dict[str, Any] | None = None, **values: Any) -> TracingConfig:
    # `b3: {accept, emit}` reads as one block in YAML; the model keeps two flat fields.
    b3 = b3 or {}
    return TracingConfig(b3_accept=b3.get("accept", True), b3_emit=b3.get("emit", "none"), **values)


B3: Schema = {
    "accept": boolean,
    "emit": choice(("none", "single", "multi")),
}

TRACING: Schema = {
    "request_id_header": _written_header,
    "trace_id_header": _written_header,
    "sample_ratio": fraction,
    "b3": section(dict, B3),
    "export": section(SpanExportConfig, SPAN_EXPORT),
}

ROUTE_TRACING: Schema = {
    "enabled": boolean,
}


# --- routes -----------------------------------------------------------------------------------

_PATH_CONDITIONS = ("path", "path_prefix", "path_regex")
_CONDITIONS = (*_PATH_CONDITIONS, "host", "methods")
_method_list = list_of(
    text(parse_method, "an HTTP method like GET"), "a list of HTTP methods like [GET, POST]"
)


def _methods(node: RawNode, path: str, log: IssueLog) -> frozenset[str]:
    methods = _method_list(node, path, log)
    if not methods:
        raise Invalid("expected at least one HTTP method, got an empty list")
    return frozenset(methods)


MATCH: Schema = {
    "path": _path,
    "path_prefix": _path,
    "path_regex": text(parse_path_regex, "a regular expression"),
    "host": text(parse_host, "a host like api.example.com or *.example.com"),
    "methods": _methods,
}


def _route_match(node: RawNode, path: str, log: IssueLog) -> RouteMatch:
    mapping = mapping_of(node, "a mapping of conditions like {path_prefix: /orders}")
    if not mapping.entries:
        raise Invalid(
            f"expected at least one of {', '.join(_CONDITIONS)} (path_prefix: / matches everything)"
        )
    single_path = _check_single_path(mapping, path, log)
    values = read_fields(mapping, path, log, MATCH)
    # A match with a dropped condition would match more than the user wrote: drop the route.
    if not single_path or len(values) != len(mapping.entries):
        raise Invalid()
    return RouteMatch(**values)


def _check_single_path(node: RawMap, path: str, log: IssueLog) -> bool:
    present = [key for key in node.entries if key in _PATH_CONDITIONS]
    for extra in present[1:]:
        first = present[0]
        message = (
            f"only one of path, path_prefix and path_regex can be set"
            f" ({first} is already set at line {node.entries[first].key_line})"
        )
        log.add(node.entries[extra].key_line, join(path, extra), message)
    return len(present) <= 1


# --- idempotency ------------------------------------------------------------------------------


def _status(node: RawNode, path: str, log: IssueLog) -> int:
    status = integer(100)(node, path, log)
    if status > 599:
        raise Invalid(f"expected an HTTP status from 100 to 599, got {describe(node)}")
    return status


_status_list = list_of(_status, "a list of HTTP statuses like [408, 429, 503]")


def _statuses(node: RawNode, path: str, log: IssueLog) -> frozenset[int]:
    return frozenset(_status_list(node, path, log))


def _idempotency(**values: Any) -> IdempotencyConfig | None:
    config = IdempotencyConfig(**values)
    return config if config.enabled else None


def _check_idempotency(
    config: IdempotencyConfig | None, node: RawMap, path: str, log: IssueLog
) -> None:
    if config is not None and config.wait >= config.lease and "wait" in node.entries:
        log.add(
            entry_line(node, "wait"),
            join(path, "wait"),
            f"must be shorter than the lease ({config.lease:g}s): a waiting retry would"
            " outlive the claim it waits for",
        )


IDEMPOTENCY: Schema = {
    "enabled": boolean,
    "methods": _methods,
    "required": boolean,
    "header": _header_name,
    "ttl": duration(allow_zero=False),
    "lease": duration(allow_zero=False),
    "wait": duration(allow_zero=True),
    "max_request_body": size(minimum=1),
    "max_response_body": size(minimum=0),
    "release_statuses": _statuses,
    "cache_5xx": boolean,
    "on_store_error": choice(("closed", "open")),
    "mismatch_status": one_of_integers((400, 409, 422)),
    "anonymous": choice(("credentials", "reject", "bypass")),
    "credentials_header": _header_name,
    "claim_header": optional(
        text(parse_header_name_as_written, "a header name like Idempotency-Claim, or null")
    ),
    "namespace": optional(text(parse_route_name, "a name like orders, or null")),
}


# --- quotas -----------------------------------------------------------------------------------

# Rate windows run from a second to a day; longer plans are calendar quotas (1d, 1w, 1mo).
_RATE_WINDOW_MAX = 86400.0
_LIMIT_KINDS = ("rate", "quota")


def _time_zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {text!r}; expected an IANA name like Europe/Berlin or UTC"
        ) from None
    return text


_zone = text(_time_zone, "an IANA time zone like Europe/Berlin")


def _cost(node: RawNode, path: str, log: IssueLog) -> CostConfig:
    if isinstance(node, RawScalar):
        return CostConfig(amount=integer(0)(node, path, log))
    values = read_fields(
        mapping_of(node, "a number, or {header: X-Cost, default: 1, min: 0, max: 100}"),
        path,
        log,
        COST,
    )
    cost = CostConfig(
        amount=values.get("default", 1),
        header=values.get("header"),
        minimum=values.get("min", 0),
        maximum=values.get("max", 1000),
    )
    if cost.minimum > cost.maximum:
        raise Invalid(f"min ({cost.minimum}) is larger than max ({cost.maximum})")
    if not cost.minimum <= cost.amount <= cost.maximum:
        raise Invalid(f"default ({cost.amount}) must lie within min and max")
    return cost


COST: Schema = {
    "header": _header_name,
    "default": integer(0),
    "min": integer(0),
    "max": integer(0),
}

LIMIT: Schema = {
    "name": text(parse_route_name, "a limit name like orders_per_day"),
    "kind": choice(_LIMIT_KINDS),
    "limit": integer(0),
    "window": text(str, "a window like 1s, 1h (rate) or 1d, 1w, 1mo (quota)"),
    "burst": integer(1),
    "timezone": _zone,
    "cost": _cost,
    "scope": choice(("org", "org_user", "route")),
    "shadow": boolean,
    "count": choice(("all", "success")),
    "refund_statuses": _statuses,
}


def _limit(node: RawNode, path: str, log: IssueLog) -> LimitConfig:
    mapping = mapping_of(node, "a limit like {name: burst, kind: rate, limit: 20, window: 1s}")
    values = read_fields(mapping, path, log, LIMIT)
    missing = [key for key in ("name", "kind", "limit", "window") if key not in mapping.entries]
    for key in missing:
        log.add(mapping.line, path, f"missing required key '{key}'")
    if missing or len(values) != len(mapping.entries):
        raise Invalid()
    window_text = values.pop("window")
    window_line = entry_line(mapping, "window")
    if values["kind"] == "quota":
        period = QUOTA_PERIODS.get(window_text)
        if period is None:
            log.add(
                window_line,
                join(path, "window"),
                f"a quota's window is a calendar period: 1d, 1w or 1mo, got {window_text!r}"
                " (rolling windows are kind: rate)",
            )
            raise Invalid()
        if "burst" in values:
            log.add(
                entry_line(mapping, "burst"), join(path, "burst"), "only a rate limit has a burst"
            )
            raise Invalid()
        nominal = {"day": 86400.0, "week": 7 * 86400.0, "month": 30 * 86400.0}[period]
        return LimitConfig(**values, window=nominal, period=period, line=mapping.line)
    window = _rate_window(window_text, window_line, join(path, "window"), log)
    if "timezone" in values:
        log.add(
            entry_line(mapping, "timezone"),
            join(path, "timezone"),
            "only a calendar quota (kind: quota) has a time zone; a rate window rolls",
        )
        raise Invalid()
    return LimitConfig(**values, window=window, line=mapping.line)


def _rate_window(window_text: str, line: int, path: str, log: IssueLog) -> float:
    try:
        window = parse_duration(window_text)
    except UnitError as error:
        log.add(line, path, f"expected {error.expected}, got {window_text!r}")
        raise Invalid() from None
    if not 0.001 <= window <= _RATE_WINDOW_MAX:
        log.add(
            line,
            path,
            f"a rate window runs from 1ms to 1d, got {window_text!r}"
            " (for longer plans use kind: quota with 1d, 1w or 1mo)",
        )
        raise Invalid()
    return window


_limits = list_of(_limit, "a list of limits like [{name: burst, kind: rate, ...}]")


def _override_values(node: RawNode, path: str, log: IssueLog) -> MappingProxyType[str, int]:
    mapping = mapping_of(node, "a mapping of limit names to limits like {orders_per_day: 5000}")
    values = {}
    for name, entry in mapping.entries.items():
        value = convert(integer(0), entry.value, join(path, name), log)
        if not isinstance(value, Missing):
            values[name] = value
    return MappingProxyType(values)


def _per_org(item: Converter[Any], expected: str) -> Converter[MappingProxyType[str, Any]]:
    def convert_per_org(node: RawNode, path: str, log: IssueLog) -> MappingProxyType[str, Any]:
        mapping = mapping_of(node, expected)
        values = {}
        for org, entry in mapping.entries.items():
            value = convert(item, entry.value, join(path, org), log)
            if not isinstance(value, Missing):
                values[org] = value
        return MappingProxyType(values)

    return convert_per_org


def _quotas(**values: Any) -> QuotaConfig | None:
    if not values.pop("enabled", True):
        return None
    return QuotaConfig(**values)


def _check_quotas(config: QuotaConfig | None, node: RawMap, path: str, log: IssueLog) -> None:
    if config is None:
        return
    if not config.limits and "limits" not in node.entries:
        log.add(node.line, path, "missing required key 'limits' (or set enabled: false)")
    names: dict[str, int] = {}
    for limit in config.limits:
        if limit.name in names:
            message = f"limit '{limit.name}' is already defined at line {names[limit.name]}"
            log.add(limit.line, join(path, "limits"), message)
        names.setdefault(limit.name, limit.line)
    overrides = node.entries.get("overrides")
    limits = node.entries.get("limits")
    if overrides is None or not isinstance(overrides.value, RawMap):
        return
    if limits is None or not isinstance(limits.value, RawSeq):
        return
    if len(limits.value.items) != len(config.limits):
        return  # a limit failed to load: its name would be reported as unknown too
    for org, entry in overrides.value.entries.items():
        if not isinstance(entry.value, RawMap):
            continue
        for name, item in entry.value.entries.items():
            if name not in names:
                log.add(
                    item.key_line,
                    join(join(join(path, "overrides"), org), name),
                    unknown_key(name, names).replace("unknown key", "unknown limit"),
                )


QUOTAS: Schema = {
    "enabled": boolean,
    "limits": _limits,
    "overrides": _per_org(_override_values, "a mapping of orgs like {org-123: {...}}"),
    "timezones": _per_org(_zone, "a mapping of orgs to time zones like {org-9: Asia/Tokyo}"),
    "anonymous": choice(("reject", "limit")),
    "on_store_error": choice(("local", "open", "closed")),
    "replicas": integer(minimum=1),
    "max_in_flight": optional(integer(minimum=1)),
    "draft_headers": boolean,
    "legacy_headers": boolean,
    "near_limit_ratio": fraction,
    "report_orgs": list_of(text(_non_empty, "an organisation id"), "a list of organisation ids"),
    "namespace": optional(text(parse_route_name, "a name like orders, or null")),
}


# Route-level settings other than name and match. `defaults:` accepts exactly these, and
# merges them into every route. A new per-route policy section (say `idempotency:`) is one
# entry here, e.g. `"idempotency": section(IdempotencyConfig, IDEMPOTENCY)`, plus its field on
# RouteConfig; defaults, deep merging and error reporting then come for free.
ROUTE_POLICIES: Schema = {
    "timeout": duration(allow_zero=False),
    "idle_timeout": duration(allow_zero=False),
    "max_body": size(),
    "request_buffer": size(),
    "body_timeout": duration(allow_zero=False),
    "min_upload_rate": size(),
    "tracing": section(RouteTracing, ROUTE_TRACING),
    "idempotency": section(_idempotency, IDEMPOTENCY, _check_idempotency),
    "quotas": section(_quotas, QUOTAS, _check_quotas),
    "circuit_breaker": breaker_section,
    "retry": retry_section,
    "max_in_flight": optional(integer(minimum=1)),
}

ROUTE: Schema = {
    "name": text(parse_route_name, "a route name"),
    "match": _route_match,
    **ROUTE_POLICIES,
}
_PER_ROUTE_ONLY = tuple(key for key in ROUTE if key not in ROUTE_POLICIES)


class _RouteDefaults:
    """The `defaults:` section, checked once on its own and kept raw for merging into routes."""

    def __init__(self, root: RawMap, log: IssueLog) -> None:
        self.raw = RawMap({}, 0)
        self.values: dict[str, Any] = {}
        entry = root.entries.get("defaults")
        if entry is None:
            return
        try:
            node = mapping_of(entry.value, "a mapping of route settings like {timeout: 15s}")
        except Invalid as error:
            log.add(entry.value.line, "defaults", str(error.message))
            return
        for key in _PER_ROUTE_ONLY:
            if key in node.entries:
                message = f"'{key}' is set per route and cannot have a default"
                log.add(node.entries[key].key_line, join("defaults", key), message)
        policies = {key: item for key, item in node.entries.items() if key not in _PER_ROUTE_ONLY}
        # Only known keys are merged, so an unknown default is reported once, here.
        self.raw = RawMap(
            {key: item for key, item in policies.items() if key in ROUTE_POLICIES}, node.line
        )
        self.values = read_fields(RawMap(policies, node.line), "defaults", log, ROUTE_POLICIES)


def _deep_merge(base: RawMap, override: RawMap) -> RawMap:
    """`override`'s entries win; where both hold a mapping, the two are merged key by key."""
    entries: dict[str, RawEntry] = dict(override.entries)
    for key, entry in base.entries.items():
        mine = entries.get(key)
        if mine is None:
            entries[key] = entry
        elif isinstance(mine.value, RawMap) and isinstance(entry.value, RawMap):
            entries[key] = RawEntry(mine.key_line, _deep_merge(entry.value, mine.value))
    return RawMap(entries, override.line)


def _route_items(root: RawMap, log: IssueLog) -> tuple[RawNode, ...]:
    entry = root.entries.get("routes")
    if entry is None:
        return ()
    node = entry.value
    if isinstance(node, RawScalar) and node.value is None and not node.expanded:
        return ()
    if not isinstance(node, RawSeq):
        message = f"expected a list of routes (- name: ..., match: ...), got {describe(node)}"
        log.add(node.line, "routes", message, at=node)
        return ()
    return node.items


def _route(
    node: RawNode, path: str, log: IssueLog, defaults: _RouteDefaults, server: ServerConfig
) -> RouteConfig:
    if not isinstance(node, RawMap):
        raise Invalid(f"expected a route mapping with name: and match:, got {describe(node)}")
    for key in _PER_ROUTE_ONLY:
        if key not in node.entries:
            log.add(node.line, path, f"missing required key '{key}'")
    values = read_fields(_deep_merge(defaults.raw, node), path, log, ROUTE)
    if any(key not in values for key in _PER_ROUTE_ONLY):
        raise Invalid()
    values.setdefault("max_body", server.max_body)
    return RouteConfig(**values, line=node.line)


def _catch_all_route(policies: Mapping[str, Any], server: ServerConfig) -> RouteConfig:
    values = {"max_body": server.max_body, **policies}
    return RouteConfig(name=DEFAULT_ROUTE_NAME, match=RouteMatch(path_prefix="/"), **values)


def _routes(root: RawMap, server: ServerConfig, log: IssueLog) -> tuple[RouteConfig, ...]:
    defaults = _RouteDefaults(root, log)
    items = _route_items(root, log)
    if not items:
        return (_catch_all_route(defaults.values, server),)

    def build(node: RawNode, path: str, log: IssueLog) -> RouteConfig:
        return _route(node, path, log, defaults, server)

    built: list[tuple[str, RouteConfig]] = []
    for index, item in enumerate(items):
        path = f"routes[{index}]"
        route = convert(build, item, path, log)
        if not isinstance(route, Missing):
            built.append((path, route))
    _check_unique_names(items, log)
    _check_reachable(built, log)
    return tuple(route for _, route in built)


def _check_unique_names(items: tuple[RawNode, ...], log: IssueLog) -> None:
    # Checked on the raw routes, so a route dropped for another mistake still claims its name.
    first_lines: dict[str, int] = {}
    for index, item in enumerate(items):
        entry = item.entries.get("name") if isinstance(item, RawMap) else None
        if entry is None:
            continue
        path = f"routes[{index}].name"
        name = convert(ROUTE["name"], entry.value, path, log)  # a repeated complaint is dropped
        if isinstance(name, str):
            first = first_lines.setdefault(name, entry.value.line)
            if first != entry.value.line:
                message = f"duplicate route name '{name}' (first used at line {first})"
                log.add(entry.value.line, path, message)


def _check_reachable(routes: list[tuple[str, RouteConfig]], log: IssueLog) -> None:
    # First match wins, so a route behind a catch-all (or behind the very same match) can
    # never be selected: almost certainly a mistake in the order.
    for position, (path, route) in enumerate(routes):
        for _, earlier in routes[:position]:
            if earlier.match.is_catch_all:
                reason = "matches every request"
            elif earlier.match == route.match:
                reason = "has the same match"
            else:
                continue
            log.add(
                route.line,
                path,
                f"unreachable: route '{earlier.name}' at line {earlier.line} {reason}",
            )
            break


# --- the whole file ---------------------------------------------------------------------------

SECTIONS: Mapping[str, Converter[Any]] = {
    "server": section(ServerConfig, SERVER, _check_server),
    "upstream": section(_upstream, UPSTREAM),
    "state": section(StateConfig, STATE),
    "identity": section(IdentityConfig, IDENTITY),
    "logging": section(LoggingConfig, LOGGING),
    "tracing": section(_tracing, TRACING),
}
_TOP_LEVEL_KEYS = (*SECTIONS, "defaults", "routes")


# A deeper check of the state section that only the store can make (its URL options); it
# raises ValueError. Injected by the caller so the config layer never imports the store.
StateCheck = Callable[[StateConfig], None]


def _check_state(root: RawMap, state: StateConfig, check: StateCheck, log: IssueLog) -> None:
    try:
        check(state)
    except ValueError as error:
        entry = root.entries.get("state")
        line = entry_line(entry.value, "url") if entry and isinstance(entry.value, RawMap) else 0
        log.add(line, "state.url", str(error).removeprefix("state.url: "))


def _config(root: RawNode, log: IssueLog, check_state: StateCheck | None = None) -> SidecarConfig:
    if not isinstance(root, RawMap):
        expected = "a mapping of sections like server:, upstream:, routes: at the top level"
        if not (isinstance(root, RawScalar) and root.broken):
            log.add(root.line, DOCUMENT, f"expected {expected}, got {describe(root)}")
        return SidecarConfig()
    for key, entry in root.entries.items():
        # `x-` keys are free for YAML anchors to live in (as in Docker Compose files).
        if key not in _TOP_LEVEL_KEYS and not key.startswith(EXTENSION_PREFIX):
            log.add(entry.key_line, key, unknown_key(key, _TOP_LEVEL_KEYS), at=entry)
    sections: dict[str, Any] = {}
    for key, converter in SECTIONS.items():
        found = root.entries.get(key)
        value = MISSING if found is None else convert(converter, found.value, key, log)
        if not isinstance(value, Missing):
            sections[key] = value
    server = sections.get("server", ServerConfig())
    if check_state is not None and "state" in sections:
        _check_state(root, sections["state"], check_state, log)
    routes = _routes(root, server, log)
    _check_shared_state(root, server, sections.get("state", StateConfig()), routes, log)
    return SidecarConfig(**sections, routes=routes)


def _check_shared_state(
    root: RawMap,
    server: ServerConfig,
    state: StateConfig,
    routes: tuple[RouteConfig, ...],
    log: IssueLog,
) -> None:
    """Several workers cannot share memory:// state, and idempotency needs it shared."""
    if server.workers < 2 or not state.url.startswith("memory:"):
        return
    if not any(route.idempotency is not None for route in routes):
        return
    entry = root.entries["server"]
    line = entry_line(entry.value, "workers") if isinstance(entry.value, RawMap) else 0
    log.add(
        line,
        "server.workers",
        "memory:// state is per process: with several workers one idempotency key could run"
        " once per worker; use a redis:// state or one worker",
    )


def _load(
    text: str,
    source: str,
    sha256: str,
    env: Mapping[str, str] | None,
    check_state: StateCheck | None = None,
) -> SidecarConfig:
    log = IssueLog(source)
    root = compose(text, log, os.environ if env is None else env)
    config = _config(root, log, check_state) if root is not None else SidecarConfig()
    log.raise_if_any()
    return replace(config, source=source, sha256=sha256, loaded_at=time.time())


def parse_config(
    text: str, source: str = "<string>", env: Mapping[str, str] | None = None
) -> SidecarConfig:
    """Validate YAML `text`; `source` names it in messages. Raises ConfigError."""
    return _load(text, source, hashlib.sha256(text.encode("utf-8")).hexdigest(), env)


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_state: StateCheck | None = None,
) -> SidecarConfig:
    """Read and validate the YAML file at `path`; `env` defaults to os.environ.

    `check_state` may reject the state section (raising ValueError) with checks only the
    store can make; its message is reported at the line of `state.url`.
    Raises ConfigError for an invalid config, OSError when the file cannot be read.
    """
    source = os.fspath(path)
    data = Path(source).read_bytes()
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = f"the file is not valid UTF-8 ({error.reason} at byte {error.start})"
        raise ConfigError([ConfigIssue(source, line, DOCUMENT, message)]) from None
    return _load(decoded, source, hashlib.sha256(data).hexdigest(), env, check_state)


def embedded_config(upstream_url: str | None = None) -> SidecarConfig:
    """The built-in configuration: every default, one catch-all route, in-memory state.

    Raises ConfigError if `upstream_url` is not a valid upstream URL.
    """
    upstream = UpstreamConfig()
    if upstream_url is not None:
        try:
            upstream = _upstream(parse_upstream_url(upstream_url))
        except ValueError as error:
            issue = ConfigIssue(EMBEDDED_SOURCE, 0, "upstream.url", str(error))
            raise ConfigError([issue]) from None
    server = ServerConfig()
    return SidecarConfig(
        server=server,
        upstream=upstream,
        routes=(_catch_all_route({}, server),),
        source=EMBEDDED_SOURCE,
        loaded_at=time.time(),
    )
