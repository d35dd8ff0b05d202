"""Span export over OTLP/HTTP to a real receiver (an aiohttp app decoding each POST with
ExportTraceServiceRequest): one SERVER span per sampled request, linked to the caller's
trace; and export never slows a request, whether the collector hangs, is down or the
queue is full."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sidecar.tracecontext import format_traceparent
from tests.proxy.conftest import metric_value
from tests.support import RawUpstream, RunningSidecar, free_port, run_sidecar
from tests.tracing.conftest import (
    PARENT_ID,
    TEST_TIMEOUT,
    TRACE_ID,
    TRACEPARENT,
    UNSAMPLED_TRACEPARENT,
    access_record,
    assert_span_id,
    assert_trace_id,
    export_yaml,
    one,
    otlp_collector,
    send,
    tracing_config,
    upstream_traceparent,
)

DROPPED = "sidecar_spans_dropped_total"
EXPORTED = "sidecar_spans_exported_total"

ROUTES = "routes:\n  - name: orders\n    match: {path_prefix: /orders}\n"


async def test_span_of_a_request_with_a_valid_traceparent(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url, service_name="checkout-sidecar") + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            headers = [("traceparent", TRACEPARENT), ("tracestate", "rojo=00f067aa0ba902b7")]
            started = time.time_ns()
            response = await send(
                sc.port,
                "/orders/42?x=1",
                method="POST",
                host="shop.test:8000",
                headers=headers,
                body=b"hello",
            )
            assert response.status == 200 and response.body == b"ok"
            assert one(response.header("X-Trace-Id")) == TRACE_ID
            request_id = one(response.header("X-Request-Id"))

            received = await collector.wait_trace(TRACE_ID)
            span = received.span
            assert span.kind == Span.SPAN_KIND_SERVER
            assert span.name == "POST orders"
            assert received.parent_span_id == PARENT_ID
            span_id = assert_span_id(received.span_id)
            assert span_id != PARENT_ID
            assert started <= span.start_time_unix_nano <= span.end_time_unix_nano
            assert span.end_time_unix_nano <= time.time_ns()
            assert span.status.code == Status.STATUS_CODE_UNSET
            attributes = received.attributes
            assert attributes["http.request.method"] == "POST"
            assert attributes["http.route"] == "orders"
            assert attributes["http.response.status_code"] == 200
            assert attributes["server.address"] == "shop.test"
            assert attributes["url.path"] == "/orders/42"
            assert attributes["http.request.body.size"] == 5
            assert attributes["http.response.body.size"] == 2
            assert attributes["sidecar.request_id"] == request_id
            assert received.resource_attributes["service.name"] == "checkout-sidecar"
            assert collector.content_types == ["application/x-protobuf"] * collector.posts

            # The app's parent is the exported span: same trace, same flags.
            (app_request,) = upstream.exchanges
            assert upstream_traceparent(app_request) == (TRACE_ID, span_id, "01")
            assert app_request.header("tracestate") == ["rojo=00f067aa0ba902b7"]

            record = await access_record(sc, request_id)
            assert (record["trace_id"], record["span_id"], record["trace_flags"]) == (
                TRACE_ID,
                span_id,
                "01",
            )


async def test_span_of_a_new_trace_has_no_parent(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            response = await send(sc.port, "/orders")
            trace_id = assert_trace_id(one(response.header("X-Trace-Id")))
            received = await collector.wait_trace(trace_id)
            assert received.span.parent_span_id == b""
            assert received.span.name == "GET orders"
            (app_request,) = upstream.exchanges
            assert upstream_traceparent(app_request) == (trace_id, received.span_id, "01")


async def test_span_of_a_b3_request_and_b3_emitted_with_its_id(upstream: RawUpstream) -> None:
    b3_trace, b3_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + "  b3: {emit: single}\n" + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            response = await send(sc.port, "/orders", headers=[("b3", f"{b3_trace}-{b3_span}-1")])
            assert one(response.header("X-Trace-Id")) == b3_trace
            received = await collector.wait_trace(b3_trace)
            assert received.parent_span_id == b3_span
            span_id = assert_span_id(received.span_id)
            (app_request,) = upstream.exchanges
            assert upstream_traceparent(app_request) == (b3_trace, span_id, "01")
            assert app_request.header("b3") == [f"{b3_trace}-{span_id}-1"]


async def test_one_span_per_request(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            trace_ids = []
            for index in range(5):
                trace_id = f"{index + 1:032x}"
                parent = format_traceparent(trace_id, PARENT_ID, True)
                response = await send(sc.port, "/orders", headers=[("traceparent", parent)])
                assert one(response.header("X-Trace-Id")) == trace_id
                trace_ids.append(trace_id)
            await collector.wait_for(lambda c: len(c.spans) >= 5)
            assert sorted(s.trace_id for s in collector.spans) == trace_ids
            assert len({s.span_id for s in collector.spans}) == 5
            await wait_metric(sc, "sidecar_spans_exported_total", 5)


OTHER_UNSAMPLED = UNSAMPLED_TRACEPARENT.replace(TRACE_ID, "1" * 32)


async def test_unsampled_requests_are_not_exported(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + "  sample_ratio: 0.0\n" + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            new_trace = await send(sc.port, "/orders")  # a new trace at ratio 0
            unsampled = await send(sc.port, "/orders", headers=[("traceparent", OTHER_UNSAMPLED)])
            assert one(unsampled.header("X-Trace-Id")) == "1" * 32
            # A sampled parent is exported whatever the ratio; spans go out in order, so
            # once its span is in, the two before it would be too.
            await send(sc.port, "/orders", headers=[("traceparent", TRACEPARENT)])
            await collector.wait_trace(TRACE_ID)
            assert [s.trace_id for s in collector.spans] == [TRACE_ID]
            assert one(new_trace.header("X-Trace-Id")) != TRACE_ID
            # Unsampled: the parent's traceparent went on unchanged, no span id of ours.
            assert upstream.exchanges[1].header("traceparent") == [OTHER_UNSAMPLED]


async def test_5xx_span_has_error_status() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + ROUTES
        async with run_sidecar(tracing_config(closed, yaml)) as sc:
            response = await send(sc.port, "/orders", headers=[("traceparent", TRACEPARENT)])
            assert response.status == 502
            received = await collector.wait_trace(TRACE_ID)
            assert received.span.status.code == Status.STATUS_CODE_ERROR
            assert received.attributes["http.response.status_code"] == 502
            events = {event.name: event for event in received.span.events}
            assert "upstream.error" in events


async def test_4xx_span_status_is_unset(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            response = await send(sc.port, "/nowhere", headers=[("traceparent", TRACEPARENT)])
            assert response.status == 404
            received = await collector.wait_trace(TRACE_ID)
            assert received.span.status.code == Status.STATUS_CODE_UNSET
            assert received.attributes["http.response.status_code"] == 404


# --- export never slows requests ------------------------------------------------------------


async def wait_metric(sc: RunningSidecar, name: str, expected: float, **labels: str) -> None:
    """Poll /metrics (bounded) until the sample reaches `expected`."""
    value = -1.0
    try:
        async with asyncio.timeout(5.0):
            while (value := await metric_value(sc.admin_url, name, **labels)) < expected:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{name}{labels} = {value}, expected {expected}") from None
    assert value == expected


async def timed_requests(sc: RunningSidecar, count: int, limit: float = 2.0) -> None:
    """`count` requests one after another, each answered 200 within `limit` seconds (far
    less than a request held for a stuck export would take, generous on a loaded machine)."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = loop.time()
            async with asyncio.timeout(limit), session.get(sc.url + "/orders") as response:
                assert response.status == 200
                assert await response.read() == b"ok"
            assert loop.time() - started < limit


