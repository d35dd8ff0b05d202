"""Tracing: the first policy of every chain. Reads, makes and propagates trace context.

- A valid `traceparent` is kept: its trace id is the request's. When the sidecar exports its
  own span, the app receives a traceparent whose parent-id is that span; otherwise the header
  goes on unchanged (a parent-id that appears in no trace would break the trace).
- Without a valid traceparent, B3 (single or multi-header) is read if allowed; failing that a
  new trace starts, sampled at `tracing.sample_ratio`. Invalid headers are never forwarded.
- `tracestate` travels only with a valid traceparent, validated and cut to the W3C limits.
- Every response gets the trace id header; every log line of the request gets trace_id,
  span_id and trace_flags (OpenTelemetry log data model names).
"""

from __future__ import annotations

import random
import time
from random import getrandbits

from multidict import CIMultiDict, CIMultiDictProxy, istr

from sidecar.chain import Next, Outcome, Policy, ProxyRequest, ProxyResponse
from sidecar.config import RouteConfig, TracingConfig
from sidecar.hosts import host_without_port
from sidecar.logs import sanitise
from sidecar.policies.base import PolicyDeps
from sidecar.spans import SpanExporter, SpanRecord
from sidecar.tracecontext import (
    B3_HEADERS,
    B3_SINGLE,
    TRACEPARENT,
    TRACESTATE,
    Parent,
    clean_tracestate,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_b3,
    parse_traceparent,
)

# istr: multidict then need not fold the case of a name on every lookup.
_B3_NAMES = tuple(istr(name) for name in (B3_SINGLE, *B3_HEADERS))
_NON_ZERO = (1 << 64) | 1
_TRACEPARENT = istr(TRACEPARENT)
_TRACESTATE = istr(TRACESTATE)


def _has_b3(headers: CIMultiDictProxy[str]) -> bool:
    # map() rather than a generator expression: no generator frame per request.
    return any(map(headers.__contains__, _B3_NAMES))


