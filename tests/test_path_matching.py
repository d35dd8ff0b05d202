"""Routes match on a normalised path, so `..` and `//` cannot dodge a route's policies."""

from __future__ import annotations

import pytest

from sidecar.routing import path_for_matching


@pytest.mark.parametrize(
    ("raw", "seen_by_routes"),
    [
        ("/orders/1", "/orders/1"),
        ("/public/../orders", "/orders"),
        ("//orders//1", "/orders/1"),
        ("/a/./b/", "/a/b/"),
        ("/a/%2e%2e/orders", "/orders"),
        ("/a/%2E%2E/orders", "/orders"),
        ("/../../orders", "/orders"),
        ("/x/y/..", "/x/"),
        ("/a%2Fb", "/a%2Fb"),  # an encoded slash is data, not a separator
        ("/", "/"),
    ],
)
def test_path_for_matching(raw: str, seen_by_routes: str) -> None:
    assert path_for_matching(raw) == seen_by_routes
