"""The upstream HTTP/1.1 client, from outside: what reaches the app is what the client sent,
byte for byte; nothing is retried behind the client's back; the pool is bounded, reuses
connections only when that is safe and replaces ones the app closed; responses keep their
framing, 1xx interim responses are handled as RFC 9110 §15.2 says, response heads are
bounded by size (not by a per-field limit); every failure has its kind.

Every app here is a ScriptedApp (tests/proxy/scripted_app.py): raw TCP on 127.0.0.1 that
records each request with the connection it came on and answers with scripted bytes, so
both ends are seen exactly, without an HTTP library normalising anything in between.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.config import SidecarConfig
from sidecar.store import MemoryStore
from tests.proxy.conftest import (
    TEST_TIMEOUT,
    RawResponse,
    connection,
    exchange,
    read_response,
    wait_until,
)
from tests.proxy.scripted_app import OK, AppConnection, Script, answering, scripted_app
from tests.proxy.test_errors import assert_problem, unanswered_listener, wait_until_metric
from tests.proxy.test_streaming import RssSampler
from tests.proxy.test_streaming import SidecarProcess as StreamingSidecar
from tests.support import RawExchange, RunningSidecar, free_port, run_sidecar, sidecar_config

# What the sidecar itself adds to every forwarded request (documented): the request id,
# X-Forwarded-*, and traceparent (a request without trace context starts a trace).
SIDECAR_ADDED = frozenset(
    {"x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "traceparent"}
)
KIB = 1024
MIB = 1024 * KIB


def config_for(app_url: str, upstream: str = "", rest: str = "") -> SidecarConfig:
    """A sidecar for `app_url`; `upstream` holds more `upstream:` keys, one `key: value` a
    line; `rest` is any other YAML (routes, defaults, state)."""
    keys = "".join(f"  {line}\n" for line in upstream.splitlines())
    return sidecar_config(app_url, keys + rest)


def request(method: str, target: str = "/", body: bytes | None = None) -> bytes:
    raw = f"{method} {target} HTTP/1.1\r\nHost: app\r\n".encode()
    if body is not None:
        raw += b"Content-Length: %d\r\n" % len(body)
    return raw + b"\r\n" + (body or b"")


def assert_failed(response: RawResponse, status: int, slug: str, *, head: bool = False) -> None:
    """The sidecar's problem answer; a HEAD response has the problem's headers, no body."""
    if head:
        assert response.status == status
        assert response.header("Content-Type") == ["application/problem+json"]
        assert len(response.header("X-Request-Id")) == 1
    else:
        assert_problem(response, status, slug)


def parsed_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) of each header line as bytes, the value without surrounding OWS."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out.append((name, value.strip(b" \t")))
    return out


async def never_answer(conn: AppConnection, exchange: RawExchange) -> None:
    """Answer nothing, ever; return only once the sidecar closes the connection."""
    await conn.reader.read()


# -- 1: the request arrives as the client sent it -------------------------------------------


async def test_a_target_ending_in_a_bare_question_mark_is_sent_as_is() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(OK)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/empty-query?"))
    assert response.status == 200
    assert [seen.request_line for seen in app.seen] == [b"GET /empty-query? HTTP/1.1"]


# Header lines as a client wrote them: names in mixed case (well-known ones in lower case,
# which an HTTP library would rewrite as `Accept`), odd spacing and a tab inside values,
# raw UTF-8 bytes, a list header repeated on separate lines around others.
CLIENT_FIELDS = [
    b"Host: App.Example:8080",
    b"x-MiXeD-Case: Value-With-CAPS",
    b"X-Repeat: one",
    b"X-Spacing: a  b\t c   d",
    b"X-Utf8: caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x9a\x80",
    b"X-Repeat: two,three , four",
    b"accept: text/html;q=0.9 , */*;q=0.1",
    b"user-agent: exotic-client/1.0 (raw)",
    b"X-Repeat: five",
    b"CACHE-control: no-cache",
    b'ETAG-ish: W/"xyz"',
]


async def _forwarded_fields() -> list[tuple[bytes, bytes]]:
    """The header fields of CLIENT_FIELDS as the app received them, the sidecar's own
    (documented) additions set apart, after checking those are all there is besides."""
    raw = b"GET /h HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in CLIENT_FIELDS) + b"\r\n"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(OK)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, raw)
    assert response.status == 200
    [seen] = app.seen
    fields = parsed_fields(seen.exchange.head)
    names = [name.decode("latin-1").lower() for name, _ in fields]
    added = [name for name in names if name in SIDECAR_ADDED]
    assert sorted(added) == sorted(SIDECAR_ADDED)  # each once
    return [(n, v) for n, v in fields if n.decode("latin-1").lower() not in SIDECAR_ADDED]


async def test_request_headers_reach_the_app_in_order_with_their_value_bytes() -> None:
    sent = parsed_fields(b"\r\n" + b"\r\n".join(CLIENT_FIELDS))
    received = await _forwarded_fields()
    # Every field, in order, repeats as separate lines, values byte for byte; no other.
    assert [(n.lower(), v) for n, v in received] == [(n.lower(), v) for n, v in sent]


async def test_request_header_names_keep_the_clients_spelling() -> None:
    sent = parsed_fields(b"\r\n" + b"\r\n".join(CLIENT_FIELDS))
    received = await _forwarded_fields()
    assert [n for n, _ in received] == [n for n, _ in sent]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "OPTIONS"])
async def test_a_bodiless_request_gets_no_invented_headers(method: str) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(OK)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request(method, "/bare"))
    assert response.status == 200
    [seen] = app.seen
    names = sorted(name.decode().lower() for name, _ in parsed_fields(seen.exchange.head))
    # No User-Agent, Accept, Accept-Encoding, Content-Type, nor `Content-Length: 0`.
    assert names == sorted({"host"} | SIDECAR_ADDED)
    assert seen.exchange.body == b""


# -- 2: no hidden retries -------------------------------------------------------------------

RESET_METHODS = ["GET", "DELETE", "OPTIONS", "PUT", "HEAD"]


def _method_request(method: str) -> bytes:
    return request(method, "/once", b"data" if method == "PUT" else None)


async def reset_it(conn: AppConnection, exchange: RawExchange) -> None:
    conn.reset()


@pytest.mark.parametrize("method", RESET_METHODS)
async def test_a_request_the_app_reads_then_resets_reaches_it_once(method: str) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(reset_it) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        head = method == "HEAD"
        response = await exchange(sc.port, _method_request(method), head_request=head)
        assert_failed(response, 502, "upstream-reset", head=head)
        await wait_until_metric(sc, "reset", 1)
    assert [seen.request_line for seen in app.seen] == [f"{method} /once HTTP/1.1".encode()]


@pytest.mark.parametrize("method", RESET_METHODS)
async def test_a_reset_on_a_reused_connection_is_not_retried(method: str) -> None:
    async def first_answered_then_reset(conn: AppConnection, exchange: RawExchange) -> None:
        if conn.index == 0 and conn.requests == 1:
            conn.send(OK)
            await conn.drain()
        else:
            conn.reset()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(first_answered_then_reset) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        assert (await exchange(sc.port, request("GET", "/first"))).status == 200
        head = method == "HEAD"
        response = await exchange(sc.port, _method_request(method), head_request=head)
        assert_failed(response, 502, "upstream-reset", head=head)
        await wait_until_metric(sc, "reset", 1)
    lines = [seen.request_line for seen in app.seen]
    assert lines == [b"GET /first HTTP/1.1", f"{method} /once HTTP/1.1".encode()]
    # It was sent on the pooled connection (the case a client is tempted to retry).
    assert [seen.connection for seen in app.seen] == [0, 0]


# -- 3: a pooled connection the app closed while idle ---------------------------------------


async def test_a_pooled_connection_the_app_closed_while_idle_is_replaced() -> None:
    close_idle = asyncio.Event()

    async def answer_then_close_when_told(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(OK)
        await conn.drain()
        if conn.index == 0:
            await close_idle.wait()
            conn.finish_writing()  # FIN; `ended` is set once the sidecar closes its side

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answer_then_close_when_told) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        assert (await exchange(sc.port, request("GET", "/first"))).status == 200
        close_idle.set()
        # The sidecar has seen the close once it closes its end; one turn to settle.
        await app.connections[0].ended.wait()
        await asyncio.sleep(0)
        response = await exchange(sc.port, request("POST", "/after-close", b"once only"))
    assert response.status == 200
    assert [seen.request_line for seen in app.seen] == [
        b"GET /first HTTP/1.1",
        b"POST /after-close HTTP/1.1",
    ]
    assert [seen.connection for seen in app.seen] == [0, 1]
    assert app.seen[1].exchange.body == b"once only"


# -- 4: a bounded pool ----------------------------------------------------------------------

POOL_OF_ONE = "max_connections: 1\npool_timeout: 200ms"


def _held_until(release: asyncio.Event) -> Script:
    async def script(conn: AppConnection, exchange: RawExchange) -> None:
        if exchange.request_line.startswith(b"GET /held "):
            await release.wait()
        conn.send(OK)
        await conn.drain()

    return script


async def test_a_full_pool_answers_503_after_the_pool_timeout() -> None:
    release = asyncio.Event()
    defaults = "defaults:\n  timeout: 5s\n"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(_held_until(release)) as app,
        run_sidecar(config_for(app.url, POOL_OF_ONE, defaults)) as sc,
    ):
        try:
            held = asyncio.create_task(exchange(sc.port, request("GET", "/held")))
            await app.wait_requests(1)  # the only connection is taken
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await exchange(sc.port, request("GET", "/second"))
            elapsed = loop.time() - started
            assert_problem(response, 503, "upstream-pool-exhausted")
            # About the pool timeout (200 ms), long before the route's 5 s timeout.
            assert 0.18 <= elapsed < 2.0, elapsed
            await wait_until_metric(sc, "pool", 1)
            release.set()
            assert (await held).status == 200
        finally:
            release.set()
    assert [seen.request_line for seen in app.seen] == [b"GET /held HTTP/1.1"]


def _idempotent() -> str:
    return (
        'state:\n  url: "memory://"\n'
        "routes:\n  - name: orders\n    match: {path_prefix: /}\n    timeout: 5s\n"
        "    idempotency: {}\n"
    )


def _keyed_post(key: str) -> bytes:
    body = b'{"amount": 10}'
    return (
        f"POST /orders HTTP/1.1\r\nHost: app\r\nIdempotency-Key: {key}\r\n"
        "X-Org-Id: acme\r\nX-User-Id: bob\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _claims(sc: RunningSidecar) -> list[str]:
    store = sc.sidecar.store
    assert isinstance(store, MemoryStore)
    return [key for key in store.keyspace.live_keys() if key.startswith("sidecar:idem:")]


async def test_pool_exhaustion_releases_the_idempotency_claim_at_once() -> None:
    release = asyncio.Event()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(_held_until(release)) as app,
        run_sidecar(config_for(app.url, POOL_OF_ONE, _idempotent())) as sc,
    ):
        try:
            held = asyncio.create_task(exchange(sc.port, request("GET", "/held")))
            await app.wait_requests(1)
            refused = await exchange(sc.port, _keyed_post("k-pool"))
            assert_problem(refused, 503, "upstream-pool-exhausted")
            # Nothing was sent: the claim goes at once (not after its 30 s lease).
            await wait_until(lambda: _claims(sc) == [], timeout=1.0)
            release.set()
            assert (await held).status == 200
            retry = await exchange(sc.port, _keyed_post("k-pool"))
        finally:
            release.set()
    assert retry.status == 200, retry.body
    assert retry.header("Idempotent-Replayed") == ["false"]
    assert [seen.request_line for seen in app.seen] == [
        b"GET /held HTTP/1.1",
        b"POST /orders HTTP/1.1",
    ]


# -- 5: keep-alive reuse, and only when safe ------------------------------------------------


async def test_sequential_requests_share_one_upstream_connection() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(OK)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        for target in ("/one", "/two", "/three"):
            assert (await exchange(sc.port, request("GET", target))).status == 200
    assert [seen.connection for seen in app.seen] == [0, 0, 0]
    assert len(app.connections) == 1


async def test_a_connection_is_not_reused_after_the_client_left_mid_body() -> None:
    size = 16 * MIB
    block = bytes(64 * KIB)

    async def big_or_small(conn: AppConnection, exchange: RawExchange) -> None:
        if exchange.request_line.startswith(b"GET /big "):
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                conn.send(block)
                await conn.drain()
        else:
            conn.send(OK)
            await conn.drain()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(big_or_small) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        async with connection(sc.port) as (reader, writer):
            writer.write(request("GET", "/big"))
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(256 * KIB)
        # The client left with most of the body unread: that connection is closed, not
        # pooled with the rest of a body still on its way.
        await app.connections[0].ended.wait()
        response = await exchange(sc.port, request("GET", "/after"))
    assert response.body == b"ok"
    assert [seen.connection for seen in app.seen] == [0, 1]


async def test_a_connection_is_not_reused_after_a_badly_framed_error_response() -> None:
    async def bad_then_ok(conn: AppConnection, exchange: RawExchange) -> None:
        if len(app.seen) == 1:
            conn.send(
                b"HTTP/1.1 500 Internal Server Error\r\n"
                b"Content-Length: 5\r\nContent-Length: 7\r\n\r\nerror"
            )
        else:
            conn.send(OK)
        await conn.drain()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(bad_then_ok) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        assert_problem(
            await exchange(sc.port, request("GET", "/bad")), 502, "upstream-bad-response"
        )
        response = await exchange(sc.port, request("GET", "/after"))
        assert response.body == b"ok"
        assert [seen.connection for seen in app.seen] == [0, 1]
        await app.connections[0].ended.wait()  # and the bad one was closed


# -- 6: framing -----------------------------------------------------------------------------


async def test_a_content_length_response_keeps_its_length() -> None:
    body = bytes(range(256)) * 400
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(head + body)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/cl"))
    assert response.header("Content-Length") == [str(len(body))]
    assert response.header("Transfer-Encoding") == []
    assert response.raw_body == body


async def test_a_chunked_response_reaches_the_client_chunked() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nalpha-\r\n5\r\nbeta-\r\n5\r\ngamma\r\n0\r\n\r\n"
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(chunked)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/chunked"))
    assert response.header("Transfer-Encoding") == ["chunked"]
    assert response.header("Content-Length") == []
    assert response.body == b"alpha-beta-gamma"


BODILESS = {
    # HEAD: the Content-Length is the GET's; no body follows it.
    "HEAD": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\nX-Kind: 204\r\n\r\n",
    # A 304 may carry the representation's Content-Length (RFC 9110 §8.6): still no body.
    "304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
}
AFTER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("case", list(BODILESS))
async def test_a_bodiless_response_leaves_the_connection_ready_for_the_next(case: str) -> None:
    async def bodiless_then_hello(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(BODILESS[case] if conn.requests == 1 else AFTER)
        await conn.drain()

    first = request("HEAD", "/doc") if case == "HEAD" else request("GET", f"/{case}")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(bodiless_then_hello) as app,
        run_sidecar(config_for(app.url)) as sc,
        connection(sc.port) as (reader, writer),
    ):
        writer.write(first)
        response = await read_response(reader, head_request=case == "HEAD")
        writer.write(request("GET", "/after"))
        after = await read_response(reader)
    assert response.status == (200 if case == "HEAD" else int(case))
    # Had the sidecar waited for 1234 body bytes, the next response would be read as them.
    assert after.status_line == b"HTTP/1.1 200 OK"
    assert after.body == b"hello"
    assert [seen.connection for seen in app.seen] == [0, 0]


CONFLICTING = {
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
}


@pytest.mark.parametrize("case", list(CONFLICTING))
async def test_conflicting_response_framing_is_502_bad_response(case: str) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(CONFLICTING[case])) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/framing"))
        assert_problem(response, 502, "upstream-bad-response")
        await wait_until_metric(sc, "bad_response", 1)


async def test_a_close_delimited_response_is_relayed_whole() -> None:
    body = bytes(range(256)) * 512  # 128 KiB, more than arrives in one read

    async def close_delimited(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body)
        await conn.drain()
        conn.close()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(close_delimited) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/until-close"))
    assert response.status == 200
    assert response.body == body


async def test_trailers_are_dropped_and_the_connection_stays_usable() -> None:
    with_trailer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n"
    )

    async def trailer_then_ok(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(with_trailer if conn.requests == 1 else OK)
        await conn.drain()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(trailer_then_ok) as app,
        run_sidecar(config_for(app.url)) as sc,
        connection(sc.port) as (reader, writer),
    ):
        writer.write(request("GET", "/trailer"))
        first = await read_response(reader)
        writer.write(request("GET", "/after"))
        after = await read_response(reader)
    assert first.body == b"hello"
    assert b"X-Checksum" not in first.raw_body and b"abc123" not in first.raw_body
    assert "x-checksum" not in first.header_names()
    assert after.body == b"ok"
    assert [seen.connection for seen in app.seen] == [0, 0]


# -- 7: 1xx interim responses ---------------------------------------------------------------

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"


async def test_a_100_continue_from_the_app_is_not_relayed() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(answer)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("POST", "/up", b"payload"))
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert response.body == b"ok"
    assert app.seen[0].exchange.body == b"payload"


async def test_103_early_hints_reach_an_http11_client_then_the_final_response() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(EARLY_HINTS + OK)) as app,
        run_sidecar(config_for(app.url)) as sc,
        connection(sc.port) as (reader, writer),
    ):
        writer.write(request("GET", "/page"))
        hints = await read_response(reader)
        assert hints.status == 103
        final = await read_response(reader)
    assert hints.header("Link") == ["</style.css>; rel=preload; as=style"]
    assert final.status == 200
    assert final.body == b"ok"
    assert len(app.seen) == 1


async def test_103_early_hints_are_relayed_before_the_final_response_exists() -> None:
    hints_read = asyncio.Event()

    async def hints_then_wait(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(EARLY_HINTS)
        await conn.drain()
        await hints_read.wait()  # the final response comes only once the client has the 103
        conn.send(OK)
        await conn.drain()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(hints_then_wait) as app,
        run_sidecar(config_for(app.url)) as sc,
        connection(sc.port) as (reader, writer),
    ):
        try:
            writer.write(request("GET", "/page"))
            async with asyncio.timeout(2):
                hints = await read_response(reader)
            assert hints.status == 103
            hints_read.set()
            final = await read_response(reader)
        finally:
            hints_read.set()
    assert final.status == 200
    assert final.body == b"ok"


async def test_103_early_hints_are_not_sent_to_an_http10_client() -> None:
    # RFC 9110 §15.2: HTTP/1.0 defines no 1xx, so none may be sent to an HTTP/1.0 client.
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(EARLY_HINTS + OK)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, b"GET /page HTTP/1.0\r\nHost: app\r\n\r\n")
    assert response.status == 200
    assert response.body == b"ok"


async def test_a_101_to_a_request_that_asked_no_upgrade_is_502_bad_response() -> None:
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(answering(switching)) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/plain"))
        assert_problem(response, 502, "upstream-bad-response")
        await wait_until_metric(sc, "bad_response", 1)


# -- 8: the response head is bounded as a whole -----------------------------------------------


def head_of_size(total: int, pad_name: bytes = b"X-Pad") -> bytes:
    """A 200 response whose head (status line to the blank line included) is `total` bytes,
    then a 2-byte body."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    frame = pad_name + b": \r\n\r\n"
    return start + pad_name + b": " + b"p" * (total - len(start) - len(frame)) + b"\r\n\r\nok"


