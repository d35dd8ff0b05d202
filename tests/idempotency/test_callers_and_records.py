"""Whom a record belongs to when no identity header says so, which records a replay may
use (content coding, namespace), and records this release cannot read."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from sidecar.policies.idempotency.records import (
    accepts_encoding,
    credentials_scope,
    record_key,
)
from sidecar.store import MemoryStore
from tests.idempotency.conftest import (
    RECORD_PREFIX,
    ROUTE,
    TEST_TIMEOUT,
    Backend,
    Env,
    EnvFactory,
)

TOKEN_A = "Bearer secret-token-of-caller-a"
TOKEN_B = "Bearer secret-token-of-caller-b"


# --- anonymous callers -------------------------------------------------------------------------


async def test_callers_without_identity_are_scoped_by_their_credentials(
    make_env: EnvFactory,
) -> None:
    """Same key, two callers known only by their Authorization: two records, and neither
    can replay the other's response."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        a = await env.send(key="k", org=None, user=None, headers={"Authorization": TOKEN_A})
        b = await env.send(key="k", org=None, user=None, headers={"Authorization": TOKEN_B})
        assert (a.status, a.n, b.status, b.n) == (201, 1, 201, 2)
        assert b.replayed == "false"
        assert await env.records.settled() == [b"c", b"c"]
        again = await env.send(key="k", org=None, user=None, headers={"Authorization": TOKEN_A})
        assert (again.replayed, again.n) == ("true", 1)
        assert env.upstream.executions == 2
        # The store holds a hash of the credentials, never the credentials.
        for key, fields in (await env.records.all()).items():
            assert b"secret-token" not in key.encode() + b"".join(fields.values())


