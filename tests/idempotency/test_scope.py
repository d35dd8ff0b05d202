"""Whose record a key names (organisation, user, route, method), and what makes a second
request "the same request" (the fingerprint): same key, different request -> refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.idempotency.conftest import BODY, TEST_TIMEOUT, EnvFactory

# --- scope: the same key elsewhere is another record ---------------------------------------

TWO_HOSTS = (
    "  - name: shop-a\n    match: {host: a.example, path_prefix: /}\n"
    "    idempotency: {methods: [POST, PATCH]}\n"
    "  - name: shop-b\n    match: {host: b.example, path_prefix: /}\n"
    "    idempotency: {methods: [POST, PATCH]}\n"
)


@pytest.mark.parametrize(
    ("first", "other"),
    [
        pytest.param({"org": "acme"}, {"org": "globex"}, id="another-org"),
        pytest.param({"user": "bob"}, {"user": "alice"}, id="another-user"),
        pytest.param({"org": "acme"}, {"org": None}, id="no-org"),
        pytest.param({"method": "POST"}, {"method": "PATCH"}, id="another-method"),
    ],
)
async def test_same_key_in_another_scope_is_another_record(
    make_env: EnvFactory, first: dict[str, Any], other: dict[str, Any]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{methods: [POST, PATCH]}")
        one = await env.send(key="shared", **first)
        two = await env.send(key="shared", **other)
        assert (one.status, one.n, one.replayed) == (201, 1, "false")
        assert (two.status, two.n, two.replayed) == (201, 2, "false")
        assert env.upstream.executions == 2
        assert await env.records.settled() == [b"c", b"c"]
        # Each scope still replays its own response.
        assert (await env.send(key="shared", **first)).body == one.body
        assert (await env.send(key="shared", **other)).body == two.body
        assert env.upstream.executions == 2


async def test_same_key_on_another_route_is_another_record(make_env: EnvFactory) -> None:
    """Routes told apart by host only: method, path, body and key are identical."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(routes=TWO_HOSTS)
        one = await env.send(key="shared", headers={"Host": "a.example"})
        two = await env.send(key="shared", headers={"Host": "b.example"})
        assert [one.n, two.n] == [1, 2]
        assert [one.replayed, two.replayed] == ["false", "false"]
        assert await env.records.settled() == [b"c", b"c"]
        again = await env.send(key="shared", headers={"Host": "a.example"})
        assert (again.n, again.replayed) == (1, "true")
        assert env.upstream.executions == 2


async def test_an_org_never_receives_another_orgs_response_whatever_key_it_sends(
    make_env: EnvFactory,
) -> None:
    keys = ["k-1", '"k-2"', "order-42", "x" * 255, "shared"]
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        globex = {key: await env.send(key=key, org="globex", user="bob") for key in keys}
        assert await env.records.settled() == [b"c"] * len(keys)
        for key in keys:
            # Same key, same user id, same request: only the organisation differs.
            reply = await env.send(key=key, org="acme", user="bob")
            assert reply.status == 201
            assert reply.replayed == "false"
            assert reply.json()["org"] == "acme"
            assert reply.body != globex[key].body
        assert env.upstream.executions == 2 * len(keys)


async def test_the_configured_identity_headers_scope_the_records(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(extra="identity:\n  org_header: X-Tenant-Id\n")
        one = await env.send(key="k", org="same", headers={"X-Tenant-Id": "t1"})
        two = await env.send(key="k", org="same", headers={"X-Tenant-Id": "t2"})
        assert [one.n, two.n] == [1, 2]
        assert [one.replayed, two.replayed] == ["false", "false"]
        assert await env.records.settled() == [b"c", b"c"]
        # Tagged by the configured header's value, not by X-Org-Id.
        tags = {key.split("{", 1)[1].split("}", 1)[0] for key in await env.records.all()}
        assert tags == {"o:t1", "o:t2"}
        again = await env.send(key="k", org="other", headers={"X-Tenant-Id": "t1"})
        assert (again.n, again.replayed) == (1, "true")
        assert env.upstream.executions == 2


# --- the fingerprint: same key, different request ---------------------------------------


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 7):
        yield data[start : start + 7]


async def test_body_framing_is_not_part_of_the_request(make_env: EnvFactory) -> None:
    """A chunked body and the same bytes with a Content-Length are the same request."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        headers = {
            "Idempotency-Key": "framing",
            "X-Org-Id": "acme",
            "X-User-Id": "bob",
            "Content-Type": "application/json",
        }
        async with env.session.post(env.url + "/orders", data=_chunks(BODY), headers=headers) as r:
            assert r.status == 201
            first = await r.read()
        assert env.upstream.calls[0].body == BODY
        assert await env.records.settled() == [b"c"]
        again = await env.send(key="framing")
        assert (again.status, again.replayed, again.body) == (201, "true", first)
        assert env.upstream.executions == 1


VARIATIONS = [
    pytest.param({"body": BODY + b" "}, id="body"),
    pytest.param({"body": b""}, id="empty-body"),
    pytest.param({"path": "/orders/other"}, id="path"),
    pytest.param({"path": "/orders?dry_run=1"}, id="query"),
    pytest.param({"content_type": "text/plain"}, id="content-type"),
    pytest.param({"content_type": None}, id="no-content-type"),
    pytest.param({"headers": {"Content-Encoding": "gzip"}}, id="content-encoding"),
]


@pytest.mark.parametrize("change", VARIATIONS)
async def test_same_key_different_request_is_refused_and_not_run(
    make_env: EnvFactory, change: dict[str, Any]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send("/orders", key="fp")
        assert first.status == 201
        assert await env.records.settled() == [b"c"]
        change = dict(change)  # the parameter is shared by both backends' runs
        path = change.pop("path", "/orders")
        reused = await env.send(path, key="fp", **change)
        assert reused.status == 422
        assert reused.problem == "idempotency-key-reused"
        assert reused.json()["status"] == 422
        assert "Idempotent-Replayed" not in reused.headers
        assert env.upstream.executions == 1
        # The record is untouched: the original request still replays.
        again = await env.send("/orders", key="fp")
        assert (again.status, again.replayed, again.body) == (201, "true", first.body)
        assert env.upstream.executions == 1


@pytest.mark.parametrize("status", [400, 409, 422])
async def test_mismatch_status_is_configurable(make_env: EnvFactory, status: int) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(f"{{mismatch_status: {status}}}")
        await env.send(key="fp")
        assert await env.records.settled() == [b"c"]
        reused = await env.send(key="fp", body=b'{"amount": 99}')
        assert reused.status == status
        assert reused.problem == "idempotency-key-reused"
        assert reused.json()["status"] == status
        assert env.upstream.executions == 1


async def test_same_key_different_request_while_the_first_runs_is_a_mismatch(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        first = asyncio.create_task(env.send("/slow", key="fp"))
        await env.wait_executions(1)
        reused = await env.send("/slow", key="fp", body=b"{}")
        assert reused.status == 422
        assert reused.problem == "idempotency-key-reused"
        env.upstream.gate.set()
        assert (await first).status == 201
        assert env.upstream.executions == 1