async def _relay(answer: bytes, upstream: str = "") -> RawResponse:
    async with (
        scripted_app(answering(answer)) as app,
        run_sidecar(config_for(app.url, upstream)) as sc,
    ):
        response = await exchange(sc.port, request("GET", "/head"))
        if response.status == 502:
            await wait_until_metric(sc, "bad_response", 1)
    return response


async def test_a_response_head_over_max_response_header_size_is_502() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        response = await _relay(head_of_size(6 * KIB), "max_response_header_size: 4KiB")
    assert_problem(response, 502, "upstream-bad-response")


async def test_a_response_head_just_under_max_response_header_size_passes() -> None:
    answer = head_of_size(4 * KIB - 64)
    async with asyncio.timeout(TEST_TIMEOUT):
        response = await _relay(answer, "max_response_header_size: 4KiB")
    assert response.status == 200
    assert response.header("X-Pad") == ["p" * (answer.index(b"\r\n\r\n") - answer.index(b"p"))]
    assert response.body == b"ok"


async def test_a_20kib_header_field_passes_with_the_default_limit() -> None:
    value = "v" * (20 * KIB)
    answer = b"HTTP/1.1 200 OK\r\nX-Large: %s\r\nContent-Length: 2\r\n\r\nok" % value.encode()
    async with asyncio.timeout(TEST_TIMEOUT):
        response = await _relay(answer)
    assert response.status == 200, response.body
    assert response.header("X-Large") == [value]


