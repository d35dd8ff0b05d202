"""The route table (first match wins; methods, path, prefix, regex, host), per-route settings,
route-labelled metrics, and the access log lines requests leave behind."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from aiohttp import web

from tests.proxy.conftest import (
    TEST_TIMEOUT,
    RawResponse,
    config_from_yaml,
    exchange,
    metric_value,
    wait_until,
)
from tests.support import (
    RawUpstream,
    RunningSidecar,
    app_with,
    free_port,
    raw_request,
    run_app,
    run_sidecar,
    sidecar_config,
)

ROUTES = """\
routes:
  - name: orders-read
    match: {path_prefix: /orders, methods: [GET, HEAD]}
  - name: orders
    match: {path_prefix: /orders}
  - name: exact
    match: {path: /exact}
  - name: items
    match: {path_regex: "^/items/[0-9]+$"}
  - name: api
    match: {host: api.example.com}
  - name: tenants
    match: {host: "*.example.com"}
"""

_ids = itertools.count()


async def send(
    sc: RunningSidecar,
    method: str,
    target: str,
    host: str = "app",
    body: bytes = b"",
    **headers: str,
) -> tuple[RawResponse, dict[str, object]]:
    """One request; returns the response and its access log record (found by request id)."""
    request_id = f"routing-{next(_ids)}"
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: {request_id}\r\n"
    for name, value in headers.items():
        head += f"{name.replace('_', '-')}: {value}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    raw = (head + "Connection: close\r\n\r\n").encode() + body
    response = await exchange(sc.port, raw, head_request=method == "HEAD")

    def record() -> dict[str, object] | None:
        for r in sc.log.records:
            if r.get("event") == "access" and r.get("request_id") == request_id:
                return r
        return None

    # The line is written as the handler unwinds, just after the response went out.
    await wait_until(lambda: record() is not None)
    found = record()
    assert found is not None
    return response, found


# -- 22: matching -------------------------------------------------------------------------

CASES = [
    # first match wins: both orders routes match a GET
    ("GET", "/orders/1", "app", "orders-read"),
    ("PUT", "/orders/1", "app", "orders"),
    ("POST", "/orders/1", "app", "orders"),
    ("DELETE", "/orders", "app", "orders"),
    # path_prefix works on segment boundaries and ignores the query
    ("GET", "/orders", "app", "orders-read"),
    ("GET", "/orders?x=1", "app", "orders-read"),
    ("GET", "/orders/", "app", "orders-read"),
    ("GET", "/ordersx", "app", None),
    ("POST", "/orders-archive", "app", None),
    # exact path
    ("GET", "/exact", "app", "exact"),
    ("GET", "/exact?q=1", "app", "exact"),
    ("GET", "/exact/", "app", None),
    ("GET", "/exactly", "app", None),
    # path_regex
    ("GET", "/items/42", "app", "items"),
    ("GET", "/items/abc", "app", None),
    ("GET", "/items/42/x", "app", None),
    # exact host, with a port, and in another case
    ("GET", "/anything", "api.example.com", "api"),
    ("GET", "/anything", "api.example.com:8443", "api"),
    ("GET", "/anything", "API.Example.com", "api"),
    # wildcard host
    ("GET", "/anything", "shop.example.com", "tenants"),
    ("GET", "/anything", "a.b.example.com:8080", "tenants"),
    ("GET", "/anything", "example.com", None),
    ("GET", "/anything", "evilexample.com", None),
    ("GET", "/anything", "example.com.evil.org", None),
    # an absolute-form target routes on its own authority, not on the Host header
    ("GET", "http://api.example.com/anything", "app", "api"),
    ("GET", "http://shop.example.com:8080/anything", "app", "tenants"),
    # path routes come first: first match wins over the host routes
    ("GET", "/orders/1", "api.example.com", "orders-read"),
]


@pytest.mark.parametrize(("method", "target", "host", "expected"), CASES)
async def test_route_matching(
    raw_upstream: RawUpstream, method: str, target: str, host: str, expected: str | None
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, ROUTES)) as sc:
            response, record = await send(sc, method, target, host)
    if expected is None:
        assert response.status == 404
        assert response.json()["type"] == "urn:sidecar:problem:route-not-found"
        assert record["route"] == "unmatched"
        assert raw_upstream.exchanges == []
    else:
        assert response.status == 200
        assert record["route"] == expected
        assert len(raw_upstream.exchanges) == 1


async def test_unmatched_request_is_404_problem(raw_upstream: RawUpstream) -> None:
    routes = "routes:\n  - name: api\n    match: {path_prefix: /api}\n"
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, routes)) as sc:
            response, _ = await send(sc, "GET", "/elsewhere?q=1")
    assert response.status == 404
    assert response.header("Content-Type") == ["application/problem+json"]
    problem = response.json()
    assert problem["type"] == "urn:sidecar:problem:route-not-found"
    assert problem["status"] == 404
    assert problem["request_id"] == response.header("X-Request-Id")[0]
    assert raw_upstream.exchanges == []


async def test_per_route_timeout_honoured() -> None:
    arrived = {"/fast": asyncio.Event(), "/slow": asyncio.Event()}
    release = asyncio.Event()

    async def wait_for_release(request: web.Request) -> web.Response:
        arrived[request.path].set()
        await release.wait()
        return web.Response(text="done")

    routes = (
        "routes:\n"
        "  - name: fast\n    match: {path_prefix: /fast}\n    timeout: 200ms\n"
        "  - name: slow\n    match: {path_prefix: /slow}\n    timeout: 5s\n"
    )
    app = app_with({"/fast": wait_for_release, "/slow": wait_for_release})
    async with asyncio.timeout(TEST_TIMEOUT), run_app(app) as url:
        try:
            async with run_sidecar(sidecar_config(url, routes)) as sc:
                loop = asyncio.get_running_loop()
                started = loop.time()
                fast, _ = await send(sc, "GET", "/fast")
                fast_elapsed = loop.time() - started
                assert fast.status == 504
                assert 0.2 <= fast_elapsed < 2.0, fast_elapsed

                slow = asyncio.create_task(send(sc, "GET", "/slow"))
                await arrived["/slow"].wait()
                # The behaviour under test is elapsed time: /slow has been waiting for longer
                # than /fast's 200 ms deadline, and must still be waiting (its own is 5 s).
                await asyncio.sleep(0.5)
                assert not slow.done()
                release.set()
                response, record = await slow
                assert response.status == 200
                assert response.body == b"done"
                assert record["route"] == "slow"
        finally:
            release.set()


async def test_metrics_labelled_by_route(raw_upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, ROUTES)) as sc:
            await send(sc, "GET", "/orders/1")
            await send(sc, "GET", "/orders/2")
            await send(sc, "POST", "/orders/3")
            await send(sc, "GET", "/items/9")
            await send(sc, "GET", "/nowhere")

            async def value(name: str, **labels: str) -> float:
                return await metric_value(sc.admin_url, name, **labels)

            requests = "sidecar_requests_total"
            assert await value(requests, route="orders-read", method="GET", code="200") == 2
            assert await value(requests, route="orders", method="POST", code="200") == 1
            assert await value(requests, route="orders", method="GET", code="200") == 0
            assert await value(requests, route="items", method="GET", code="200") == 1
            assert await value(requests, route="unmatched", method="GET", code="404") == 1
            durations = "sidecar_request_duration_seconds_count"
            assert await value(durations, route="orders-read") == 2
            assert await value(durations, route="orders") == 1


# -- 23: access log -----------------------------------------------------------------------


async def test_access_record_fields(raw_upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, ROUTES)) as sc:
            response, record = await send(sc, "POST", "/orders/7?token=query-secret", body=b"hello")
    assert response.status == 200
    assert record["event"] == "access"
    assert record["route"] == "orders"
    assert record["method"] == "POST"
    assert record["path"] == "/orders/7"
    assert record["status"] == 200
    assert record["bytes_in"] == 5
    assert record["bytes_out"] == 2  # RawUpstream answers "ok"
    assert record["request_id"] == response.header("X-Request-Id")[0]
    assert "query-secret" not in json.dumps(record)


async def test_access_record_includes_query_when_configured(raw_upstream: RawUpstream) -> None:
    text = f"upstream:\n  url: {raw_upstream.url}\nlogging:\n  access:\n    include_query: true\n"
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(config_from_yaml(text)) as sc:
            _, record = await send(sc, "GET", "/search?q=a%20b&page=2")
    assert record["path"] == "/search?q=a%20b&page=2"


SECRETS = {
    "Authorization": "Bearer SECRET-AUTH-TOKEN",
    "Cookie": "session=SECRET-COOKIE-VALUE",
    "Proxy-Authorization": "Basic SECRET-PROXY-CREDS",
    "X-Api-Key": "SECRET-API-KEY",
}


@pytest.mark.parametrize("outcome", ["forwarded", "unmatched", "upstream-down"])
async def test_credentials_never_logged(raw_upstream: RawUpstream, outcome: str) -> None:
    upstream_url = (
        f"http://127.0.0.1:{free_port()}" if outcome == "upstream-down" else raw_upstream.url
    )
    text = (
        f"upstream:\n  url: {upstream_url}\n"
        "logging:\n  access:\n"
        "    headers: [authorization, cookie, proxy-authorization, x-api-key,"
        " user-agent, x-trace]\n"
        "    redact_headers: [x-api-key]\n"
        "routes:\n  - name: api\n    match: {path_prefix: /api}\n"
    )
    target = "/nowhere" if outcome == "unmatched" else "/api/thing"
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(config_from_yaml(text)) as sc:
            response, record = await send(
                sc,
                "GET",
                target,
                User_Agent="probe/1.0",
                X_Trace="t-1",
                **{k.replace("-", "_"): v for k, v in SECRETS.items()},
            )
            records = list(sc.log.records)
    assert response.status == {"forwarded": 200, "unmatched": 404, "upstream-down": 502}[outcome]
    # The configured, non-secret headers are logged, so the header feature is on.
    logged = {k.lower(): v for k, v in record["req_headers"].items()}  # type: ignore[union-attr]
    assert logged == {"user-agent": "probe/1.0", "x-trace": "t-1"}
    everything = json.dumps(records)
    assert "SECRET" not in everything
    if outcome == "upstream-down":
        assert any(r.get("event") == "upstream.error" for r in records)


async def test_dot_segments_cannot_dodge_a_route_but_the_app_gets_the_raw_path() -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    routes = (
        "routes:\n"
        "  - name: orders\n    match: {path_prefix: /orders}\n"
        "  - name: rest\n    match: {path_prefix: /}\n"
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_app(app_with({"/{tail:.*}": record})) as url,
        run_sidecar(sidecar_config(url, routes)) as sc,
    ):
        raw = b"GET /public/../orders/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = await raw_request(sc.port, raw)
        assert reply.startswith(b"HTTP/1.1 200")
        access = [r for r in sc.log.records if r.get("event") == "access"]
        assert access[-1]["route"] == "orders"
    assert seen == ["/public/../orders/7"]


# -- the path routes see: every spelling of /orders gets /orders's policies ----------------

GUARDED = """\
routes:
  - name: orders
    match: {path_prefix: /orders}
    idempotency: {required: true}
  - name: rest
    match: {path_prefix: /}
