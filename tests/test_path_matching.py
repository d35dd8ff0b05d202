"""Routes match on a normalised path, so no spelling of a path can dodge a route's policies.

The app still receives the exact bytes (see tests/proxy/test_routing.py); these tests pin
what the route table sees: `path_for_matching` and `RouteTable.match`.
"""

from __future__ import annotations

import pytest

from sidecar.config import RouteConfig, RouteMatch
from sidecar.metrics import Metrics
from sidecar.routing import CompiledRoute, RouteTable, compile_matcher, path_for_matching

NORMALISED = [
    # plain paths take the fast path and come back unchanged
    ("/orders/1", "/orders/1"),
    ("/static/app.min.js", "/static/app.min.js"),
    ("/", "/"),
    # dot-segments resolved (RFC 3986 §5.2.4), repeated slashes merged
    ("/public/../orders", "/orders"),
    ("//orders//1", "/orders/1"),
    ("/a/./b/", "/a/b/"),
    ("/../../orders", "/orders"),
    ("/x/y/..", "/x/"),
    ("/x/..", "/"),
    # percent-encoded unreserved characters are decoded (RFC 3986 §6.2.2.2), either hex case
    ("/%6frders", "/orders"),
    ("/%6Frders", "/orders"),
    ("/%6F%72%64%65%72%73/1", "/orders/1"),
    ("/%7euser", "/~user"),
    ("/%7Euser", "/~user"),
    ("/a%2db%5fc", "/a-b_c"),
    ("/v%31", "/v1"),
    ("/%41%5a%61%7A", "/AZaz"),
    ("/a%2eb", "/a.b"),
    # ... and paths stay case-sensitive: %4F is "O", and /Orders is not /orders
    ("/%4Frders", "/Orders"),
    ("/ORDERS", "/ORDERS"),
    # decoding comes before dot-segment removal
    ("/a/%2e%2e/orders", "/orders"),
    ("/a/%2E%2E/orders", "/orders"),
    ("/%2e%2e/orders", "/orders"),
    ("/a/%2E./orders", "/orders"),
    ("/a/.%2e/orders", "/orders"),
    ("/a/%2e/b", "/a/b"),
    ("/x/y/%2e%2e", "/x/"),
    # other percent-encodings stay encoded, with upper-case hex
    ("/a%3ab", "/a%3Ab"),
    ("/a%3Ab", "/a%3Ab"),
    ("/a%20b", "/a%20b"),
    ("/100%25", "/100%25"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/orders%3bx", "/orders%3Bx"),  # an encoded ";" is data, not a parameter delimiter
    ("/%00", "/%00"),
    # decoding is one pass: %25 stays %25, so %252e is not a dot
    ("/%252e%252e/orders", "/%252e%252e/orders"),
    ("/a%25%32%65", "/a%252e"),
    # ";" path parameters are dropped from every segment (as servlet containers do)
    ("/orders;jsessionid=1", "/orders"),
    ("/orders;x=1/7", "/orders/7"),
    ("/orders;", "/orders"),
    ("/orders/;x", "/orders/"),
    ("/a;x/b;y;z", "/a/b"),
    ("/;x/orders", "/orders"),
    ("/public;x/../orders", "/orders"),
]


@pytest.mark.parametrize(("raw", "seen_by_routes"), NORMALISED)
def test_path_for_matching(raw: str, seen_by_routes: str) -> None:
    assert path_for_matching(raw) == seen_by_routes


@pytest.mark.parametrize(("raw", "seen_by_routes"), NORMALISED)
def test_normalising_twice_changes_nothing(raw: str, seen_by_routes: str) -> None:
    assert path_for_matching(seen_by_routes) == seen_by_routes


REFUSED = [
    # an encoded slash (or backslash): a separator to some apps, data to others
    "/a%2Fb",
    "/a%2fb",
    "/public/..%2forders",
    "/public/..%2Forders",
    "/orders;v=%2F",  # anywhere, parameters included
    "/a%5Cb",
    "/a%5cb",
    # a backslash is not a URI character, and some servers read it as "/"
    "/orders\\1",
    "/public\\..\\orders",
    # invalid percent-encodings
    "/a%zz",
    "/a%4",
    "/a%",
    "/%g0/orders",
    "/a%%41",
    "/%4-x",
    # a dot-segment with parameters: a traversal to servlet containers, a name to others
    "/public/..;x/orders",
    "/..;/orders",
    "/a/.;x/b",
    "/a/%2e%2e;x/b",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_ambiguous_or_invalid_paths_are_refused(raw: str) -> None:
    assert path_for_matching(raw) is None


def test_the_common_case_returns_the_path_itself() -> None:
    path = "/api/v1/orders/42/items.json"
    assert path_for_matching(path) is path


def _route(name: str, match: RouteMatch) -> CompiledRoute:
    async def chain(request: object) -> object:
        raise AssertionError("not called")

    return CompiledRoute(
        config=RouteConfig(name=name, match=match),
        chain=chain,  # type: ignore[arg-type]
        metrics=Metrics().route(name),
        matches=compile_matcher(match),
    )


TABLE = RouteTable(
    [
        _route("orders", RouteMatch(path_prefix="/orders")),
        _route("exact", RouteMatch(path="/exact")),
        _route("configured-encoded", RouteMatch(path_prefix="/caf%c3%a9/%7eshop")),
        _route("configured-dots", RouteMatch(path="/a/./b//c")),
        _route("rest", RouteMatch(path_prefix="/")),
    ]
)


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/orders", "orders"),
        ("/%6frders", "orders"),
        ("/%6Frders/1", "orders"),
        ("/orders;x=1", "orders"),
        ("/orders;jsessionid=abc/7", "orders"),
        ("//orders", "orders"),
        ("/%2e%2e/orders", "orders"),
        ("/public/../orders", "orders"),
        ("/ORDERS", "rest"),
        ("/Orders", "rest"),
        ("/%4Frders", "rest"),
        ("/ordersx", "rest"),
        ("/orders%3Bx", "rest"),
        ("/exact;v=2", "exact"),
        ("/ex%61ct", "exact"),
        # configured paths are normalised the same way, so either spelling matches
        ("/caf%C3%A9/~shop/1", "configured-encoded"),
        ("/caf%c3%a9/%7Eshop", "configured-encoded"),
        ("/a/b/c", "configured-dots"),
    ],
)
def test_route_table_matches_the_normalised_path(path: str, route: str) -> None:
    found = TABLE.match("POST", "app", path)
    assert found is not None
    assert found.config.name == route


@pytest.mark.parametrize("path", REFUSED)
def test_a_refused_path_takes_no_route_not_even_a_catch_all(path: str) -> None:
    assert TABLE.match("GET", "app", path) is None