async def test_a_response_head_over_the_default_64kib_is_502() -> None:
    fields = b"".join(b"X-Part-%d: %s\r\n" % (i, b"w" * (24 * KIB)) for i in range(3))
    answer = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"
    async with asyncio.timeout(TEST_TIMEOUT):
        response = await _relay(answer)
    assert_problem(response, 502, "upstream-bad-response")


async def test_200_response_header_fields_pass_in_order() -> None:
    fields = [(f"X-Field-{i:03d}", f"value-{i}") for i in range(200)]
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)
    answer = b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\nok"
    async with asyncio.timeout(TEST_TIMEOUT):
        response = await _relay(answer)
    assert response.status == 200, response.body
    assert [(k, v) for k, v in response.headers if k.startswith("X-Field-")] == fields


# -- 9: failure kinds -----------------------------------------------------------------------


async def test_a_refused_connect_is_502_kind_connect() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_sidecar(config_for(f"http://127.0.0.1:{free_port()}")) as sc,
    ):
        assert_problem(await exchange(sc.port, request("GET")), 502, "upstream-connect-failed")
        await wait_until_metric(sc, "connect", 1)


async def test_a_connect_that_hangs_is_502_kind_connect_timeout() -> None:
    # A listener with a full accept queue: Linux drops further SYNs, so the connect hangs.
    with unanswered_listener() as port:
        config = config_for(f"http://127.0.0.1:{port}", "connect_timeout: 200ms")
        async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await exchange(sc.port, request("GET"))
            elapsed = loop.time() - started
            assert_problem(response, 502, "upstream-connect-failed")
            assert 0.18 <= elapsed < 2.0, elapsed
            await wait_until_metric(sc, "connect_timeout", 1)