async def test_a_caller_with_no_identity_and_no_credentials_is_refused(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        reply = await env.send(key="k", org=None, user=None)
        assert reply.status == 400
        assert reply.problem == "idempotency-caller-unknown"
        assert "authorization" in reply.json()["detail"].lower()
        assert env.upstream.executions == 0
        assert await env.records.all() == {}


async def test_credentials_header_is_configurable(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{credentials_header: X-Api-Key}")
        a = await env.send(key="k", org=None, user=None, headers={"X-Api-Key": "key-a"})
        b = await env.send(key="k", org=None, user=None, headers={"X-Api-Key": "key-b"})
        assert (a.n, b.n) == (1, 2)
        # Authorization alone no longer identifies a caller on this route.
        c = await env.send(key="k", org=None, user=None, headers={"Authorization": TOKEN_A})
        assert c.problem == "idempotency-caller-unknown"
        assert env.upstream.executions == 2


async def test_anonymous_reject_refuses_even_with_credentials(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{anonymous: reject}")
        reply = await env.send(key="k", org=None, user=None, headers={"Authorization": TOKEN_A})
        assert (reply.status, reply.problem) == (400, "idempotency-caller-unknown")
        assert env.upstream.executions == 0
        assert (await env.send(key="k")).status == 201  # an identified caller is served


async def test_anonymous_bypass_forwards_unprotected(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{anonymous: bypass}")
        one = await env.send(key="k", org=None, user=None)
        two = await env.send(key="k", org=None, user=None)
        assert (one.n, two.n) == (1, 2)
        assert one.replayed is None and two.replayed is None
        assert await env.records.all() == {}
        assert await env.outcome("bypassed") == 2


def test_a_credentials_scope_cannot_be_spoofed_by_a_user_header() -> None:
    """A user header's value cannot hold the control character the credentials scope
    starts with, so no user id names the record of a caller known by its credentials."""
    scope = credentials_scope(TOKEN_A)
    assert scope.startswith("\x01")
    assert TOKEN_A not in scope
    assert record_key("", scope, "POST", ROUTE, "k") != record_key(
        "", scope[1:], "POST", ROUTE, "k"
    )


# --- replays and content negotiation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("accept_encoding", "replayed"),
    [
        pytest.param(None, True, id="client-default"),
        pytest.param("gzip", True, id="gzip"),
        pytest.param("br, GZIP;q=0.5", True, id="listed-with-q"),
        pytest.param("*", True, id="wildcard"),
        pytest.param("identity", False, id="identity-only"),
        pytest.param("gzip;q=0, *", False, id="gzip-refused-wildcard-accepted"),
        pytest.param("br", False, id="only-another-coding"),
        pytest.param("*;q=0", False, id="wildcard-refused"),
    ],
)
async def test_a_stored_encoded_body_is_replayed_only_to_a_request_accepting_it(
    make_env: EnvFactory, accept_encoding: str | None, replayed: bool
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send("/gzip", key="z", headers={"Accept-Encoding": "gzip"})
        assert first.headers["Content-Encoding"] == "gzip"
        assert await env.records.settled() == [b"c"]
        headers = {} if accept_encoding is None else {"Accept-Encoding": accept_encoding}
        retry = await env.send("/gzip", key="z", headers=headers)
        if replayed:
            assert (retry.status, retry.replayed) == (201, "true")
            # (The test client decodes gzip itself.)
            assert retry.headers["Content-Encoding"] == "gzip"
            assert retry.body == first.body == b'{"compressed": true}' * 20
        else:
            assert (retry.status, retry.problem) == (406, "idempotency-not-acceptable")
            assert await env.outcome("not_acceptable") == 1
        assert env.upstream.executions == 1


@pytest.mark.parametrize(
    ("header", "coding", "accepted"),
    [
        (None, "gzip", True),
        ("", "gzip", False),
        ("deflate, gzip", "gzip", True),
        ("gzip;q=0.0", "gzip", False),
        ("gzip; q=0.001", "gzip", True),
        ("gzip;q=nonsense", "gzip", True),
        ("*;q=0", "", True),
        ("*;q=0", "identity", True),
        ("x-gzip", "gzip", False),
    ],
)
def test_accept_encoding_reading(header: str | None, coding: str, accepted: bool) -> None:
    assert accepts_encoding(header, coding) is accepted


# --- namespaces: renaming a route ------------------------------------------------------------


def renamed(name: str, namespace: str | None) -> str:
    section = "{}" if namespace is None else f"{{namespace: {namespace}}}"
    return f"  - name: {name}\n    match: {{path_prefix: /}}\n    idempotency: {section}\n"


async def test_a_renamed_route_keeps_its_records_through_its_namespace(
    make_env: EnvFactory, backend: Backend
) -> None:
    if backend.server is None:
        pytest.skip("two sidecars share records only through Redis")
    async with asyncio.timeout(TEST_TIMEOUT):
        before = await make_env(routes=renamed("orders-v1", "orders"))
        first = await before.send(key="renamed")
        assert await before.records.settled() == [b"c"]
        after = await make_env(routes=renamed("orders-v2", "orders"))
        again = await after.send(key="renamed")
        assert (again.replayed, again.body) == ("true", first.body)
        assert after.upstream.executions == 0
        # Without a namespace, the record was keyed by the old name: it runs again.
        orphaned = await make_env(routes=renamed("orders-v3", None))
        assert (await orphaned.send(key="renamed")).replayed == "false"
        assert orphaned.upstream.executions == 1


# --- records this release cannot read ----------------------------------------------------------


async def write_record(env: Env, fields: dict[str, bytes]) -> None:
    """Put a record where the request below (org acme, user bob, POST, key `bad`) looks."""
    key = RECORD_PREFIX.removesuffix("idem:") + record_key("acme", "bob", "POST", ROUTE, "bad")
    store = env.sidecar.sidecar.store
    if isinstance(store, MemoryStore):
        store.keyspace.hset(key, fields)
        store.keyspace.pexpire(key, 60_000)
        return
    assert env.backend.server is not None
    client = aioredis.Redis(port=env.backend.server.port)
    try:
        await client.hset(key, mapping=fields)  # type: ignore[arg-type]
        await client.pexpire(key, 60_000)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(
            {"s": b"c", "c": b"two hundred", "h": b"[]", "b": b"", "e": b"1"}, id="status"
        ),
        pytest.param(
            {"s": b"c", "c": b"201", "h": b"{not json", "b": b"", "e": b"1"}, id="headers"
        ),
        pytest.param({"s": b"c", "c": b"201", "h": b"[]", "b": b""}, id="missing-expiry"),
        pytest.param({"s": b"x", "t": b"t", "f": b"f"}, id="unknown-state"),
        pytest.param({"s": b"c", "v": b"2", "c": b"201", "h": b"[]", "b": b""}, id="foreign"),
    ],
)
@pytest.mark.parametrize("on_store_error", ["closed", "open"])
async def test_an_unreadable_record_is_a_counted_store_error_not_a_500(
    make_env: EnvFactory, fields: dict[str, bytes], on_store_error: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(f"{{on_store_error: {on_store_error}}}")
        await write_record(env, fields)
        reply = await env.send(key="bad")
        if on_store_error == "closed":
            assert (reply.status, reply.problem) == (503, "idempotency-unavailable")
            assert env.upstream.executions == 0
        else:
            assert (reply.status, reply.replayed) == (201, None)
            assert env.upstream.executions == 1
        assert await env.outcomes() == {"store_error": 1}
        [event] = env.events("idempotency.store_error")
        expected = "foreign_record" if "v" in fields else "malformed_record"
        assert event["kind"] == expected
