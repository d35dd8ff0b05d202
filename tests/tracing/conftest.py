"""Helpers for the tracing tests: configs from YAML, raw requests with any header bytes, a
recording raw upstream, a real OTLP/HTTP receiver, and log-record lookups.

Everything runs on 127.0.0.1 with real sockets; nothing HTTP is mocked.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sidecar.config import SidecarConfig
from sidecar.tracecontext import parse_traceparent
from tests.proxy.conftest import RawResponse, exchange, wait_until
from tests.support import RawExchange, RawUpstream, RunningSidecar, run_app, sidecar_config

# Every test body runs under `asyncio.timeout(TEST_TIMEOUT)`: a hang fails, never blocks.
TEST_TIMEOUT = 10.0

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED_TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-00"

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def tracing_config(upstream_url: str, yaml: str = "", **server: object) -> SidecarConfig:
    """A config for `upstream_url` plus the (indented or not) YAML sections given."""
    return sidecar_config(upstream_url, textwrap.dedent(yaml), **server)


def export_yaml(endpoint: str, **settings: str) -> str:
    """A `tracing.export:` block (fast interval, short timeout) plus extra export keys."""
    values = {"endpoint": endpoint, "interval": "50ms", "timeout": "500ms", **settings}
    lines = ["tracing:", "  export:"] + [f"    {key}: {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


# --- requests ---------------------------------------------------------------------------------

HeaderList = Sequence[tuple[str, str | bytes]]


def build_request(
    path: str = "/",
    *,
    method: str = "GET",
    host: str | bytes = "app.test",
    headers: HeaderList = (),
    body: bytes = b"",
) -> bytes:
    """One HTTP/1.1 request, byte for byte: headers keep their order, repeats and raw bytes."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + _bytes(host)]
    for name, value in headers:
        lines.append(name.encode("latin-1") + b": " + _bytes(value))
    if body:
        lines.append(f"Content-Length: {len(body)}".encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


async def send(port: int, path: str = "/", **kwargs: Any) -> RawResponse:
    """Send one request on a new connection; returns the framed response."""
    return await exchange(port, build_request(path, **kwargs))


def one(values: list[str]) -> str:
    """The single value of a header that must appear exactly once."""
    assert len(values) == 1, values
    return values[0]


def assert_trace_id(value: str) -> str:
    assert _HEX32.fullmatch(value), value
    assert value != "0" * 32
    return value


def assert_span_id(value: str) -> str:
    assert _HEX16.fullmatch(value), value
    assert value != "0" * 16
    return value


def split_traceparent(value: str) -> tuple[str, str, str]:
    """(trace id, parent id, flags) of a version-00 traceparent the sidecar wrote."""
    match = _TRACEPARENT_00.fullmatch(value)
    assert match is not None, value
    assert parse_traceparent(value) is not None, value
    trace_id, parent_id, flags = match.groups()
    return trace_id, parent_id, flags


def upstream_traceparent(received: RawExchange) -> tuple[str, str, str]:
    return split_traceparent(one(received.header("traceparent")))


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    """A raw upstream answering `200 ok` and recording every request head exactly."""
    server = await RawUpstream().start()
    try:
        yield server
    finally:
        await server.stop()


# --- logs -------------------------------------------------------------------------------------


def records_of(sc: RunningSidecar, request_id: str) -> list[dict[str, object]]:
    return [r for r in sc.log.records if r.get("request_id") == request_id]


async def access_record(sc: RunningSidecar, request_id: str) -> dict[str, object]:
    """The access line of one request; written just after the response, so polled (bounded)."""

    def found() -> list[dict[str, object]]:
        return [r for r in records_of(sc, request_id) if r.get("event") == "access"]

    await wait_until(lambda: bool(found()), timeout=3.0)
    (record,) = found()
    return record


# --- OTLP/HTTP receiver -----------------------------------------------------------------------


@dataclass
class ReceivedSpan:
    span: Span
    resource: Resource

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, object]:
        return _attributes(self.span.attributes)

    @property
    def resource_attributes(self) -> dict[str, object]:
        return _attributes(self.resource.attributes)


def _attributes(items: Any) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        kind = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, kind) if kind is not None else None
    return out


@dataclass
class OtlpCollector:
    """A real OTLP/HTTP traces receiver: decodes each POST with ExportTraceServiceRequest.

    With `hang`, every POST waits on `release` (set at teardown, or by the test) before it
    is answered: a stuck collector. Its body is read and decoded first, so `batches` (spans
    per POST) counts hung POSTs too; `spans` holds only those of answered ones.
    """

    hang: bool = False
    url: str = ""
    spans: list[ReceivedSpan] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    posts: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.content_types.append(request.headers.get("Content-Type", ""))
        message = None
        if request.content_type == "application/x-protobuf":
            message = ExportTraceServiceRequest.FromString(await request.read())
            self.batches.append(
                sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
            )
        self._changed.set()
        if self.hang:
            await self.release.wait()
        if message is None:
            return web.Response(status=415)
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(span, resource_spans.resource))
        self._changed.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(
        self, predicate: Callable[[OtlpCollector], bool], timeout: float = 5.0
    ) -> None:
        """Until `predicate(self)` holds; woken by each POST, bounded by `timeout`."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    async def wait_trace(self, trace_id: str, timeout: float = 5.0) -> ReceivedSpan:
        await self.wait_for(lambda c: bool(c.of_trace(trace_id)), timeout)
        (span,) = self.of_trace(trace_id)
        return span


@asynccontextmanager
async def otlp_collector(*, hang: bool = False) -> AsyncIterator[OtlpCollector]:
    collector = OtlpCollector(hang=hang)
    try:
        async with run_app(collector.app(), shutdown_timeout=1.0) as url:
            collector.url = url + "/v1/traces"
            try:
                yield collector
            finally:
                collector.release.set()  # let hung handlers finish before the server stops
    finally:
        collector.release.set()
