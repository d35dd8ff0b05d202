"""Log lines about a request carry its trace fields and request id (so they correlate by
trace id); identity headers are logged as keyed hashes unless `logging.ids: clear`; client
header values are made printable before they reach a line."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import orjson
import pytest

from tests.proxy.conftest import wait_until
from tests.support import RawUpstream, free_port, run_sidecar
from tests.tracing.conftest import (
    PARENT_ID,
    TEST_TIMEOUT,
    TRACE_ID,
    TRACEPARENT,
    access_record,
    assert_span_id,
    assert_trace_id,
    one,
    records_of,
    send,
    tracing_config,
    upstream_traceparent,
)

HASH_KEY = "k3y-for-the-tracing-tests"


def hashed(value: bytes, key: str = HASH_KEY) -> str:
    return hmac.new(key.encode(), value, hashlib.sha256).hexdigest()[:16]


def assert_trace_fields(record: dict[str, object], trace_id: str, request_id: str) -> None:
    assert record["trace_id"] == trace_id
    assert_span_id(str(record["span_id"]))
    assert record["trace_flags"] in ("00", "01")
    assert record["request_id"] == request_id


# --- trace fields -------------------------------------------------------------------------------


async def test_access_line_carries_the_trace_fields(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        response = await send(sc.port, headers=[("traceparent", TRACEPARENT)])
        request_id = one(response.header("X-Request-Id"))
        record = await access_record(sc, request_id)
        assert_trace_fields(record, TRACE_ID, request_id)
        assert (record["span_id"], record["trace_flags"]) == (PARENT_ID, "01")

        response = await send(sc.port)
        request_id = one(response.header("X-Request-Id"))
        trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
        record = await access_record(sc, request_id)
        assert_trace_fields(record, trace_id, request_id)
        # No export: span_id is the parent the app was told about.
        assert record["span_id"] == upstream_traceparent(upstream.exchanges[-1])[1]


async def test_upstream_error_event_and_access_line_share_the_trace() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(closed)) as sc:
        response = await send(sc.port, headers=[("X-Request-Id", "rid-502")])
        assert response.status == 502
        trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
        assert one(response.header("X-Request-Id")) == "rid-502"
        access = await access_record(sc, "rid-502")
        (event,) = [r for r in records_of(sc, "rid-502") if r.get("event") == "upstream.error"]
        assert event["kind"] == "connect"
        for record in (access, event):
            assert_trace_fields(record, trace_id, "rid-502")
        assert event["span_id"] == access["span_id"]
        assert event["trace_flags"] == access["trace_flags"] == "01"
        # Everything about this request is found by its trace id.
        by_trace = [r for r in sc.log.records if r.get("trace_id") == trace_id]
        assert {str(r["event"]) for r in by_trace} == {"access", "upstream.error"}


@pytest.mark.parametrize(
    ("path", "status"), [("/nowhere", 404), ("ftp://elsewhere/", 400)], ids=["404", "400"]
)
async def test_unrouted_requests_are_logged_with_trace_fields(
    upstream: RawUpstream, path: str, status: int
) -> None:
    routes = "routes:\n  - name: app\n    match: {path_prefix: /app}\n"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_sidecar(tracing_config(upstream.url, routes)) as sc,
    ):
        response = await send(sc.port, path, headers=[("traceparent", TRACEPARENT)])
        assert response.status == status
        request_id = one(response.header("X-Request-Id"))
        assert one(response.header("X-Trace-Id")) == TRACE_ID
        assert_trace_fields(await access_record(sc, request_id), TRACE_ID, request_id)


async def test_every_request_line_matches_its_response(upstream: RawUpstream) -> None:
    """Twenty requests, mixed: each line's trace id is the one its response carried."""
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        expected: dict[str, str] = {}
        for index in range(20):
            headers = [("traceparent", TRACEPARENT.replace(TRACE_ID, f"{index + 1:032x}"))]
            response = await send(sc.port, headers=headers if index % 2 else [])
            expected[one(response.header("X-Request-Id"))] = one(response.header("X-Trace-Id"))
        await wait_until(lambda: all(records_of(sc, rid) for rid in expected), timeout=3.0)
        lines = [r for r in sc.log.records if r.get("event") == "access"]
        assert len(lines) == 20
        for line in lines:
            assert line["trace_id"] == expected[str(line["request_id"])]


# --- identity ids -------------------------------------------------------------------------------

IDENTITY = [("X-Org-Id", "org-4711"), ("X-User-Id", "alice@example.com")]