"""

# Spellings the app reads as /orders (or under it): the route table must read them so too.
ORDERS_SPELLINGS = [
    "/%6frders",
    "/%6Frders/7",
    "/%6F%72%64%65%72%73",
    "/orders;x=1",
    "/orders;jsessionid=abc/7",
    "//orders",
    "/%2e%2e/orders",
    "/a/%2E./orders",
    "/public/../orders/7",
]


@pytest.mark.parametrize("target", ORDERS_SPELLINGS)
async def test_every_spelling_of_a_path_gets_its_routes_policies(
    raw_upstream: RawUpstream, target: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, GUARDED)) as sc:
            # /orders requires an Idempotency-Key: without one the app is never asked.
            refused, refused_record = await send(sc, "POST", target)
            assert raw_upstream.exchanges == []
            # With one, the request goes through, byte for byte as the client wrote it.
            passed, passed_record = await send(
                sc, "POST", target, Idempotency_Key="k-1", X_Org_Id="acme"
            )
    assert refused.status == 400
    assert refused.json()["type"] == "urn:sidecar:problem:idempotency-key-missing"
    assert refused_record["route"] == "orders"
    assert passed.status == 200
    assert passed_record["route"] == "orders"
    [exchange_] = raw_upstream.exchanges
    assert exchange_.request_line == f"POST {target} HTTP/1.1".encode()


@pytest.mark.parametrize("target", ["/ORDERS", "/Orders/7", "/%4Frders", "/ordersx", "/orders%3Bx"])
async def test_paths_stay_case_sensitive_and_other_names_stay_other(
    raw_upstream: RawUpstream, target: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, GUARDED)) as sc:
            response, record = await send(sc, "POST", target)
    assert response.status == 200
    assert record["route"] == "rest"
    [exchange_] = raw_upstream.exchanges
    assert exchange_.request_line == f"POST {target} HTTP/1.1".encode()


# Paths whose meaning depends on the app (an encoded slash or backslash, a raw backslash,
# "..;"), and invalid percent-encodings: no route takes them, not even a catch-all.
REFUSED_TARGETS = [
    "/public/..%2forders",
    "/public/..%2Forders",
    "/orders%2F7",
    "/public/..%5corders",
    "/public\\..\\orders",
    "/public/..;x/orders",
    "/orders/%zz",
    "/orders/%4",
]


@pytest.mark.parametrize("target", REFUSED_TARGETS)
async def test_ambiguous_or_invalid_paths_never_reach_the_app(
    raw_upstream: RawUpstream, target: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, GUARDED)) as sc:
            response, record = await send(sc, "POST", target, Idempotency_Key="k-1")
    # 400 once the handler answers refused paths (see RouteTable.match); 404 until then.
    assert response.status == 400
    assert record["route"] == "unmatched"
    assert raw_upstream.exchanges == []


@pytest.mark.parametrize("target", REFUSED_TARGETS)
async def test_ambiguous_or_invalid_paths_are_400(raw_upstream: RawUpstream, target: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url, GUARDED)) as sc:
            response, _ = await send(sc, "GET", target)
    assert response.status == 400
    assert response.json()["type"] == "urn:sidecar:problem:bad-request"