HANG_ROUTES = "routes:\n  - name: orders\n    match: {path_prefix: /orders}\n    timeout: 500ms\n"


async def test_hanging_collector_does_not_slow_requests(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector(hang=True) as collector:
        # The export timeout outlasts the test: the first POST stays stuck until released.
        yaml = export_yaml(collector.url, timeout="60s") + HANG_ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            try:
                await timed_requests(sc, 1)
                await collector.wait_for(lambda c: c.posts >= 1)  # the exporter is stuck in it
                await timed_requests(sc, 49)
                # All answered while the exporter was stuck in its first POST.
                assert collector.posts == 1
                assert await metric_value(sc.admin_url, EXPORTED) == 0
                assert await metric_value(sc.admin_url, DROPPED, reason="export_failed") == 0
                # Unstuck, the collector gets every span: none was lost or dropped.
                collector.release.set()
                await wait_metric(sc, EXPORTED, 50)
                assert sum(collector.batches) == len(collector.spans) == 50
                assert await metric_value(sc.admin_url, DROPPED, reason="queue_full") == 0
                assert await metric_value(sc.admin_url, DROPPED, reason="export_failed") == 0
            finally:
                collector.release.set()  # else stopping the sidecar would wait on the POST


async def test_collector_down_does_not_slow_requests(upstream: RawUpstream) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens there
    async with asyncio.timeout(TEST_TIMEOUT):
        yaml = export_yaml(endpoint) + HANG_ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            await timed_requests(sc, 50)
            await wait_metric(sc, DROPPED, 50, reason="export_failed")
            failures = [r for r in sc.log.records if r.get("event") == "tracing.export_failed"]
            assert len(failures) == 1  # one event per outage


async def test_full_queue_drops_and_counts_spans(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector(hang=True) as collector:
        yaml = export_yaml(collector.url, timeout="1s", queue_size="5") + HANG_ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            await timed_requests(sc, 50)

            async def dropped() -> tuple[float, float]:
                full = await metric_value(sc.admin_url, DROPPED, reason="queue_full")
                failed = await metric_value(sc.admin_url, DROPPED, reason="export_failed")
                return full, failed

            # Every span is accounted for once the hung POSTs have timed out.
            counts = await dropped()
            try:
                async with asyncio.timeout(8.0):
                    while sum(counts) < 50:
                        await asyncio.sleep(0.02)
                        counts = await dropped()
            except TimeoutError:
                raise AssertionError(f"(queue_full, export_failed) = {counts}") from None
            full, failed = counts
            assert full + failed == 50
            # However many POSTs there were (one per export timeout while the requests ran),
            # none carried more than the queue holds: the rest were dropped as queue_full.
            assert collector.batches and max(collector.batches) <= 5
            assert sum(collector.batches) == failed
            assert full > 0
            assert collector.posts == len(collector.batches) and collector.spans == []


# --- found while testing ------------------------------------------------------------------------


async def test_invalid_utf8_host_does_not_stop_span_export(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            bad = await send(sc.port, "/orders", host=b"caf\xff")
            assert bad.status == 200
            response = await send(sc.port, "/orders", headers=[("traceparent", TRACEPARENT)])
            assert response.status == 200
            await collector.wait_trace(TRACE_ID, timeout=2.0)


async def test_span_server_address_of_an_ipv6_host(upstream: RawUpstream) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), otlp_collector() as collector:
        yaml = export_yaml(collector.url) + ROUTES
        async with run_sidecar(tracing_config(upstream.url, yaml)) as sc:
            await send(
                sc.port, "/orders", host="[::1]:8000", headers=[("traceparent", TRACEPARENT)]
            )
            received = await collector.wait_trace(TRACE_ID)
            assert received.attributes["server.address"] == "::1"
