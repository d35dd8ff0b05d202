"""A human summary of a loaded config, for `sidecar check-config`."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from sidecar.config.model import RouteConfig, RouteMatch, SidecarConfig
from sidecar.config.units import format_duration, format_size

__all__ = ["describe_config", "mask_url"]

MASK = "****"
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "secret", "token"})
_ROUTE_COLUMNS = ("#", "name", "match", "timeout", "idle_timeout", "max_body")


def _is_secret(param: str) -> bool:
    name = param.lower()
    return name in _SECRET_PARAMS or name.endswith("password")  # sentinel_password, ssl_...


def mask_url(url: str) -> str:
    """`url` with the password of its userinfo (and any password-like query value) hidden.

    Done on the text rather than through urlunsplit, which would turn `memory://` into
    `memory:` and cannot rebuild the several hosts of a redis+sentinel:// URL.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    netloc_end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and colon:
        netloc = f"{user}:{MASK}@{hosts}"
    before_fragment, hash_sign, fragment = tail.partition("#")
    path, question, query = before_fragment.partition("?")
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(key, MASK if _is_secret(key) else value) for key, value in pairs]
        query = urlencode(masked, safe="*")
    return f"{scheme}://{netloc}{path}{question}{query}{hash_sign}{fragment}"


def describe_match(match: RouteMatch) -> str:
    conditions: list[str] = []
    if match.methods is not None:
        conditions.append(",".join(sorted(match.methods)))
    if match.host is not None:
        conditions.append(f"host={match.host}")
    if match.path is not None:
        conditions.append(f"path={match.path}")
    if match.path_prefix is not None:
        conditions.append(f"path_prefix={match.path_prefix}")
    if match.path_regex is not None:
        conditions.append(f"path_regex={match.path_regex.pattern}")
    return " ".join(conditions) or "(any)"


def _route_row(order: int, route: RouteConfig) -> tuple[str, ...]:
    return (
        str(order),
        route.name,
        describe_match(route.match),
        format_duration(route.timeout),
        format_duration(route.idle_timeout),
        format_size(route.max_body),
    )


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def describe_config(config: SidecarConfig) -> str:
    """Where the config came from, where it listens and forwards to, and its route table."""
    server, upstream = config.server, config.upstream
    base_path = f" (base path {upstream.base_path})" if upstream.base_path else ""
    lines = [
        f"source:   {config.source}",
        f"sha256:   {config.sha256 or '-'}",
        f"listen:   {server.listen} (admin {server.admin_listen}), workers: {server.workers}",
        f"upstream: {upstream.url}{base_path}",
        f"state:    {mask_url(config.state.url)}",
        "routes (first match wins):",
    ]
    rows: list[tuple[str, ...]] = [_ROUTE_COLUMNS]
    rows.extend(_route_row(order, route) for order, route in enumerate(config.routes, start=1))
    lines.extend(f"  {row}" for row in _table(rows))
    return "\n".join(lines)
