"""Span export to an OpenTelemetry collector over OTLP/HTTP (protobuf), off the request path.

Requests only append a small record to a bounded queue; a background task sends batches.
When the queue is full, or the collector is slow, down or refusing, spans are dropped and
counted (`sidecar_spans_dropped_total{reason}`): a request is never slowed by tracing.

Encoding uses the `opentelemetry-proto` package (the `otel` extra: `pip install
sidecar[otel]`), imported only when export is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar import __version__
from sidecar.chain import SpanAttribute, SpanEvent
from sidecar.config import SpanExportConfig, mask_url
from sidecar.logs import LogSink
from sidecar.metrics import Metrics

OTLP_CONTENT_TYPE = "application/x-protobuf"


@dataclass(frozen=True, slots=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    status: int
    attributes: tuple[SpanAttribute, ...]
    events: tuple[SpanEvent, ...] = ()


class ExportUnavailable(Exception):
    """Span export is configured but the `otel` extra is not installed."""


def _load_protobuf() -> Any:
    try:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    except ImportError as error:
        raise ExportUnavailable(
            "tracing.export.endpoint needs the otel extra: pip install 'sidecar[otel]'"
        ) from error
    return trace_service_pb2


class SpanExporter:
    """A bounded queue of finished spans and the task that ships them in batches."""

    def __init__(self, config: SpanExportConfig, metrics: Metrics, log: LogSink) -> None:
        assert config.endpoint is not None
        self._pb = _load_protobuf()
        self._config = config
        self._metrics = metrics
        self._log = log
        self._queue: deque[SpanRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._dropped_full = metrics.spans_dropped.labels("queue_full")
        self._dropped_failed = metrics.spans_dropped.labels("export_failed")
        self._exported = metrics.spans_exported
        self._failing = False

    def submit(self, span: SpanRecord) -> None:
        """Queue a finished span; never blocks, drops (and counts) when the queue is full."""
        if len(self._queue) >= self._config.queue_size:
            self._dropped_full.inc()
            return
        self._queue.append(span)
        if len(self._queue) >= self._config.batch_size:
            self._wake.set()

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.timeout)
        )
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Send what is queued (bounded by the export timeout), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._config.timeout):
                while self._queue:
                    await self._send(self._take_batch())
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.interval):
                    await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._send(self._take_batch())

    def _take_batch(self) -> list[SpanRecord]:
        size = min(len(self._queue), self._config.batch_size)
        return [self._queue.popleft() for _ in range(size)]

    async def _send(self, batch: list[SpanRecord]) -> None:
        assert self._session is not None and self._config.endpoint is not None
        try:
            body = self.encode(batch)
            async with self._session.post(
                self._config.endpoint,
                data=body,
                headers={"Content-Type": OTLP_CONTENT_TYPE},
            ) as response:
                await response.read()
                if response.status >= 300:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            # ValueError: a span the encoder refused; never let it stop the exporter.
            self._dropped_failed.inc(len(batch))
            if not self._failing:  # one event per outage, not one per batch
                self._failing = True
                self._log.event(
                    "tracing.export_failed",
                    level="warning",
                    endpoint=mask_url(self._config.endpoint),
                    error=type(error).__name__,
                    status=getattr(error, "status", None),
                )
            return
        self._failing = False
        self._exported.inc(len(batch))

    def encode(self, batch: list[SpanRecord]) -> bytes:
        """An ExportTraceServiceRequest holding the batch, serialised."""
        pb = self._pb
        request = pb.ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        _set_attributes(
            resource_spans.resource.attributes,
            (
                ("service.name", self._config.service_name),
                ("service.version", __version__),
                ("process.pid", os.getpid()),
            ),
        )
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "sidecar"
        scope_spans.scope.version = __version__
        for record in batch:
            _fill_span(scope_spans.spans.add(), record)
        return bytes(request.SerializeToString())


# OTLP enum values (opentelemetry/proto/trace/v1/trace.proto).
_SPAN_KIND_SERVER = 2
_STATUS_ERROR = 2


def _fill_span(span: Any, record: SpanRecord) -> None:
    span.trace_id = bytes.fromhex(record.trace_id)
    span.span_id = bytes.fromhex(record.span_id)
    if record.parent_span_id is not None:
        span.parent_span_id = bytes.fromhex(record.parent_span_id)
    span.name = record.name
    span.kind = _SPAN_KIND_SERVER
    span.start_time_unix_nano = record.start_ns
    span.end_time_unix_nano = record.end_ns
    _set_attributes(span.attributes, record.attributes)
    for event in record.events:
        added = span.events.add()
        added.name = event.name
        added.time_unix_nano = event.time_ns
        _set_attributes(added.attributes, event.attributes)
    # OTel HTTP semantic conventions: a server span is an error for 5xx only.
    if record.status >= 500:
        span.status.code = _STATUS_ERROR


def _set_attributes(target: Any, attributes: tuple[SpanAttribute, ...]) -> None:
    for key, value in attributes:
        item = target.add()
        item.key = key
        if isinstance(value, bool):
            item.value.bool_value = value
        elif isinstance(value, int):
            item.value.int_value = value
        elif isinstance(value, float):
            item.value.double_value = value
        else:
            item.value.string_value = value