async def test_an_app_that_never_answers_is_504_kind_timeout() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(never_answer) as app,
        run_sidecar(config_for(app.url, rest="defaults:\n  timeout: 200ms\n")) as sc,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await exchange(sc.port, request("GET", "/silent"))
        elapsed = loop.time() - started
        assert_problem(response, 504, "upstream-timeout")
        assert 0.18 <= elapsed < 2.0, elapsed
        await wait_until_metric(sc, "timeout", 1)
        # The request is abandoned: its upstream connection is closed.
        await app.connections[0].ended.wait()
    assert len(app.seen) == 1


async def test_a_malformed_status_line_is_502_kind_bad_response() -> None:
    async def malformed_then_close(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(b"HTTP/1.1 abc\r\n")
        await conn.drain()
        conn.close()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(malformed_then_close) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        assert_problem(await exchange(sc.port, request("GET")), 502, "upstream-bad-response")
        await wait_until_metric(sc, "bad_response", 1)
    assert len(app.seen) == 1


async def test_a_close_before_any_response_byte_is_502_kind_reset() -> None:
    async def close_it(conn: AppConnection, exchange: RawExchange) -> None:
        conn.close()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(close_it) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        assert_problem(await exchange(sc.port, request("GET")), 502, "upstream-reset")
        await wait_until_metric(sc, "reset", 1)
    assert len(app.seen) == 1


async def test_a_body_cut_short_reaches_the_client_truncated_kind_stream() -> None:
    async def ten_of_1000(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
        await conn.drain()
        conn.close()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(ten_of_1000) as app,
        run_sidecar(config_for(app.url)) as sc,
    ):
        async with connection(sc.port) as (reader, writer):
            writer.write(request("GET", "/short"))
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read()  # returns only once the sidecar closes
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nContent-Length: 1000\r\n" in head
        assert rest == b"0123456789"  # short of 1000, and the connection was closed
        await wait_until_metric(sc, "stream", 1)


def _reset_or_malformed(kind: str) -> Script:
    async def script(conn: AppConnection, exchange: RawExchange) -> None:
        if kind == "reset":
            conn.reset()
        else:
            conn.send(b"HTTP/1.1 abc\r\n\r\n")
            await conn.drain()
            conn.close()

    return script


@pytest.mark.parametrize("kind", ["reset", "bad_response"])
async def test_a_failure_after_sending_keeps_the_idempotency_claim(kind: str) -> None:
    # The app read the request and may have acted on it: a retry with the same key must
    # not run it again (409 while the claim's lease lasts), unlike the pool case above.
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_app(_reset_or_malformed(kind)) as app,
        run_sidecar(config_for(app.url, rest=_idempotent())) as sc,
    ):
        first = await exchange(sc.port, _keyed_post("k-sent"))
        slug = "upstream-reset" if kind == "reset" else "upstream-bad-response"
        assert_problem(first, 502, slug)
        await wait_until_metric(sc, kind, 1, route="orders")
        retry = await exchange(sc.port, _keyed_post("k-sent"))
        assert_problem(retry, 409, "idempotency-in-progress")
    assert len(app.seen) == 1


