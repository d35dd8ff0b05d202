"""Helpers for the proxy-behaviour tests: raw HTTP/1.1 responses read with their framing,
full-YAML sidecar configs, the admin /metrics page parsed, and a recording raw upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    LoopbackServer,
    RawExchange,
    RawUpstream,
    _read_raw_body,
    config_on_free_ports,
)

# Every test body is wrapped in `asyncio.timeout(TEST_TIMEOUT)` so a hang fails, not blocks.
TEST_TIMEOUT = 10.0


@dataclass
class RawResponse:
    """One HTTP/1.1 response read off a socket, with the framing it arrived in."""

    status_line: bytes
    headers: list[tuple[str, str]]
    # The body as it appeared on the wire (chunk framing included, if chunked).
    raw_body: bytes
    # The payload once the chunk framing is removed.
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ", 2)[1])

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def parse_head(head: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    return lines[0], headers


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> RawResponse:
    """Read exactly one response using HTTP/1.1 framing rules (RFC 9112 §6.3).

    Interim (1xx) responses are returned as they are; call again for the final one.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, headers = parse_head(head)
    response = RawResponse(status_line, headers, b"", b"")
    status = response.status
    if head_request or status < 200 or status in (204, 304):
        return response
    encodings = ",".join(response.header("Transfer-Encoding")).lower()
    if "chunked" in encodings:
        raw = b""
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.strip().split(b";")[0], 16)
            if size == 0:
                # Trailer section: lines until an empty one.
                while True:
                    line = await reader.readuntil(b"\r\n")
                    raw += line
                    if line == b"\r\n":
                        break
                break
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            body += chunk[:-2]
        response.raw_body, response.body = raw, body
        return response
    lengths = response.header("Content-Length")
    if lengths:
        data = await reader.readexactly(int(lengths[0]))
    else:
        data = await reader.read()  # close-delimited
    response.raw_body = response.body = data
    return response


@asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def exchange(port: int, data: bytes, *, head_request: bool = False) -> RawResponse:
    """Send one raw request on a new connection and read one framed response."""
    async with connection(port) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return await read_response(reader, head_request=head_request)


# A whole YAML config on free ports (kept under the name these tests use).
config_from_yaml = config_on_free_ports


async def metric_samples(admin_url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named `name` on the admin /metrics page, keyed by their sorted labels."""
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def metric_value(admin_url: str, name: str, **labels: str) -> float:
    """One sample's value (0.0 when the labelled child does not exist yet)."""
    samples = await metric_samples(admin_url, name)
    return samples.get(tuple(sorted(labels.items())), 0.0)


async def wait_until(predicate, *, timeout: float = 5.0, interval: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate()` (sync) until true; bounded, so a miss fails instead of hanging."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = await RawUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.stop()


Responder = Callable[[RawExchange], "bytes | None"]


@dataclass
class ScriptedUpstream(LoopbackServer):
    """A raw HTTP/1.1 upstream whose answer depends on the request.

    `respond(exchange)` returns the raw bytes to send, or None to close the connection
    without answering. `close_after` closes the connection after each answer. Like
    RawUpstream it records every complete request (head and raw body); `connections`
    counts accepted connections and `closed` is set whenever one of them ends.
    """

    respond: Responder
    close_after: bool = False
    exchanges: list[RawExchange] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_raw_body(reader, head)
                exchange = RawExchange(head[:-4], body)
                self.exchanges.append(exchange)
                self.received.set()
                answer = self.respond(exchange)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()


@asynccontextmanager
async def scripted_upstream(
    respond: Responder, **kwargs: object
) -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream(respond, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield upstream
    finally:
        await upstream.stop()


@dataclass
class TapUpstream(LoopbackServer):
    """Records every byte each connection sends until the peer closes; never answers."""

    data: list[bytearray] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        self.data.append(buffer)
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()
