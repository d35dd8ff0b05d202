"""The route table: request -> route -> its precompiled chain. First match wins."""

from __future__ import annotations

import string
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
        exact = _configured_path(match.path)
        checks.append(lambda method, host, path: path == exact)
    if match.path_prefix is not None:
        checks.append(_prefix_check(_configured_path(match.path_prefix)))
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


# RFC 3986 §2.3: percent-encoding one of these means nothing, so `%6F` is read as `o`.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Encoded separators: `/` and `\` are a separator to some apps and data to others, so no
# reading of them is safe for a route's policies (Envoy's escaped-slash set: %2F and %5C).
_ENCODED_SEPARATORS = frozenset("/\\")


def _percent_table() -> dict[str, str]:
    """Each valid pair of hex digits after a `%` -> what the route table reads.

    Unreserved characters decoded, anything else kept encoded with upper-case hex (so `%3a`
    and `%3A` are one spelling); an encoded separator is absent, like an invalid pair.
    """
    table: dict[str, str] = {}
    for high in string.hexdigits:
        for low in string.hexdigits:
            char = chr(int(high + low, 16))
            if char in _ENCODED_SEPARATORS:
                continue
            table[high + low] = char if char in _UNRESERVED else f"%{ord(char):02X}"
    return table


_PERCENT = _percent_table()
_DOT_SEGMENTS = (".", "..")

# What a client is told when its path is refused (see `path_for_matching`).
REFUSED_PATH_DETAIL = (
    "the path has an invalid percent-encoding, an encoded slash (%2F) or backslash (%5C),"
    " a backslash, or a dot-segment with parameters (..;): apps read these differently"
)


def path_for_matching(path: str) -> str | None:
    """The path as routes see it, or None when it must be refused (answered 400).

    Only matching uses this; the app still receives the exact bytes. Without it
    `/%6frders`, `/orders;x`, `/public/../orders` or `//orders` would dodge the policies of
    an `/orders` route while the app served /orders anyway. In order:

    - percent-encoded unreserved characters are decoded (RFC 3986 §6.2.2.2: `%6F` is `o`,
      `%2e` is `.`), in one pass (`%252e` stays `%252e`); every other percent-encoding stays
      encoded, its hex upper-cased (`%3a` -> `%3A`);
    - `;` parameters are dropped from every segment, as servlet containers do before
      routing (`/orders;jsessionid=1` is `/orders`); an encoded `%3B` stays data;
    - dot-segments are resolved (RFC 3986 §5.2.4) and repeated slashes merged.

    Refused: an invalid percent-encoding (`%zz`, `%4`), an encoded slash or backslash
    (`%2F`, `%5C`, either case) or a raw backslash, since some apps read them as separators
    and others as data, and a dot-segment carrying parameters (`..;x`), a traversal to
    servlet containers but a name to other servers. Case is kept: paths are case-sensitive.
    """
    if (
        "%" not in path
        and "/." not in path
        and "//" not in path
        and ";" not in path
        and "\\" not in path
    ):
        return path  # the common case costs five substring checks
    if "\\" in path:
        return None
    if "%" in path:
        head, *encoded = path.split("%")
        parts = [head]
        for part in encoded:
            char = _PERCENT.get(part[:2])
            if char is None:
                return None
            parts.append(char)
            parts.append(part[2:])
        path = "".join(parts)
    out: list[str] = []
    segment = ""
    for segment in path.split("/"):
        if ";" in segment:
            name = segment.partition(";")[0]
            if name in _DOT_SEGMENTS:
                return None
            segment = name
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    # A path ending in a separator (or a dot-segment, RFC 3986 §5.2.4) keeps its last slash.
    trailing = "/" if out and (not segment or segment in _DOT_SEGMENTS) else ""
    return "/" + "/".join(out) + trailing


def _configured_path(path: str) -> str:
    # Configured paths are read the way request paths are, so `/caf%c3%a9` matches either
    # hex case. One that would be refused can never match (no request reaches the routes
    # with it), so it is kept as written.
    normalised = path_for_matching(path)
    return path if normalised is None else normalised


class RouteTable:
    """Routes in config order; `match` returns the first that accepts the request."""

    def __init__(self, routes: Sequence[CompiledRoute]) -> None:
        self.routes = tuple(routes)
        self.uses_host = any(r.config.match.host is not None for r in self.routes)

    def match(self, method: str, host: str, path: str) -> CompiledRoute | None:
        """The first route that accepts the request, or None.

        None also when the path is refused (`path_for_matching` returns None): such a request
        takes no route, not even a catch-all, so it never reaches the app. The caller tells
        the two apart with `path_for_matching(path) is None` (400, not 404).
        """
        normalised = path_for_matching(path)
        if normalised is None:
            return None
        path = normalised
        if self.uses_host:
            host = host_without_port(host)
        for route in self.routes:
            if route.matches(method, host, path):
                return route
        return None
