"""The proxy core: one aiohttp request in, one response out, through its route's chain.

This is the whole path of a request: read what the route table needs, build the upstream
headers once, run the route's chain (policies, then the forwarder), write the response
back (streamed or from memory), then record metrics and the access log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass
from random import getrandbits
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDict

from sidecar import errors
from sidecar.chain import (
    CONTINUE,
    CONTINUE_SENT,
    BodyTooLarge,
    ClientStalled,
    Failure,
    Next,
    Origin,
    Outcome,
    Problem,
    ProxyRequest,
    ProxyResponse,
)
from sidecar.config import ServerConfig, SidecarConfig
from sidecar.logs import AccessLog, LogSink
from sidecar.metrics import Metrics, RouteMetrics
from sidecar.relaying import as_sent, connection_tokens, drop_hop_by_hop
from sidecar.routing import (
    REFUSED_PATH_DETAIL,
    UNROUTED,
    CompiledRoute,
    RouteTable,
    path_for_matching,
)
from sidecar.tracecontext import new_trace_id
from sidecar.upstream import Forwarder

# RFC 9110 §9.3.7: OPTIONS * asks about the server itself, which here is the sidecar.
_SERVER_METHODS = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
_MAX_REQUEST_ID = 128
_REQUEST_ID_KEY = web.RequestKey("sidecar.request_id", str)
# Why the handler refuses a request before routing it (answered by the unrouted chain).
_REFUSAL_KEY = web.RequestKey("sidecar.refusal", tuple)
# The one transfer coding a request may use (RFC 9112 §6.1: others get 501).
_CHUNKED = "chunked"
# nginx's convention for a request the client abandoned before the response was sent.
CLIENT_CLOSED = 499
# Dropped from untrusted peers (X-Forwarded-Proto/-Host are replaced instead).
_UNTRUSTED_FORWARDING = ("Forwarded", "X-Real-IP")
_TRUST_SENSITIVE = (*_UNTRUSTED_FORWARDING, "X-Forwarded-Proto", "X-Forwarded-Host")
# Version 4 and the RFC 4122 variant, set on 128 random bits.
_UUID4_MASK = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID4_BITS = (0x4 << 76) | (0x2 << 62)


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything one config generation serves with; hot reload swaps the whole object."""

    config: SidecarConfig
    routes: RouteTable
    # The chain for requests no route takes (tracing, then a 404/400/OPTIONS * answer).
    unrouted: CompiledRoute
    access_log: AccessLog | None
    request_id_header: str
    # Headers the sidecar sets or relies on: a Connection header may not name them.
    protected_headers: frozenset[str]
    # Its upstream pool, told when each request is done (so a retired one knows when to close).
    forwarder: Forwarder


class RuntimeHolder:
    """The one mutable reference the handler reads: swapped atomically on reload."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.draining = False
        # Set at the shutdown deadline, just before requests still running are cancelled.
        self.cancelling = False


# Always set or managed by the sidecar, whatever the config (see protected_headers).
_MANAGED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
        "traceparent",
        "tracestate",
    }
)


def protected_headers(config: SidecarConfig) -> frozenset[str]:
    """Headers a client's Connection header may not name (a hop-by-hop name is removed
    before forwarding, so naming Host or Content-Length would change framing or identity
    behind the sidecar's back): framing, forwarding, tracing, identity, idempotency keys."""
    names = {
        config.tracing.request_id_header,
        config.tracing.trace_id_header,
        config.identity.org_header,
        config.identity.user_header,
    }
    names.update(route.idempotency.header for route in config.routes if route.idempotency)
    return _MANAGED_HEADERS | {name.lower() for name in names}


def new_request_id() -> str:
    """A random UUID4 string. Request ids need to be unique, not secret: Python's PRNG
    avoids uuid4()'s getrandom() syscall and UUID object (measurable on the hot path)."""
    hex_ = f"{getrandbits(128) & _UUID4_MASK | _UUID4_BITS:032x}"
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def valid_request_id(value: str | None) -> bool:
    """Client ids are kept only if short and made of safe, printable characters."""
    return (
        value is not None
        and 0 < len(value) <= _MAX_REQUEST_ID
        and value.isascii()
        and value.isprintable()
        and '"' not in value
        and "\\" not in value
    )


