"""The route-level `idempotency:` section: values, defaults merging, and what is refused."""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, IdempotencyConfig, parse_config

UPSTREAM = "upstream:\n  url: http://127.0.0.1:8080\n"


def route(idempotency: str, extra: str = "") -> str:
    return (
        UPSTREAM
        + extra
        + "routes:\n  - name: orders\n    match: {path_prefix: /}\n"
        + f"    idempotency: {idempotency}\n"
    )


def issues(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="<test>")
    return [(issue.key_path, issue.message) for issue in caught.value.issues]


def test_every_key_is_read_with_its_units() -> None:
    config = parse_config(
        route(
            "{enabled: true, methods: [post, PUT], required: true, header: X-Request-Key,"
            " ttl: 2h, lease: 10s, wait: 1500ms, max_request_body: 2KiB,"
            " max_response_body: 0, cache_5xx: false, on_store_error: open,"
            " mismatch_status: 409, release_statuses: [429, 503],"
            " anonymous: reject, credentials_header: X-Api-Key, claim_header: X-Fence,"
            " namespace: orders-v1}"
        )
    )
    assert config.routes[0].idempotency == IdempotencyConfig(
        enabled=True,
        methods=frozenset({"POST", "PUT"}),
        required=True,
        header="x-request-key",
        ttl=7200.0,
        lease=10.0,
        wait=1.5,
        max_request_body=2048,
        max_response_body=0,
        cache_5xx=False,
        on_store_error="open",
        mismatch_status=409,
        release_statuses=frozenset({429, 503}),
        anonymous="reject",
        credentials_header="x-api-key",
        claim_header="X-Fence",
        namespace="orders-v1",
    )


def test_claim_header_and_namespace_may_be_null() -> None:
    config = parse_config(route("{claim_header: null, namespace: null}")).routes[0].idempotency
    assert config is not None
    assert (config.claim_header, config.namespace) == (None, None)


def test_an_empty_section_turns_it_on_with_the_defaults() -> None:
    config = parse_config(route("{}"))
    assert config.routes[0].idempotency == IdempotencyConfig()
    assert IdempotencyConfig().methods == frozenset({"POST", "PATCH"})


def test_enabled_false_turns_it_off() -> None:
    assert parse_config(route("{enabled: false, ttl: 1h}")).routes[0].idempotency is None


def test_defaults_merge_key_by_key_into_each_route() -> None:
    text = (
        UPSTREAM + "defaults:\n  idempotency: {ttl: 1h, required: true}\n"
        "routes:\n"
        "  - name: a\n    match: {path_prefix: /a}\n    idempotency: {ttl: 5m}\n"
        "  - name: b\n    match: {path_prefix: /b}\n"
        "  - name: c\n    match: {path_prefix: /c}\n    idempotency: {enabled: false}\n"
    )
    a, b, c = parse_config(text).routes
    assert a.idempotency == IdempotencyConfig(ttl=300.0, required=True)
    assert b.idempotency == IdempotencyConfig(ttl=3600.0, required=True)
    assert c.idempotency is None


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("{on_store_error: maybe}", "on_store_error"),
        ("{mismatch_status: 418}", "mismatch_status"),
        ("{ttl: 0s}", "ttl"),
        ("{lease: 0s}", "lease"),
        ("{methods: []}", "methods"),
        ("{max_request_body: 0}", "max_request_body"),
        ("{wait: 2s, lease: 2s}", "wait"),
        ("{unknown: 1}", "unknown"),
        ("{release_statuses: [99]}", "release_statuses[0]"),
        ("{release_statuses: [600]}", "release_statuses[0]"),
        ("{release_statuses: 503}", "release_statuses"),
        ("{anonymous: shared}", "anonymous"),
        ("{claim_header: 'bad header'}", "claim_header"),
        ("{namespace: 'a b'}", "namespace"),
    ],
)
def test_invalid_values_are_refused_at_their_key(section: str, key: str) -> None:
    found = issues(route(section))
    assert [path for path, _ in found] == [f"routes[0].idempotency.{key}"], found


def test_several_workers_with_memory_state_are_refused() -> None:
    """memory:// is per process: with several workers a key could run once per worker."""
    text = route("{}", extra="server:\n  workers: 2\nstate:\n  url: memory://\n")
    assert [path for path, _ in issues(text)] == ["server.workers"]
    shared = route("{}", extra="server:\n  workers: 2\nstate:\n  url: redis://127.0.0.1:6379\n")
    assert parse_config(shared).routes[0].idempotency == IdempotencyConfig()