async def test_identity_ids_are_logged_as_keyed_hashes(upstream: RawUpstream) -> None:
    yaml = f"logging:\n  id_hash_key: {HASH_KEY}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        first = await send(sc.port, headers=IDENTITY)
        second = await send(sc.port, headers=IDENTITY)
        lines = [
            await access_record(sc, one(response.header("X-Request-Id")))
            for response in (first, second)
        ]
        for line in lines:
            assert line["org"] == hashed(b"org-4711")
            assert line["user"] == hashed(b"alice@example.com")
            serialised = orjson.dumps(line)
            assert b"org-4711" not in serialised
            assert b"alice" not in serialised
        # The ids still reach the app.
        assert upstream.exchanges[0].header("X-Org-Id") == ["org-4711"]


async def test_identity_ids_without_a_key_are_still_hashed(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url)) as sc:
        first = await send(sc.port, headers=IDENTITY)
        second = await send(sc.port, headers=IDENTITY)
        one_line = await access_record(sc, one(first.header("X-Request-Id")))
        other = await access_record(sc, one(second.header("X-Request-Id")))
        assert len(str(one_line["org"])) == 16
        int(str(one_line["org"]), 16)
        assert one_line["org"] != "org-4711"
        assert (one_line["org"], one_line["user"]) == (other["org"], other["user"])
        assert b"alice" not in orjson.dumps(one_line)


async def test_identity_ids_in_clear_when_configured(upstream: RawUpstream) -> None:
    yaml = f"logging:\n  ids: clear\n  id_hash_key: {HASH_KEY}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response = await send(sc.port, headers=IDENTITY)
        line = await access_record(sc, one(response.header("X-Request-Id")))
        assert (line["org"], line["user"]) == ("org-4711", "alice@example.com")


async def test_configured_identity_headers_are_the_ones_hashed(upstream: RawUpstream) -> None:
    yaml = (
        "identity:\n  org_header: X-Tenant\n  user_header: X-Subject\n"
        f"logging:\n  id_hash_key: {HASH_KEY}\n"
    )
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        headers = [("X-Tenant", "t-1"), ("X-Subject", "bob"), *IDENTITY]
        response = await send(sc.port, headers=headers)
        line = await access_record(sc, one(response.header("X-Request-Id")))
        assert (line["org"], line["user"]) == (hashed(b"t-1"), hashed(b"bob"))


# --- client bytes in log lines --------------------------------------------------------------

RAW_HEADERS = [
    ("X-Note", b"caf\xff\tend"),
    ("X-Org-Id", b"org\xff"),
    ("X-User-Id", b"u\xc3\xa9\tx"),
    ("X-Long", b"L" * 600),
]


async def test_raw_header_bytes_are_logged_sanitised(upstream: RawUpstream) -> None:
    yaml = "logging:\n  ids: clear\n  access:\n    headers: [X-Note, X-Long]\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response = await send(sc.port, headers=RAW_HEADERS)
        assert response.status == 200
        line = await access_record(sc, one(response.header("X-Request-Id")))
        assert line["req_headers"] == {
            "x-note": "caf\\xff\\x09end",
            "x-long": "L" * 512 + "...",
        }
        assert line["org"] == "org\\xff"
        assert line["user"] == "u\u00e9\\x09x"
        orjson.dumps(line)  # a valid JSON line
        # The sink serialised every record without raising: later requests still work.
        assert (await send(sc.port)).status == 200


async def test_raw_identity_bytes_are_hashed_as_sent(upstream: RawUpstream) -> None:
    yaml = f"logging:\n  id_hash_key: {HASH_KEY}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response = await send(sc.port, headers=RAW_HEADERS)
        assert response.status == 200
        line = await access_record(sc, one(response.header("X-Request-Id")))
        assert line["org"] == hashed(b"org\xff")
        assert line["user"] == hashed(b"u\xc3\xa9\tx")


async def test_hashed_identity_ids_stay_hashed_when_listed_in_access_headers(
    upstream: RawUpstream,
) -> None:
    yaml = (
        f"logging:\n  id_hash_key: {HASH_KEY}\n"
        "  access:\n    headers: [User-Agent, X-Org-Id, X-User-Id]\n"
    )
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(upstream.url, yaml)) as sc:
        response = await send(sc.port, headers=[("User-Agent", "probe/1"), *IDENTITY])
        line = await access_record(sc, one(response.header("X-Request-Id")))
        assert line["org"] == hashed(b"org-4711")
        assert line["req_headers"]["user-agent"] == "probe/1"  # type: ignore[index]
        serialised = orjson.dumps(line)
        assert b"org-4711" not in serialised
        assert b"alice@example.com" not in serialised