def split_target(target: str) -> tuple[str, str | None] | None:
    """(origin-form path+query, authority or None) of a request target; None if invalid.

    Absolute-form (`GET http://host/p HTTP/1.1`, RFC 9112 §3.2.2) is turned into origin-form,
    and its authority replaces the Host header.
    """
    if target.startswith("/"):
        return target, None
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    end = len(rest)
    for delimiter in "/?":
        index = rest.find(delimiter)
        if index != -1:
            end = min(end, index)
    authority, remainder = rest[:end], rest[end:]
    if not authority or "@" in authority:
        return None
    if not remainder.startswith("/"):
        remainder = "/" + remainder
    return remainder, authority


class ProxyHandler:
    """The aiohttp low-level handler for client traffic."""

    def __init__(self, holder: RuntimeHolder, metrics: Metrics, log: LogSink) -> None:
        self.holder = holder
        self.metrics = metrics
        self.log = log
        # The tasks of requests being handled, for the shutdown deadline to cancel.
        self.running: set[asyncio.Task[Any]] = set()

    async def __call__(self, raw: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        runtime = self.holder.runtime
        incoming_id = raw.headers.get(runtime.request_id_header)
        request_id = incoming_id if valid_request_id(incoming_id) else new_request_id()
        assert request_id is not None
        split = split_target(raw.raw_path)
        target, authority = split if split is not None else (raw.raw_path, None)
        path = target.partition("?")[0]
        route = None
        refusal = _refusal(raw, runtime)
        if refusal is not None:
            raw[_REFUSAL_KEY] = refusal
        elif split is not None:
            host = authority if authority is not None else raw.headers.get(hdrs.HOST, "")
            route = runtime.routes.match(raw.method, host, path)
        if route is None:
            # Unroutable requests still go through tracing, so a 404 carries trace headers.
            route = runtime.unrouted
        request = ProxyRequest(
            method=raw.method,
            target=target,
            path=path,
            headers=self._upstream_headers(raw, runtime, request_id, authority),
            route=route.config,
            request_id=request_id,
            client_ip=raw.remote or "",
            raw=raw,
        )
        metrics = route.metrics
        metrics.in_flight.inc()
        forwarder = runtime.forwarder
        forwarder.users += 1
        task = asyncio.current_task()
        assert task is not None
        running = self.running
        running.add(task)
        # If our own code fails, aiohttp calls `refuse`, which answers with this same id.
        raw[_REQUEST_ID_KEY] = request_id
        status = 500
        failure = Failure.INTERNAL
        response: ProxyResponse | None = None
        try:
            response = await self._run_chain(request, route.chain, metrics)
            status = response.status
            failure = response.failure.kind if response.failure is not None else Failure.NONE
            response.headers[runtime.request_id_header] = request_id
            sent = await self._send(raw, response, request, metrics)
            return sent
        except asyncio.CancelledError:
            # The client went away (not a server error), or the shutdown deadline came.
            status = CLIENT_CLOSED
            failure = Failure.SHUTDOWN if self.holder.cancelling else Failure.CLIENT_GONE
            raise
        except _StreamBroken as broken:
            failure = broken.kind
            raise broken.__cause__ from None  # type: ignore[misc]
        finally:
            running.discard(task)
            try:
                if response is not None and response.holds_resources:
                    await response.aclose()  # frees the upstream connection, whatever happened
            finally:
                forwarder.leave()
                self._done(runtime, request, metrics, response, status, failure, started)

    def _done(
        self,
        runtime: Runtime,
        request: ProxyRequest,
        metrics: RouteMetrics,
        response: ProxyResponse | None,
        status: int,
        failure: str,
        started: float,
    ) -> None:
        """The bookkeeping of a finished request: metrics, finishers, the access log."""
        metrics.in_flight.dec()
        metrics.count_request(request.method, status)
        duration = time.perf_counter() - started
        metrics.duration.observe(duration)
        request.finished = True
        if request.finishers is not None:
            self._finish(request, response, status, failure, duration)
        self._access(runtime, request, status, duration)

    def _finish(
        self,
        request: ProxyRequest,
        response: ProxyResponse | None,
        status: int,
        failure: str,
        duration: float,
    ) -> None:
        assert request.finishers is not None
        outcome = Outcome(
            status=status,
            failure=failure,
            origin=response.origin if response is not None else Origin.SIDECAR,
            duration=duration,
            bytes_in=request.bytes_received,
            bytes_out=request.bytes_sent,
            request_sent=request.upstream_sent and failure not in Failure.NOT_SENT,
        )
        for finish in request.finishers:
            finish(outcome)

    async def _run_chain(
        self, request: ProxyRequest, chain: Next, metrics: RouteMetrics
    ) -> ProxyResponse:
        try:
            response = await chain(request)
        except BodyTooLarge as exc:
            # A policy that buffers the body (read_body) found it over the limit.
            return errors.body_too_large(request, exc.limit)
        except ClientStalled as exc:
            return errors.client_stalled(request, exc.detail)
        failure = response.failure
        if failure is not None:
            metrics.count_upstream_error(failure.kind)
            self.log.request_event(
                request,
                "upstream.error",
                level="warning",
                kind=failure.kind,
                detail=failure.detail,
            )
        return response

    def _upstream_headers(
        self,
        raw: web.BaseRequest,
        runtime: Runtime,
        request_id: str,
        authority: str | None,
    ) -> CIMultiDict[str]:
        headers = drop_hop_by_hop(as_sent(raw.raw_headers, raw.headers))
        headers[runtime.request_id_header] = request_id
        if authority is not None:
            headers[hdrs.HOST] = authority
        # The client's own Expect is answered by the sidecar (see ProxyRequest.body_chunks).
        headers.popall(hdrs.EXPECT, None)
        peer = raw.remote or ""
        # Several field lines of a list header mean the same as one comma-joined line.
        forwarded_for = ", ".join(raw.headers.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{forwarded_for}, {peer}" if forwarded_for else peer
        # Parsing the peer's address costs a few µs: only when there is a claim to judge.
        trusted = any(name in raw.headers for name in _TRUST_SENSITIVE) and _is_trusted(
            peer, runtime.config
        )
        if not trusted:
            # Claims about the client that only a trusted proxy may make.
            for name in _UNTRUSTED_FORWARDING:
                if name in headers:
                    del headers[name]
        if not (trusted and "X-Forwarded-Proto" in raw.headers):
            headers["X-Forwarded-Proto"] = "https" if raw.secure else "http"
        if not (trusted and "X-Forwarded-Host" in raw.headers):
            host = headers.get(hdrs.HOST)
            if host is None:
                headers.popall("X-Forwarded-Host", None)
            else:
                headers["X-Forwarded-Host"] = host
        return headers

    async def _send(
        self,
        raw: web.BaseRequest,
        response: ProxyResponse,
        request: ProxyRequest,
        metrics: RouteMetrics,
    ) -> web.StreamResponse:
        """Write the response to the client (counting body bytes in request.bytes_sent)."""
        if response.websocket is not None:
            relay, response.websocket, response.closer = response.websocket, None, None
            return await relay(raw, response.headers)
        stream = _RelayedResponse(
            status=response.status, reason=response.reason, headers=response.headers
        )
        if self.holder.draining or response.headers.get(hdrs.CONNECTION) == "close":
            # Draining: tell keep-alive clients to reconnect, which takes them to another
            # replica. (Our own answers may also need the connection closed.)
            stream.force_close()
        body = response.body
        if body is None:
            await stream.prepare(raw)
            return stream
        if isinstance(body, bytes):
            # Headers wait for the body, so both leave in one write.
            stream.send_headers_with_body()
            stream.content_length = len(body)
            await stream.prepare(raw)
            await stream.write_eof(body)
            request.bytes_sent = len(body)
            return stream
        await stream.prepare(raw)
        try:
            async for chunk in body:
                await stream.write(chunk)
                request.bytes_sent += len(chunk)
        except Exception as exc:
            client_gone = isinstance(exc, ConnectionError)
            if not client_gone:
                metrics.count_upstream_error(Failure.STREAM)
            # The status line is gone already: cut the connection so the client sees a
            # truncated body, never a short one that looks complete.
            if raw.transport is not None:
                raw.transport.abort()
            raise _StreamBroken(Failure.CLIENT_GONE if client_gone else Failure.STREAM) from exc
        return stream

    def refuse(self, raw: web.BaseRequest, status: int, exc: BaseException | None) -> web.Response:
        """The answer to a request that never reached a route: unparseable, or our bug."""
        known_id = raw.get(_REQUEST_ID_KEY)
        request_id = known_id if known_id is not None else new_request_id()
        problem = errors.BAD_REQUEST if status < 500 else errors.INTERNAL_ERROR
        detail = (
            "the request is not valid HTTP/1.1"
            if status < 500
            else "an unexpected error in the sidecar; it has been logged"
        )
        answer, trace_id = self.problem_answer(problem, request_id, detail, status)
        if known_id is None:  # the handler never ran, so never counted this request
            self.metrics.route(UNROUTED).count_request("OTHER", status)
        self.log.event(
            "request.refused" if status < 500 else "request.failed",
            level="warning" if status < 500 else "error",
            status=status,
            error=type(exc).__name__ if exc is not None else None,
            request_id=request_id,
            trace_id=trace_id,
        )
        return answer

    def problem_answer(
        self, problem: Problem, request_id: str, detail: str, status: int | None = None
    ) -> tuple[web.Response, str]:
        """A problem answer made outside any chain (with fresh trace id), and that id."""
        runtime = self.holder.runtime
        trace_id = new_trace_id()
        response = errors.problem_response(
            problem, request_id, detail, status=status, members={"trace_id": trace_id}
        )
        response.headers[runtime.request_id_header] = request_id
        response.headers[runtime.config.tracing.trace_id_header] = trace_id
        assert isinstance(response.body, bytes)
        answer = web.Response(status=response.status, body=response.body, headers=response.headers)
        answer.force_close()
        return answer, trace_id

    def _access(
        self, runtime: Runtime, request: ProxyRequest, status: int, duration: float
    ) -> None:
        log = runtime.access_log
        if log is None or not log.wanted(status):
            return
        log.write(
            route=request.route.name,
            method=request.method,
            target=request.target,
            status=status,
            duration=duration,
            upstream_duration=request.upstream_seconds,
            bytes_in=request.raw.content.total_bytes,
            bytes_out=request.bytes_sent,
            client=request.client_ip,
            request_id=request.request_id,
            headers=request.raw.headers,
            extra=request.log_fields or None,
        )


class _StreamBroken(Exception):
    """The body relay stopped midway (`kind`: stream or client_gone); wraps the cause."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _refusal(raw: web.BaseRequest, runtime: Runtime) -> tuple[Problem, str] | None:
    """Why a request is refused before routing, if it is: framing the sidecar will not
    pass on (RFC 9112 §6.1), or a Connection header naming a header it must keep."""
    headers = raw.headers
    if hdrs.TRANSFER_ENCODING in headers:
        codings = [
            c.strip().lower() for v in headers.getall(hdrs.TRANSFER_ENCODING) for c in v.split(",")
        ]
        if codings != [_CHUNKED]:
            return errors.TRANSFER_CODING_UNSUPPORTED, (
                "only the chunked transfer coding is supported for request bodies"
            )
    if hdrs.CONNECTION in headers:
        named = connection_tokens(headers) & runtime.protected_headers
        if named:
            return errors.BAD_REQUEST, (
                "the Connection header names headers the sidecar must forward or set: "
                + ", ".join(sorted(named))
            )
    return None


class ProxyServer(web.Server):
    """aiohttp's low-level server, answering what aiohttp itself refuses in our own way,
    bounding how long a request head may take and how many connections are open."""

    def __init__(self, handler: ProxyHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.proxy = handler
        metrics = handler.metrics
        self.open_connections = metrics.client_connections
        self.closed_header_timeout = metrics.client_connections_closed.labels("header_timeout")
        self.closed_over_limit = metrics.client_connections_closed.labels("over_limit")

    @property
    def settings(self) -> ServerConfig:
        """The server settings in force now (a reload applies to new connections)."""
        return self.proxy.holder.runtime.config.server

    def __call__(self) -> web.RequestHandler:
        return _ProxyConnection(self, loop=self._loop, **self._kwargs)

    def close_idle(self) -> None:
        """Close keep-alive connections that wait for a next request (shutdown); busy ones
        finish their request (its response says Connection: close) and end then."""
        for connection in list(self._connections):
            if isinstance(connection, _ProxyConnection) and connection.idle:
                connection.force_close()

    async def cancel_running(self, deadline: float, cancelled_by: float) -> None:
        """Let requests under way run until `deadline` (event-loop time), then cancel them,
        waiting until `cancelled_by` at most for their last steps (metrics, finishers)."""
        loop = asyncio.get_running_loop()
        running = self.proxy.running
        if running:
            await asyncio.wait(set(running), timeout=max(deadline - loop.time(), 0.0))
        if running:
            self.proxy.holder.cancelling = True
            still = set(running)
            for task in still:
                task.cancel()
            await asyncio.wait(still, timeout=max(cancelled_by - loop.time(), 0.0))
        for connection in list(self.connections):
            connection.force_close()


class _ProxyConnection(web.RequestHandler):
    """One client connection.

    Requests aiohttp's parser rejects (a malformed request line or header), and any
    unexpected failure of ours, get a problem+json answer with a request id and a trace
    id, like every other sidecar error, instead of aiohttp's text/plain page; and nothing
    of the raw request is logged. The request head must arrive within `header_timeout`
    of its first byte (or of the connection opening), so a slowloris connection is closed
    instead of living as long as the keep-alive timeout.
    """

    # When the head now awaited began (loop time); None while no head is awaited.
    _head_started: float | None = None
    # One timer per connection, re-armed lazily (as aiohttp's keep-alive timer is): a
    # request that arrives in time costs no timer of its own.
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = False
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, ProxyServer)
        if len(manager._connections) >= manager.settings.max_connections:
            manager.closed_over_limit.inc()
            self._refused = True
            transport.write(self._over_limit_answer(manager))  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)
        manager.open_connections.inc()
        self._await_head(manager)

    def connection_lost(self, exc: BaseException | None) -> None:
        manager = self._manager
        if manager is None or self._refused:
            return  # refused in connection_made (never counted), or already gone
        assert isinstance(manager, ProxyServer)
        manager.open_connections.dec()
        self._head_started = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        """Waiting for a next request, none of it received."""
        return self._waiter is not None and not self._messages and not self._head_bytes

    def data_received(self, data: bytes) -> None:
        if self._head_started is None and not self._messages and self._waiter is not None:
            # The first byte of a next request on a kept-alive connection.
            manager = self._manager
            if isinstance(manager, ProxyServer):
                self._await_head(manager)
        if data:
            self._head_bytes = True
        super().data_received(data)
        if self._messages:
            self._head_started = None  # the head is complete
            self._head_bytes = False

    def _await_head(self, manager: ProxyServer) -> None:
        self._head_bytes = False
        self._head_started = started = self._loop.time()
        if self._head_timer is None:
            due = started + manager.settings.header_timeout
            self._head_timer = self._loop.call_at(due, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        manager = self._manager
        started = self._head_started
        if started is None or manager is None or self.transport is None or self._messages:
            return
        assert isinstance(manager, ProxyServer)
        timeout = manager.settings.header_timeout
        if self._loop.time() < started + timeout:  # a later head: its own deadline
            self._head_timer = self._loop.call_at(started + timeout, self._check_head)
            return
        manager.closed_header_timeout.inc()
        if self._head_bytes:
            # Part of a request arrived: say why it is refused (RFC 9110 §15.5.9).
            detail = f"the request head did not arrive within {timeout:g}s"
            answer, _ = manager.proxy.problem_answer(
                errors.REQUEST_HEAD_TIMEOUT, new_request_id(), detail
            )
            self.transport.write(_serialise(answer))
        self.force_close()  # closes the transport (after the answer is written)

    def _over_limit_answer(self, manager: ProxyServer) -> bytes:
        detail = f"this sidecar already serves {manager.settings.max_connections} connections"
        answer, _ = manager.proxy.problem_answer(
            errors.TOO_MANY_CONNECTIONS, new_request_id(), detail
        )
        return _serialise(answer)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # A `100 Continue` sent for the body is not a response: a 500 can still follow it.
        interim = len(CONTINUE) if request.get(CONTINUE_SENT) else 0
        if request.writer.output_size > interim:
            raise ConnectionError("the response has started: the connection is broken")
        manager = self._manager
        assert isinstance(manager, ProxyServer)
        return manager.proxy.refuse(request, status, exc)


def _serialise(answer: web.Response) -> bytes:
    """A complete HTTP/1.1 response, for writing on a connection no request owns."""
    assert isinstance(answer.body, bytes)
    lines = [f"HTTP/1.1 {answer.status} {answer.reason}"]
    lines += [f"{name}: {value}" for name, value in answer.headers.items()]
    lines += [f"Content-Length: {len(answer.body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + answer.body


async def answer_unrouted(request: ProxyRequest) -> ProxyResponse:
    """The end of the chain for requests no route takes: OPTIONS *, a bad target, or 404."""
    if request.target == "*" and request.method == "OPTIONS":
        # RFC 9110 §9.3.7: OPTIONS * asks about the server itself, which here is the sidecar.
        headers: CIMultiDict[str] = CIMultiDict({"Allow": _SERVER_METHODS})
        return ProxyResponse(200, headers, b"", origin=Origin.SIDECAR)
    refusal = request.raw.get(_REFUSAL_KEY)
    if refusal is not None:
        problem, detail = refusal
        response = errors.problem_for(problem, request, detail)
        # The body's framing (or the headers) cannot be trusted: no next request here.
        response.headers[hdrs.CONNECTION] = "close"
        return response
    if not request.target.startswith("/"):
        return errors.problem_for(
            errors.BAD_REQUEST, request, detail="the request target must be a path (origin-form)"
        )
    if path_for_matching(request.path) is None:
        return errors.problem_for(errors.BAD_REQUEST, request, detail=REFUSED_PATH_DETAIL)
    return errors.problem_for(
        errors.ROUTE_NOT_FOUND, request, detail=f"no route for {request.method} {request.path}"
    )


class _RelayedResponse(web.StreamResponse):
    """A StreamResponse that adds only framing headers and Date to what the app sent.

    aiohttp would add its own `Server` and a guessed `Content-Type` to any response that
    lacks them; relayed as if they came from the app, they would be a lie. (`Date` is
    added when missing, as RFC 9110 §6.6.1 asks of a proxy.)
    """

    def send_headers_with_body(self) -> None:
        """Hold the headers back until the first body write (aiohttp's web.Response does)."""
        self._send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        headers = self.headers
        had_type = hdrs.CONTENT_TYPE in headers
        had_server = hdrs.SERVER in headers
        await super()._prepare_headers()
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)


def _is_trusted(peer: str, config: SidecarConfig) -> bool:
    networks = config.server.trusted_proxies
    if not networks or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)
