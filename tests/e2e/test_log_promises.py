"""What the docs promise about the access log: every field the README lists is on each line
(and nothing it does not list), with the value it describes; `logging.access.sample: 0`
logs no 2xx or 4xx but every 5xx; `logging.access.enabled: false` logs no request at all.

Requests go on one raw keep-alive connection: aiohttp runs a connection's requests one after
another, each handler (access line included) finishing before the next request is read. So
once the reply to a last "barrier" request is in, every earlier request has been logged or
never will be; nothing waits on the clock.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.proxy.conftest import RawResponse, connection, read_response, scripted_upstream
from tests.support import RawExchange, RunningSidecar, run_sidecar, sidecar_config

ROOT = Path(__file__).resolve().parents[2]
TEST_TIMEOUT = 10.0

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
APP_ERROR = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"


def respond(exchange: RawExchange) -> bytes | None:
    """/ok: 200; /error: the app's own 500; /reset: the connection closed (a 502)."""
    target = exchange.request_line.split(b" ")[1]
    if target.startswith(b"/error"):
        return APP_ERROR
    if target.startswith(b"/reset"):
        return None
    return OK


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    async with scripted_upstream(respond) as upstream:
        yield upstream.url


def request(path: str, *headers: tuple[str, str], body: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1" if body else f"GET {path} HTTP/1.1", "Host: app.test"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send_all(sc: RunningSidecar, *requests: bytes) -> list[RawResponse]:
    """Send each request in turn on one keep-alive connection, then a barrier request."""
    responses = []
    async with connection(sc.port) as (reader, writer):
        for data in (*requests, request("/ok/barrier")):
            writer.write(data)
            await writer.drain()
            responses.append(await read_response(reader))
    return responses[:-1]


def access_lines(sc: RunningSidecar) -> list[dict[str, object]]:
    return [r for r in sc.log.records if r.get("event") == "access"]


def request_ids(responses: list[RawResponse]) -> list[str]:
    return [response.header("X-Request-Id")[0] for response in responses]


# --- the fields -----------------------------------------------------------------------------


def documented_access_fields() -> set[str]:
    """The field names of the README's "One JSON line per request" sentence, up to the
    sentence that ends with `logging.access.headers`."""
    text = (ROOT / "README.md").read_text()
    start = text.index("One JSON line per request on stdout:")
    end = text.index("`logging.access.headers`.", start)
    sentence = re.sub(r"\([^()]*(\([^()]*\))?[^()]*\)", "", text[start:end])  # drop (notes)
    return {name for name in re.findall(r"`([a-z_]+)`", sentence)}


def documented_trace_fields() -> set[str]:
    """docs/tracing.md: the fields every log line about a request carries."""
    text = (ROOT / "docs" / "tracing.md").read_text()
    start = text.index("## Logs")
    section = text[start : text.index("\n#", start + 1)]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))


LOGGED = """\
logging:
  access:
    headers: [User-Agent]
identity:
  org_header: X-Org-Id
  user_header: X-User-Id
"""
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_an_access_line_has_every_documented_field_and_no_other(upstream_url: str) -> None:
    documented = documented_access_fields()
    assert documented_trace_fields() <= documented
    assert {"ts", "route", "status", "request_id", "req_headers"} <= documented
    config = sidecar_config(upstream_url, LOGGED)
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(config) as sc:
        headers = [("User-Agent", "probe/1"), ("X-Org-Id", "org-7"), ("X-User-Id", "u-9")]
        (response,) = await send_all(sc, request("/ok/path?q=1", *headers, body=b"abc"))
        (line,) = [r for r in access_lines(sc) if r["request_id"] == request_ids([response])[0]]
    assert set(line) == documented
    assert RFC3339_UTC.fullmatch(str(line["ts"]))
    assert (line["level"], line["event"], line["route"]) == ("info", "access", "default")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/ok/path", 200)
    assert (line["bytes_in"], line["bytes_out"], line["client"]) == (3, 5, "127.0.0.1")
    for timing in ("duration_ms", "upstream_ms"):
        assert isinstance(line[timing], int | float) and not isinstance(line[timing], bool)
    assert line["trace_id"] == response.header("X-Trace-Id")[0]
    assert re.fullmatch(r"[0-9a-f]{16}", str(line["span_id"]))
    assert line["trace_flags"] in ("00", "01")
    assert line["req_headers"] == {"user-agent": "probe/1"}
    # Identity ids are keyed hashes by default, never the ids as sent.
    for field, sent in (("org", "org-7"), ("user", "u-9")):
        assert re.fullmatch(r"[0-9a-f]{16}", str(line[field])) and line[field] != sent


async def test_upstream_ms_is_null_when_the_app_sent_no_response(upstream_url: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(upstream_url)) as sc:
        (response,) = await send_all(sc, request("/reset"))
        assert response.status == 502
        (line,) = [r for r in access_lines(sc) if r["request_id"] == request_ids([response])[0]]
    assert line["upstream_ms"] is None and line["status"] == 502


# --- sampling and turning it off ------------------------------------------------------------


async def test_sample_zero_logs_no_2xx_nor_4xx_but_every_5xx(upstream_url: str) -> None:
    yaml = (
        "logging:\n  access:\n    sample: 0\nroutes:\n  - name: app\n    match: {path_prefix: /}\n"
    )
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(upstream_url, yaml)) as sc:
        quiet = await send_all(sc, *(request(f"/ok/{i}") for i in range(30)))
        assert {r.status for r in quiet} == {200}
        errors = await send_all(sc, request("/error"), request("/reset"))
        assert [r.status for r in errors] == [500, 502]
        lines = access_lines(sc)
    assert sorted(str(line["request_id"]) for line in lines) == sorted(request_ids(errors))
    assert sorted(int(line["status"]) for line in lines) == [500, 502]  # type: ignore[call-overload]


async def test_sample_zero_does_not_log_the_sidecars_own_4xx(upstream_url: str) -> None:
    yaml = "logging:\n  access:\n    sample: 0.0\nroutes:\n  - name: ok\n    match: {path: /ok}\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(upstream_url, yaml)) as sc:
        (missing,) = await send_all(sc, request("/no-route"))
        assert missing.status == 404
        assert access_lines(sc) == []


async def test_access_log_disabled_logs_no_request_but_still_logs_events(upstream_url: str) -> None:
    yaml = "logging:\n  access:\n    enabled: false\n"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(upstream_url, yaml)) as sc:
        responses = await send_all(sc, request("/ok"), request("/error"), request("/reset"))
        assert [r.status for r in responses] == [200, 500, 502]
        assert access_lines(sc) == []
        # The log is captured all the same: the 502's upstream.error event is there.
        reset_id = request_ids(responses)[2]
        events = [r["event"] for r in sc.log.records if r.get("request_id") == reset_id]
        assert events == ["upstream.error"]
