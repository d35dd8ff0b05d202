"""What the first response and its replays look like, which statuses are kept, responses
too large or endless to keep, request bodies too large to fingerprint, and expiry."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import pytest

from tests.idempotency.conftest import (
    BODY,
    OLD_DATE,
    TEST_TIMEOUT,
    EnvFactory,
    big_body,
    eventually,
    sse_body,
)
from tests.proxy.conftest import exchange, read_response

ALLOWED = (
    "Content-Type",
    "Location",
    "ETag",
    "Cache-Control",
    "Link",
    "Content-Language",
    "Last-Modified",
)
NEVER_REPLAYED = ("Set-Cookie", "WWW-Authenticate", "X-App-Only", "Server")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def http_date_seconds(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


def raw_post(key: str, extra: tuple[bytes, ...] = ()) -> bytes:
    head = [
        b"POST /orders HTTP/1.1",
        b"Host: sidecar.test",
        b"X-Org-Id: acme",
        b"X-User-Id: bob",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(BODY),
        b"Idempotency-Key: " + key.encode(),
        *extra,
        b"Connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + BODY


# --- the first response and the replay ------------------------------------------------------


async def test_first_response_says_not_replayed_and_only_replays_say_when_it_expires(
    make_env: EnvFactory,
) -> None:
    """Idempotency-Expires is the store's word: the first answer leaves before its record
    is stored, so it has none; a replay's comes from the record (store clock + ttl)."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{ttl: 1h}")
        before = time.time()
        first = await env.send(key="first")
        assert first.status == 201
        assert first.replayed == "false"
        assert "Idempotency-Expires" not in first.headers
        # The app's own response, untouched otherwise.
        assert first.headers["Set-Cookie"] == "session=s1; HttpOnly"
        assert first.headers["Date"] == OLD_DATE
        assert await env.records.settled() == [b"c"]
        after = time.time()
        replay = await env.send(key="first")
        assert replay.replayed == "true"
        expires = http_date_seconds(replay.headers["Idempotency-Expires"])
        # An HTTP-date has whole seconds: allow one either side.
        assert before + 3600 - 1 <= expires <= after + 3600 + 1
        [record] = (await env.records.all()).values()
        assert int(record["e"]) // 1000 == int(expires)


