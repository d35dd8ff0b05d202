"""The admin API's quota endpoints on the Admin app, on memory and on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.admin import Admin, Status
from sidecar.config import StateConfig, parse_config
from sidecar.metrics import Metrics
from sidecar.store import StateStore, open_store
from tests.support import free_port

PROBLEM = "urn:sidecar:problem:"
TOKEN = "s3cret-admin-token"
CONFIG = parse_config(
    "upstream:\n  url: http://127.0.0.1:9\n"
    "routes:\n  - name: r\n    match: {path_prefix: /}\n"
    "    quotas: {limits: [{name: hourly, kind: rate, limit: 10, window: 1h}]}\n"
)
Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


def status() -> Status:
    return Status(CONFIG, False, True, 1, 0.0, 0, None, "test")


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    opened = open_store(StateConfig(url=url))
    yield opened
    await opened.close()


async def admin_client(aiohttp_client: MakeClient, store: StateStore, token: str | None) -> Client:
    return await aiohttp_client(Admin(status, store, Metrics(), admin_token=token).app())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_without_a_token_reads_are_open_and_writes_refused(
    aiohttp_client: MakeClient, store: StateStore
) -> None:
    client = await admin_client(aiohttp_client, store, None)
    response = await client.get("/quotas/acme")
    assert response.status == 200
    body = await response.json()
    assert body["org"] == "acme" and body["overrides"] == {}
    assert body["routes"][0]["limits"][0]["limit"] == 10
    for method in ("PUT", "DELETE"):
        response = await client.request(method, "/quotas/acme/hourly", json={"limit": 3})
        assert response.status == 403
        assert (await response.json())["type"] == PROBLEM + "admin-writes-disabled"


async def test_with_a_token_every_quota_request_needs_it(
    aiohttp_client: MakeClient, store: StateStore
) -> None:
    client = await admin_client(aiohttp_client, store, TOKEN)
    bodies = []
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {TOKEN}"}):
        response = await client.get("/quotas/acme", headers={**headers, "X-Request-Id": "r1"})
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="sidecar-admin"'
        assert response.content_type == "application/problem+json"
        bodies.append(await response.read())
    assert len(set(bodies)) == 1
    response = await client.put("/quotas/acme/hourly", json={"limit": 3})
    assert response.status == 401
    response = await client.get("/quotas/acme", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status == 200
    assert (await client.get("/live")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_set_get_delete_round_trip(aiohttp_client: MakeClient, store: StateStore) -> None:
    client = await admin_client(aiohttp_client, store, TOKEN)
    auth = bearer(TOKEN)
    response = await client.put("/quotas/acme/hourly", json={"limit": 3}, headers=auth)
    assert response.status == 200
    limit = (await response.json())["routes"][0]["limits"][0]
    assert limit["limit"] == 3 and limit["overridden"] is True
    body = await (await client.get("/quotas/acme", headers=auth)).json()
    assert body["overrides"] == {"hourly": 3}
    other = await (await client.get("/quotas/other", headers=auth)).json()
    assert other["routes"][0]["limits"][0]["limit"] == 10
    response = await client.delete("/quotas/acme/hourly", headers=auth)
    assert response.status == 200
    limit = (await response.json())["routes"][0]["limits"][0]
    assert limit["limit"] == 10 and limit["overridden"] is False
    response = await client.delete("/quotas/acme/hourly", headers=auth)
    assert response.status == 404
    assert (await response.json())["type"] == PROBLEM + "quota-override-missing"


async def test_unknown_limits_and_bad_bodies(aiohttp_client: MakeClient, store: StateStore) -> None:
    client = await admin_client(aiohttp_client, store, TOKEN)
    auth = bearer(TOKEN)
    for method in ("PUT", "DELETE"):
        response = await client.request(
            method, "/quotas/acme/nope", json={"limit": 3}, headers=auth
        )
        assert response.status == 404
        assert (await response.json())["type"] == PROBLEM + "quota-limit-unknown"
    bad = [
        b"",
        b"nope",
        b"[]",
        b'{"limit": true}',
        b'{"limit": -1}',
        b'{"limit": 1.5}',
        b'{"limit": "3"}',
        b'{"limit": 3, "x": 1}',
        b"{}",
    ]
    for data in bad:
        response = await client.put("/quotas/acme/hourly", data=data, headers=auth)
        assert response.status == 400, data
        assert (await response.json())["type"] == PROBLEM + "admin-bad-request"
    big = b'{"limit": 3' + b" " * 5000 + b"}"
    response = await client.put("/quotas/acme/hourly", data=big, headers=auth)
    assert response.status == 413


async def test_a_store_that_is_down_is_503(aiohttp_client: MakeClient) -> None:
    down = open_store(StateConfig(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))
    try:
        client = await admin_client(aiohttp_client, down, TOKEN)
        for method in ("GET", "PUT", "DELETE"):
            path = "/quotas/acme" if method == "GET" else "/quotas/acme/hourly"
            response = await client.request(method, path, json={"limit": 3}, headers=bearer(TOKEN))
            assert response.status == 503, method
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["type"] == PROBLEM + "admin-store-unavailable"
    finally:
        await down.close()