# -- 10: backpressure -----------------------------------------------------------------------


async def test_a_64mib_response_to_a_client_that_stops_reading_is_not_buffered(
    tmp_path: Path,
) -> None:
    total = 64 * MIB
    block = bytes(256 * KIB)
    progress = {"sent": 0}

    async def stream(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            conn.send(block)
            await conn.drain()
            progress["sent"] += len(block)

    async def sending_settles() -> int:
        """How far the app got once it could send no more (unchanged for 200 ms)."""
        last, still = -1, 0
        while still < 10:
            # Polling for quiescence: there is no event for "the app is blocked".
            await asyncio.sleep(0.02)
            still = still + 1 if progress["sent"] == last else 0
            last = progress["sent"]
        return last

    async with (
        asyncio.timeout(30),
        scripted_app(stream) as app,
        StreamingSidecar(tmp_path, app.url) as sidecar,
    ):
        assert sidecar.process is not None
        async with (
            RssSampler(sidecar.process.pid) as sampler,
            connection(sidecar.port) as (reader, writer),
        ):
            writer.write(request("GET", "/download"))
            head = await reader.readuntil(b"\r\n\r\n")
            received = len(await reader.readexactly(MIB))
            # The client stops reading: the app must be held back, not drained into
            # the sidecar's memory.
            stalled_at = await sending_settles()
            stalled_growth = sampler.growth
            while chunk := await reader.read(MIB):
                received += len(chunk)
                if received >= total:
                    break
    assert b"\r\nContent-Length: %d\r\n" % total in head
    assert received == total
    assert stalled_at < total - 16 * MIB, (
        f"the app sent {stalled_at} bytes to a client that read 1 MiB"
    )
    assert stalled_growth <= 16 * MIB, f"RSS grew by {stalled_growth} bytes"
    assert sampler.growth <= 16 * MIB, f"RSS grew by {sampler.growth} bytes"
