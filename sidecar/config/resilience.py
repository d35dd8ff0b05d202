"""The route sections `circuit_breaker:` and `retry:` (docs/breakers.md): their schemas and
the rules across their keys. The loader merges them into ROUTE_POLICIES."""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

from sidecar.config.issues import IssueLog, join
from sidecar.config.model import (
    BreakerConfig,
    FallbackConfig,
    HalfOpenConfig,
    RetryConfig,
    SlowCallConfig,
    UpstreamConfig,
)
from sidecar.config.raw import RawMap, RawNode, RawScalar
from sidecar.config.schema import (
    Converter,
    Invalid,
    Schema,
    boolean,
    choice,
    describe,
    duration,
    entry_line,
    fraction,
    integer,
    list_of,
    mapping_of,
    optional,
    scalar,
    section,
    text,
)
from sidecar.config.values import parse_header_name, parse_upstream_url

# Failure kinds a breaker or a retry can name besides app statuses.
BREAKER_KINDS = ("connect_error", "timeout", "reset", "stream")
# A broken response stream cannot be retried: its head already went to the client.
RETRY_KINDS = ("connect_error", "timeout", "reset")


def _outcomes(kinds: Iterable[str]) -> Converter[frozenset[int | str]]:
    allowed = tuple(kinds)
    expected = f"a list of HTTP statuses (500-599, 408, 429) and kinds ({', '.join(allowed)})"

    def convert_item(node: RawNode, path: str, log: IssueLog) -> int | str:
        value = scalar(node, expected).value
        if isinstance(value, int) and not isinstance(value, bool):
            if not 100 <= value <= 599:
                raise Invalid(f"expected an HTTP status from 100 to 599, got {describe(node)}")
            return value
        if isinstance(value, str) and value.lower() in allowed:
            return value.lower()
        raise Invalid(f"expected a status or one of {', '.join(allowed)}, got {describe(node)}")

    items = list_of(convert_item, expected)

    def convert_outcomes(node: RawNode, path: str, log: IssueLog) -> frozenset[int | str]:
        return frozenset(items(node, path, log))

    return convert_outcomes


def _fallback_headers(node: RawNode, path: str, log: IssueLog) -> MappingProxyType[str, str]:
    mapping = mapping_of(node, "a mapping of header names to values like {X-Fallback: '1'}")
    headers: dict[str, str] = {}
    for name, entry in mapping.entries.items():
        try:
            parse_header_name(name)
        except ValueError as error:
            log.add(entry.key_line, join(path, name), str(error))
            continue
        value = entry.value
        if not isinstance(value, RawScalar) or value.value is None:
            log.add(value.line, join(path, name), f"expected a header value, got {describe(value)}")
            continue
        headers[name] = str(value.value)
    return MappingProxyType(headers)


def _fallback_upstream(node: RawNode, path: str, log: IssueLog) -> UpstreamConfig:
    target = text(parse_upstream_url, "a URL like http://127.0.0.1:8081")(node, path, log)
    return UpstreamConfig(
        url=target.url,
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        base_path=target.base_path,
    )


def _fallback_status(node: RawNode, path: str, log: IssueLog) -> int:
    status = integer(200)(node, path, log)
    if status > 599:
        raise Invalid(f"expected an HTTP status from 200 to 599, got {describe(node)}")
    return status


def _check_fallback(config: FallbackConfig, node: RawMap, path: str, log: IssueLog) -> None:
    static = [key for key in ("status", "headers", "body") if key in node.entries]
    if config.upstream is not None and static:
        log.add(
            entry_line(node, static[0]),
            join(path, static[0]),
            "a fallback is either a static response (status, headers, body) or an upstream,"
            " not both",
        )
    elif static and "status" not in node.entries:
        log.add(node.line, path, "a static fallback needs a status (headers and body are extra)")


FALLBACK: Schema = {
    "status": _fallback_status,
    "headers": _fallback_headers,
    "body": text(str, "a response body (text)"),
    "upstream": _fallback_upstream,
}

SLOW_CALL: Schema = {
    "threshold": duration(allow_zero=False),
    "rate": fraction,
}

HALF_OPEN: Schema = {
    "probes": integer(minimum=1),
    "ramp": duration(allow_zero=True),
}


def _breaker(**values: Any) -> BreakerConfig | None:
    if not values.pop("enabled", True):
        return None
    return BreakerConfig(**values)


def _check_breaker(config: BreakerConfig | None, node: RawMap, path: str, log: IssueLog) -> None:
    if config is None:
        return
    if config.max_open_for < config.open_for:
        log.add(
            entry_line(node, "max_open_for"),
            join(path, "max_open_for"),
            f"must be at least open_for ({config.open_for:g}s)",
        )
    if not 1.0 <= config.window <= 600.0:
        log.add(entry_line(node, "window"), join(path, "window"), "must be from 1s to 10m")
    if not 0.01 <= config.flush_interval <= 5.0:
        log.add(
            entry_line(node, "flush_interval"),
            join(path, "flush_interval"),
            "must be from 10ms to 5s",
        )
    if config.slow_call is not None and config.slow_call.rate <= 0.0:
        slow = node.entries.get("slow_call")
        line = slow.value.line if slow is not None else node.line
        log.add(line, join(path, "slow_call.rate"), "must be above 0 (0 would open on any call)")
    if config.failure_rate <= 0.0:
        log.add(
            entry_line(node, "failure_rate"),
            join(path, "failure_rate"),
            "must be above 0 (0 would open on the first request)",
        )


BREAKER: Schema = {
    "enabled": boolean,
    "scope": choice(("route", "route_org")),
    "window": duration(allow_zero=False),
    "min_requests": integer(minimum=1),
    "failure_rate": fraction,
    "slow_call": optional(section(SlowCallConfig, SLOW_CALL)),
    "consecutive_failures": integer(minimum=0),
    "open_for": duration(allow_zero=False),
    "max_open_for": duration(allow_zero=False),
    "jitter": fraction,
    "half_open": section(HalfOpenConfig, HALF_OPEN),
    "failures": _outcomes(BREAKER_KINDS),
    "fallback": section(FallbackConfig, FALLBACK, _check_fallback),
    "flush_interval": duration(allow_zero=False),
    "shared": boolean,
}


def _retry(**values: Any) -> RetryConfig | None:
    if not values.pop("enabled", True):
        return None
    return RetryConfig(**values)


def _check_retry(config: RetryConfig | None, node: RawMap, path: str, log: IssueLog) -> None:
    if config is not None and config.max_backoff < config.backoff:
        log.add(
            entry_line(node, "max_backoff"),
            join(path, "max_backoff"),
            f"must be at least backoff ({config.backoff:g}s)",
        )


RETRY: Schema = {
    "enabled": boolean,
    "attempts": integer(minimum=1),
    "backoff": duration(allow_zero=True),
    "max_backoff": duration(allow_zero=True),
    "on": _outcomes(RETRY_KINDS),
    "budget": fraction,
    "min_retries": integer(minimum=0),
    "budget_window": duration(allow_zero=False),
    "per_try_timeout": optional(duration(allow_zero=False)),
}

breaker_section = section(_breaker, BREAKER, _check_breaker)
retry_section = section(_retry, RETRY, _check_retry)