async def test_replay_is_the_stored_response_with_fresh_per_exchange_headers(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{ttl: 1h}")
        first = await exchange(env.sidecar.port, raw_post("replay-me"))
        assert first.status == 201
        assert first.header("Set-Cookie") == ["session=s1; HttpOnly"]
        assert await env.records.settled() == [b"c"]
        replay = await exchange(
            env.sidecar.port,
            raw_post(
                "replay-me",
                (
                    f"traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01".encode(),
                    b"X-Request-Id: replay-request-1",
                ),
            ),
        )
        assert replay.status_line == first.status_line == b"HTTP/1.1 201 Created"
        for name in ALLOWED:
            assert replay.header(name) == first.header(name), name
            assert replay.header(name), name
        assert len(replay.header("Link")) == 2
        assert replay.body == first.body
        assert replay.header("Content-Length") == [str(len(first.body))]
        assert replay.header("Transfer-Encoding") == []
        assert first.header("Idempotent-Replayed") == ["false"]
        assert replay.header("Idempotent-Replayed") == ["true"]
        assert first.header("Idempotency-Expires") == []
        [expires] = replay.header("Idempotency-Expires")
        assert abs(http_date_seconds(expires) - (time.time() + 3600)) < 5
        # Per-exchange headers belong to this exchange, never to the stored one.
        [date] = replay.header("Date")
        assert abs(http_date_seconds(date) - time.time()) < 5
        assert replay.header("X-Trace-Id") == [TRACE_ID]
        assert replay.header("X-Request-Id") == ["replay-request-1"]
        for name in NEVER_REPLAYED:
            assert replay.header(name) == [], name
        assert env.upstream.executions == 1


# Stored: what the app did is known (2xx, 3xx, most 4xx), or unknown but it may have
# acted (500, 502, 504 from the app: replayed as Stripe does, not run again).
STORED = [201, 200, 202, 303, 400, 404, 422, 500, 502, 504]
# Released: not processed (408, 425, 429, 503) or refused in a way a retry may pass
# (401, 403, 407, 409, 412).
RELEASED = [408, 425, 429, 503, 401, 403, 407, 409, 412]


@pytest.mark.parametrize("status", STORED)
async def test_2xx_and_4xx_responses_are_stored_and_replayed(
    make_env: EnvFactory, status: int
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send(f"/status/{status}", key="s")
        assert (first.status, first.replayed, first.n) == (status, "false", 1)
        assert await env.records.settled() == [b"c"]
        again = await env.send(f"/status/{status}", key="s")
        assert (again.status, again.replayed) == (status, "true")
        assert again.body == first.body
        assert env.upstream.executions == 1


async def test_a_compressed_body_is_kept_and_replayed_as_the_app_sent_it(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        request = raw_post("gz").replace(b"POST /orders", b"POST /gzip")
        first = await exchange(env.sidecar.port, request)
        assert await env.records.settled() == [b"c"]
        replay = await exchange(env.sidecar.port, request)
        assert replay.header("Idempotent-Replayed") == ["true"]
        assert replay.header("Content-Encoding") == first.header("Content-Encoding") == ["gzip"]
        assert replay.body == first.body
        assert gzip.decompress(replay.body) == b'{"compressed": true}' * 20
        assert env.upstream.executions == 1


async def test_204_is_stored_and_replayed_without_a_body(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send("/status/204", key="s")
        assert (first.status, first.replayed, first.body) == (204, "false", b"")
        assert await env.records.settled() == [b"c"]
        replay = await exchange(env.sidecar.port, raw_post("s").replace(b"/orders", b"/status/204"))
        assert replay.status == 204
        assert replay.header("Idempotent-Replayed") == ["true"]
        assert replay.header("Location") == ["/orders/1"]
        assert replay.header("Transfer-Encoding") == []
        assert replay.header("Content-Length") == []  # never on a 204 (RFC 9110 §8.6)
        assert env.upstream.executions == 1


@pytest.mark.parametrize("status", RELEASED)
async def test_not_processed_and_refused_responses_release_the_key(
    make_env: EnvFactory, status: int
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send(f"/status/{status}", key="s")
        assert (first.status, first.n) == (status, 1)
        assert "Idempotency-Expires" not in first.headers
        assert await env.records.settled() == []
        retry = await env.send(f"/status/{status}", key="s")
        assert (retry.status, retry.n) == (status, 2)
        assert retry.replayed != "true"
        assert env.upstream.executions == 2


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_other_5xx_is_released_with_cache_5xx_off(make_env: EnvFactory, status: int) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{cache_5xx: false}")
        first = await env.send(f"/status/{status}", key="s")
        assert (first.status, first.n) == (status, 1)
        assert await env.records.settled() == []
        again = await env.send(f"/status/{status}", key="s")
        assert (again.status, again.n) == (status, 2)
        assert env.upstream.executions == 2


async def test_release_statuses_are_configurable(make_env: EnvFactory) -> None:
    """Listing 500 releases it; a status left out of the list (429 here) is then stored."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{release_statuses: [500]}")
        for status in (500, 429):
            await env.send(f"/status/{status}", key=f"s{status}")
        assert await env.records.settled() == [b"c"]
        assert (await env.send("/status/500", key="s500")).replayed != "true"
        assert (await env.send("/status/429", key="s429")).replayed == "true"
        assert env.upstream.executions == 3


# --- responses that cannot be kept ----------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/big-stream", id="chunked"),
        pytest.param("/big", id="content-length"),
    ],
)
async def test_response_over_max_response_body_runs_once_and_is_not_replayable(
    make_env: EnvFactory, path: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{max_response_body: 1KiB}")
        first = await env.send(path, key="big")
        assert (first.status, first.replayed) == (201, "false")
        assert first.body == big_body()
        assert await env.records.settled() == [b"n"]
        refused_before = await env.outcome("not_replayable")
        retry = await env.send(path, key="big")
        assert retry.status == 409
        assert retry.problem == "idempotency-not-replayable"
        assert await env.outcome("not_replayable") == refused_before + 1
        assert env.upstream.executions == 1


async def test_response_at_max_response_body_is_replayed(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(f"{{max_response_body: {len(big_body())}}}")
        request = raw_post("fits").replace(b"POST /orders", b"POST /big-stream")
        first = await exchange(env.sidecar.port, request)
        assert first.header("Idempotent-Replayed") == ["false"]
        # Read whole to be kept, so relayed with a Content-Length although the app chunked it.
        assert first.header("Content-Length") == [str(len(big_body()))]
        assert first.header("Transfer-Encoding") == []
        assert first.body == big_body()
        assert await env.records.settled() == [b"c"]
        again = await env.send("/big-stream", key="fits")
        assert (again.status, again.replayed, again.body) == (201, "true", big_body())
        assert env.upstream.executions == 1


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/sse", id="streamed"),
        pytest.param("/sse-whole", id="content-length"),
    ],
)
async def test_event_stream_runs_once_and_is_not_replayable(
    make_env: EnvFactory, path: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send(path, key="events")
        assert first.status == 200
        assert first.headers["Content-Type"].startswith("text/event-stream")
        assert first.body == sse_body(1)
        assert await env.records.settled() == [b"n"]
        retry = await env.send(path, key="events")
        assert retry.status == 409
        assert retry.problem == "idempotency-not-replayable"
        assert env.upstream.executions == 1


# --- request bodies too large to fingerprint ------------------------------------------------


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 256):
        yield data[start : start + 256]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_request_body_over_max_request_body_is_413_and_never_runs(
    make_env: EnvFactory, framing: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{max_request_body: 1KiB}")
        body = b"x" * 2048
        data = body if framing == "content-length" else _chunks(body)
        headers = {"Idempotency-Key": "large", "X-Org-Id": "acme", "X-User-Id": "bob"}
        async with env.session.post(env.url + "/orders", data=data, headers=headers) as resp:
            assert resp.status == 413
            problem = await resp.json(content_type=None)
        assert problem["type"] == "urn:sidecar:problem:body-too-large"
        assert env.upstream.executions == 0
        assert await env.records.all() == {}
        fits = await env.send(key="fits", body=b"y" * 1024)
        assert fits.status == 201
        assert env.upstream.executions == 1


async def test_route_max_body_still_applies_to_a_protected_chunked_body(
    make_env: EnvFactory,
) -> None:
    """Buffering for the fingerprint (max_request_body 1 MiB) must not lift the route's own
    smaller limit on bodies whose size is only known as they arrive."""
    routes = (
        "  - name: orders\n    match: {path_prefix: /}\n    max_body: 1KiB\n"
        "    idempotency: {max_request_body: 1MiB}\n"
    )
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(routes=routes)
        headers = {"Idempotency-Key": "large", "X-Org-Id": "acme", "X-User-Id": "bob"}
        data = _chunks(b"x" * 2048)
        async with env.session.post(env.url + "/orders", data=data, headers=headers) as resp:
            assert resp.status == 413
        assert env.upstream.executions == 0
        assert await env.records.all() == {}


async def test_expect_100_continue_is_answered_before_the_body_is_buffered(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        reader, writer = await asyncio.open_connection("127.0.0.1", env.sidecar.port)
        try:
            head = raw_post("continue").split(b"\r\n\r\n", 1)[0]
            writer.write(head + b"\r\nExpect: 100-continue\r\n\r\n")
            await writer.drain()
            # The client sends its body only once told to.
            interim = await read_response(reader)
            assert interim.status == 100
            writer.write(BODY)
            await writer.drain()
            final = await read_response(reader)
            assert final.status == 201
            assert final.header("Idempotent-Replayed") == ["false"]
        finally:
            writer.close()
        assert env.upstream.executions == 1
        assert env.upstream.calls[0].body == BODY


# --- expiry ---------------------------------------------------------------------------------


async def test_after_the_ttl_the_same_key_runs_again(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{ttl: 1s, lease: 1s}")
        first = await env.send(key="ttl")
        stored_at = time.monotonic()
        assert first.n == 1
        [key] = (await env.records.all()).keys()
        assert 0 < await env.records.pttl(key) <= 1000
        replies = []

        async def ran_again() -> bool:
            replies.append(await env.send(key="ttl"))
            return replies[-1].replayed == "false"

        await eventually(ran_again, "the record to expire", interval=0.05)
        assert time.monotonic() - stored_at >= 0.9
        assert replies[-1].n == 2
        # Until then, every retry was a replay of the first response.
        assert all(r.replayed == "true" and r.body == first.body for r in replies[:-1])
        assert env.upstream.executions == 2