class TracingPolicy:
    """Trace context in, trace context out; one span per request when exporting."""

    def __init__(
        self, config: TracingConfig, route_name: str, exporter: SpanExporter | None
    ) -> None:
        self._config = config
        self._route = route_name
        self._exporter = exporter
        # istr: multidict then need not fold the name's case on every response.
        self._trace_id_header = istr(config.trace_id_header)
        self._ratio = config.sample_ratio
        self._b3_accept = config.b3_accept
        self._b3_emit = config.b3_emit
        self._emit = config.b3_emit != "none"
        self._always_sample = config.sample_ratio >= 1.0

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        headers = request.headers
        if (
            self._exporter is not None
            or _TRACEPARENT in headers
            or (self._b3_accept and _has_b3(request.raw.headers))
        ):
            return await self._traced(request, call_next)
        # The common case, kept lean (and in this frame: no second coroutine per request):
        # no trace context came in and no span is exported.
        if _TRACESTATE in headers:
            del headers[_TRACESTATE]
        # One draw for both ids; bit 64 keeps the trace id non-zero, bit 0 the span id.
        ids = f"{getrandbits(192) | _NON_ZERO:048x}"
        trace_id, span_id = ids[:32], ids[32:]
        sampled = self._always_sample or random.random() < self._ratio
        flags = "01" if sampled else "00"
        headers[_TRACEPARENT] = f"00-{trace_id}-{span_id}-{flags}"
        if self._emit:
            _emit_b3(headers, self._b3_emit, trace_id, span_id, sampled)
        request.trace_id = trace_id
        fields = request.log_fields
        fields["trace_id"] = trace_id
        fields["span_id"] = span_id
        fields["trace_flags"] = flags
        response = await call_next(request)
        response.headers[self._trace_id_header] = trace_id
        return response

    async def _traced(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        """A caller's trace context to read, or our own span to export."""
        started_ns = time.time_ns()
        headers = request.headers
        parent, forwarded_as_is, decision = self._parent(request)
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        sampled = self._sampled(parent, decision)
        exporting = self._exporter is not None and sampled
        # Our own span (exported) or a new root gets a new id; else the caller's span is
        # the app's parent, as the unchanged traceparent says.
        span_id = new_span_id() if exporting or parent is None else parent.span_id
        if not forwarded_as_is or exporting:
            headers[TRACEPARENT] = format_traceparent(trace_id, span_id, sampled)
        if self._b3_emit != "none":
            _emit_b3(headers, self._b3_emit, trace_id, span_id, sampled)
        request.trace_id = trace_id
        fields = request.log_fields
        fields["trace_id"] = trace_id
        fields["span_id"] = span_id
        fields["trace_flags"] = "01" if sampled else "00"
        if exporting:
            request.span_events = []
        response = await call_next(request)
        response.headers[self._trace_id_header] = trace_id
        if exporting:
            assert self._exporter is not None
            parent_span = parent.span_id if parent is not None else None
            request.add_finisher(
                lambda outcome: self._export(
                    request, trace_id, span_id, parent_span, started_ns, outcome
                )
            )
        return response

    def _parent(self, request: ProxyRequest) -> tuple[Parent | None, bool, bool | None]:
        """The caller's context, whether its traceparent can go on unchanged, and a bare
        sampling decision (B3 `b3: 1` carries one without any ids)."""
        headers = request.headers
        values = headers.getall(TRACEPARENT, ())
        parent = parse_traceparent(values[0]) if len(values) == 1 else None
        if parent is not None:
            states = headers.getall(TRACESTATE, ())
            if states:
                state = clean_tracestate(list(states))
                if state is None:
                    headers.popall(TRACESTATE)
                else:
                    headers[TRACESTATE] = state
            return parent, True, None
        # No valid traceparent: neither it nor a tracestate may travel on.
        if values:
            del headers[TRACEPARENT]
        if TRACESTATE in headers:
            del headers[TRACESTATE]
        if not self._b3_accept:
            return None, False, None
        b3 = parse_b3(request.raw.headers)
        if isinstance(b3, Parent):
            return b3, False, None
        if b3 is None:
            # Invalid B3 must not reach the app beside the new traceparent (checked by
            # name first: a popall per absent name is most of this policy's cost).
            for name in _B3_NAMES:
                if name in headers:
                    del headers[name]
        return None, False, b3

    def _sampled(self, parent: Parent | None, decision: bool | None) -> bool:
        if parent is not None and parent.sampled is not None:
            return parent.sampled
        if decision is not None:
            return decision
        return self._ratio >= 1.0 or random.random() < self._ratio

    def _export(
        self,
        request: ProxyRequest,
        trace_id: str,
        span_id: str,
        parent_span_id: str | None,
        started_ns: int,
        outcome: Outcome,
    ) -> None:
        assert self._exporter is not None
        raw = request.raw
        status = outcome.status
        self._exporter.submit(
            SpanRecord(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent_span_id,
                name=f"{request.method} {self._route}",
                start_ns=started_ns,
                end_ns=time.time_ns(),
                status=status,
                attributes=(
                    ("http.request.method", request.method),
                    ("http.route", self._route),
                    ("http.response.status_code", status),
                    ("url.path", sanitise(request.path, 2048)),
                    ("url.scheme", "https" if raw.secure else "http"),
                    ("server.address", sanitise(host_without_port(raw.host).strip("[]"), 255)),
                    ("client.address", request.client_ip),
                    ("network.protocol.version", f"{raw.version.major}.{raw.version.minor}"),
                    ("http.request.body.size", outcome.bytes_in),
                    ("http.response.body.size", outcome.bytes_out),
                    ("sidecar.failure", outcome.failure),
                    ("sidecar.origin", outcome.origin.value),
                    ("sidecar.request_id", request.request_id),
                ),
                events=tuple(request.span_events or ()),
            )
        )


def _emit_b3(
    headers: CIMultiDict[str], form: str, trace_id: str, span_id: str, sampled: bool
) -> None:
    for name in (B3_SINGLE, *B3_HEADERS):
        headers.popall(name, None)
    flag = "1" if sampled else "0"
    if form == "single":
        headers[B3_SINGLE] = f"{trace_id}-{span_id}-{flag}"
    else:
        headers["X-B3-TraceId"] = trace_id
        headers["X-B3-SpanId"] = span_id
        headers["X-B3-Sampled"] = flag


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    if not route.tracing.enabled:
        return None
    return TracingPolicy(deps.config.tracing, route.name, deps.spans)
