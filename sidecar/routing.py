"""The route table: request -> route -> its precompiled chain. First match wins."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.chain import Next
from sidecar.config import RouteConfig, RouteMatch
from sidecar.hosts import host_without_port
from sidecar.metrics import RouteMetrics

# The route name requests that no route takes are counted and logged under.
UNROUTED = "unmatched"
# (method, host without port, lower-case; raw path) -> matched?
Matcher = Callable[[str, str, str], bool]


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    config: RouteConfig
    chain: Next
    metrics: RouteMetrics
    matches: Matcher


def compile_matcher(match: RouteMatch) -> Matcher:
    """Turn a RouteMatch into one function that checks only the conditions it sets."""
    checks: list[Matcher] = []
    if match.methods is not None:
        methods = match.methods
        checks.append(lambda method, host, path: method in methods)
    if match.host is not None:
        checks.append(_host_check(match.host))
    if match.path is not None:
        exact = match.path
        checks.append(lambda method, host, path: path == exact)
    if match.path_prefix is not None:
        checks.append(_prefix_check(match.path_prefix))
    if match.path_regex is not None:
        regex = match.path_regex
        checks.append(lambda method, host, path: regex.match(path) is not None)
    if not checks:
        return lambda method, host, path: True
    if len(checks) == 1:
        return checks[0]
    return lambda method, host, path: all(check(method, host, path) for check in checks)


def _prefix_check(prefix: str) -> Matcher:
    # Prefixes match on a segment boundary: /orders matches /orders and /orders/1, not /ordersx.
    if prefix.endswith("/"):
        return lambda method, host, path: path.startswith(prefix)
    with_slash = prefix + "/"
    return lambda method, host, path: path == prefix or path.startswith(with_slash)


def _host_check(pattern: str) -> Matcher:
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com": the wildcard needs at least one label.
        return lambda method, host, path: host.endswith(suffix) and len(host) > len(suffix)
    return lambda method, host, path: host == pattern


def path_for_matching(path: str) -> str:
    """The path as routes see it: dot-segments resolved, repeated slashes merged.

    Only matching uses this; the app still receives the exact bytes. Without it
    `/public/../orders` or `//orders` would dodge the policies of an `/orders` route while
    the app, normalising, served /orders anyway. `%2e` counts as a dot here (it is an
    unreserved character); `%2F` does not count as a slash (it is data, not a separator).
    """
    if "//" not in path and "/." not in path and "%2" not in path:
        return path  # the common case costs three substring checks
    if "%2" in path:
        path = path.replace("%2e", ".").replace("%2E", ".")
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    trailing = "/" if path.endswith(("/", "/.", "/..")) and out else ""
    return "/" + "/".join(out) + trailing


class RouteTable:
    """Routes in config order; `match` returns the first that accepts the request."""

    def __init__(self, routes: Sequence[CompiledRoute]) -> None:
        self.routes = tuple(routes)
        self.uses_host = any(r.config.match.host is not None for r in self.routes)

    def match(self, method: str, host: str, path: str) -> CompiledRoute | None:
        path = path_for_matching(path)
        if self.uses_host:
            host = host_without_port(host)
        for route in self.routes:
            if route.matches(method, host, path):
                return route
        return None
