"""The forwarder: sends a ProxyRequest to the app and streams its answer back, byte for byte.

It speaks HTTP/1.1 to the app through sidecar.http1, a client that writes exactly what it
is given and never resends anything on its own:
- the request line carries the target exactly as the client sent it (a bare `?` too);
- the headers go in the client's order with their original bytes, minus hop-by-hop ones,
  plus the sidecar's documented additions (X-Forwarded-*, the request id); nothing else is
  invented (a `Host` only when an HTTP/1.0 client sent none, as HTTP/1.1 requires one);
- bodies keep their framing: Content-Length stays, chunked stays chunked, and nothing is
  decompressed;
- one pool per process, whose idle timeout sits below the app server's keep-alive timeout,
  so a pooled connection the app has just closed is never used for a POST.

Slow clients cannot hold upstream connections: a body up to the route's `request_buffer`
is read completely before a connection is taken (nginx's proxy_request_buffering), and a
larger one must keep a minimum pace while it streams (ProxyRequest.body_chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import hdrs
from multidict import CIMultiDict

from sidecar import errors
from sidecar.chain import (
    BodyNotReplayable,
    BodyTooLarge,
    ClientStalled,
    Failure,
    Next,
    ProxyRequest,
    ProxyResponse,
    UpstreamFailure,
)
from sidecar.config import RouteConfig, UpstreamConfig
from sidecar.http1 import AppConnection, AppPool, AppResponse
from sidecar.relaying import NO_BODY_STATUSES, WHOLE, drop_hop_by_hop
from sidecar.websocket import WebSocketRelay, is_websocket_upgrade


@dataclass(slots=True)
class _BodyStream:
    """The client's body streamed upstream (see ProxyRequest.stream_body).

    The route's response deadline starts when the body has been sent (`on_sent`), as in
    Envoy: a large or slow upload is not a slow app. The body is sent from a task of its
    own, so why it stopped is noted here for `forward` to report.
    """

    chunks: AsyncIterator[bytes]
    # Set by the attempt that sends it (see _AttemptTimer.body_sent).
    on_sent: Callable[[], None] | None = None
    fault: BodyTooLarge | ClientStalled | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.chunks:
                yield chunk
        except (BodyTooLarge, ClientStalled) as fault:
            self.fault = fault
            raise
        if self.on_sent is not None:
            self.on_sent()

    def raise_client_fault(self) -> None:
        """Re-raise what the client did wrong, if the body stopped because of the client."""
        if self.fault is not None:
            raise self.fault


class ConnectionBudget:
    """The upstream connections this process may use at once, across config generations.

    A reload that changes the upstream makes a new pool while the old one still carries
    requests under way; both draw on this one budget, so together they never exceed
    `upstream.max_connections`. A slot is held from before a connection is taken until
    the response is done with (its body relayed or discarded). Waiters are served in order.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits (no coroutine on the common path)."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        # A slot passes straight to the next waiter, so a newcomer cannot overtake it.
        while self._waiters and self.in_use <= self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_use -= 1

    def resize(self, limit: int) -> None:
        """A reload changed max_connections: the new limit holds from now on."""
        self.limit = limit
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)


class _Exchange:
    """One request on its way through a Forwarder, until its response is done with."""

    __slots__ = ("_forwarder", "client", "connection", "response")

    def __init__(self, forwarder: Forwarder, client: asyncio.BaseTransport | None) -> None:
        self._forwarder = forwarder
        self.client = client
        self.connection: AppConnection | None = None
        self.response: AppResponse | None = None

    def finish(self) -> None:
        """The response is done with: its connection goes back to the pool if it may carry
        another request (else it is closed), and the budget slot is freed (once)."""
        forwarder = self._forwarder
        if self not in forwarder._exchanges:
            return
        forwarder._exchanges.discard(self)
        connection = self.connection
        if connection is not None:
            response = self.response
            if response is not None and response.release():
                forwarder.pool.put(connection)
            elif response is None:
                connection.abort()
        forwarder._budget.release()

    def cut(self) -> None:
        """The retired pool's deadline passed: end both connections so neither side hangs."""
        if self.connection is not None:
            self.connection.abort()
        if self.client is not None:
            self.client.abort()  # type: ignore[attr-defined]
        self.finish()


class Forwarder:
    """The terminal step of every chain: one pool of app connections per process.

    A reload that changes the upstream retires this forwarder (`retire`): it takes no new
    requests, closes when its last response is done, and at the deadline cuts what is
    still open, so no stream is left hanging on a closed pool.
    """

    def __init__(self, config: UpstreamConfig, budget: ConnectionBudget | None = None) -> None:
        self.config = config
        self._base_path = config.base_path
        self._default_host = f"{config.host}:{config.port}"
        self._budget = budget if budget is not None else ConnectionBudget(config.max_connections)
        self._exchanges: set[_Exchange] = set()
        # Requests of the config generations that use this forwarder, from the moment they
        # enter the chain until their response is done with (the handler counts them: a
        # request still reading its body or inside a policy has no exchange yet).
        self.users = 0
        self._drained: asyncio.Future[None] | None = None
        self.pool = AppPool(config)
        # WebSocket sessions have connections of their own, never the request pool's.
        self.websockets = WebSocketRelay(config)

    def leave(self) -> None:
        """A request counted in `users` is done with (see ProxyHandler)."""
        self.users -= 1
        drained = self._drained
        if self.users == 0 and drained is not None and not drained.done():
            drained.set_result(None)

    def for_route(self, route: RouteConfig) -> Next:
        """The terminal step of one route's chain.

        Failures come back as problem responses (with `failure` set), not exceptions, so
        they travel out through the chain like any response: tracing adds its headers,
        a breaker or retry policy sees what happened.
        """
        forward = self.forward

        async def terminal(request: ProxyRequest) -> ProxyResponse:
            try:
                return await forward(request)
            except BodyTooLarge as exc:
                return errors.body_too_large(request, exc.limit)
            except ClientStalled as exc:
                return errors.client_stalled(request, exc.detail)
            except UpstreamFailure as failure:
                return errors.failure_response(request, failure)
            except BodyNotReplayable as exc:
                return errors.problem_for(errors.INTERNAL_ERROR, request, str(exc))

        return terminal

    async def close(self) -> None:
        await self.websockets.close()
        self.pool.close()

    async def retire(self, deadline: float) -> None:
        """No new request comes here: close the idle pooled connections now, close the
        rest once the requests under way (WebSocket sessions included) are done, or cut
        them at `deadline` (event-loop time) so their clients see the connection end."""
        # Idle pooled connections would count against the budget the new pool shares.
        self.pool.close_idle()
        loop = asyncio.get_running_loop()
        if self.users:
            self._drained = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                    await self._drained
        for exchange in list(self._exchanges):
            exchange.cut()
        await self.close()

    async def forward(self, request: ProxyRequest) -> ProxyResponse:
        """One attempt: a budget slot, a connection, the request written once, and the
        response headers. Whatever fails is an UpstreamFailure naming what was sent."""
        if is_websocket_upgrade(request.raw.headers):
            return await self.websockets.connect(request)
        # Before any connection is taken: a small body is read whole, so a slow client
        # holds nothing upstream while it sends.
        body: bytes | _BodyStream | None = request.body
        if body is None and request.raw.body_exists:
            body = await self._request_body(request)
        loop = asyncio.get_running_loop()
        streamed = isinstance(body, _BodyStream)
        if not streamed and request.deadline is None:
            request.deadline = loop.time() + request.route.timeout
        attempt = _AttemptTimer(request, loop)
        chunked = request.chunked
        head = self._request_head(request, chunked and body is not None)
        payload = None
        if isinstance(body, bytes):
            # A buffered chunked body is sent chunked still, as the client framed it.
            payload = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if chunked else body
        elif isinstance(body, _BodyStream):
            body.on_sent = attempt.body_sent
        exchange = _Exchange(self, request.raw.transport)
        await self._take_slot(request, attempt)
        self._exchanges.add(exchange)
        sent_at = time.perf_counter()
        try:
            connection = self.pool.take_idle() or await attempt.connect(self.pool)
            exchange.connection = connection
            request.upstream_sent = True  # from here on the app may see bytes of it
            response = exchange.response = connection.send(
                head,
                payload,
                head_only=request.method == "HEAD",
                header_limit=self.config.max_response_header_size,
                idle_timeout=request.route.idle_timeout,
                early_hints=_early_hints_to(request),
            )
            attempt.watch(response)
            if isinstance(body, _BodyStream):
                response.send_body(body, chunked)
            await response.headers_received()
        except BaseException:
            attempt.stop()
            exchange.finish()
            if isinstance(body, _BodyStream):
                body.raise_client_fault()
            raise
        attempt.stop()
        request.upstream_seconds = time.perf_counter() - sent_at
        return _relayed(response, exchange.finish)

    def _request_head(self, request: ProxyRequest, chunked: bool) -> bytes:
        """The request line and header fields, exactly as they will be written."""
        headers = request.headers
        fields = "\r\n".join(map(": ".join, headers.items()))
        extra = "" if hdrs.HOST in headers else f"Host: {self._default_host}\r\n"
        if chunked:
            extra += "Transfer-Encoding: chunked\r\n"
        head = (
            f"{request.method} {self._base_path}{request.target} HTTP/1.1\r\n"
            f"{fields}\r\n{extra}\r\n"
        )
        # One line per field and no stray CR: a value a policy set with a line break in it
        # must not become a second header (or a second request) upstream.
        lines = len(headers) + 2 + extra.count("\n")
        if head.count("\n") != lines or head.count("\r") != lines:
            raise UpstreamFailure(
                Failure.INTERNAL,
                errors.INTERNAL_ERROR,
                "a request header value holds a line break",
            )
        return head.encode("utf-8", "surrogateescape")

    async def _take_slot(self, request: ProxyRequest, attempt: _AttemptTimer) -> None:
        """A budget slot, waiting at most `upstream.pool_timeout` (or until the attempt's
        deadline if sooner): nothing is sent yet, so a failure here is always safe to retry."""
        if self._budget.try_acquire():
            return
        wait = min(self.config.pool_timeout, attempt.slot_wait())
        try:
            async with asyncio.timeout(wait):
                await self._budget.acquire()
        except TimeoutError:
            raise UpstreamFailure(
                Failure.POOL,
                errors.UPSTREAM_POOL_EXHAUSTED,
                f"all {self._budget.limit} upstream connections stayed busy for {wait:g}s",
            ) from None

    async def _request_body(self, request: ProxyRequest) -> bytes | _BodyStream:
        raw = request.raw
        route = request.route
        declared = raw.content_length
        # A declared length over the buffer streams at once; chunked bodies are read up
        # to the buffer's size and stream on only if they turn out larger.
        fits = declared is None or declared <= route.request_buffer
        if fits and await request.buffer_body(route.request_buffer, route.max_body):
            assert request.body is not None
            return request.body
        return _BodyStream(request.stream_body(route.max_body))


def _early_hints_to(request: ProxyRequest) -> Callable[[bytes], None] | None:
    """Where the app's `103 Early Hints` go: straight to an HTTP/1.1 client (RFC 9110
    §15.2: never to an HTTP/1.0 one)."""
    raw = request.raw
    transport = raw.transport
    if transport is None or raw.version < (1, 1):
        return None
    return transport.write


def _relayed(response: AppResponse, release: Callable[[], None]) -> ProxyResponse:
    """The app's answer as it arrived: no body (HEAD, 204, 304), a small body that came
    whole with its headers (relayed in one write), or a body streamed as it arrives.
    `release` frees the connection once the body is done with (at once when whole)."""
    headers = drop_hop_by_hop(CIMultiDict(response.headers))
    status = response.status
    if response.head_only or status in NO_BODY_STATUSES:
        release()
        return ProxyResponse(status, headers, None, response.reason)
    if response.complete and hdrs.CONTENT_LENGTH in headers and response.buffered <= WHOLE:
        # Bounded, so large bodies still stream instead of being held in memory per request.
        body = response.take_body()
        release()
        return ProxyResponse(status, headers, body, response.reason)
    return ProxyResponse(status, headers, response.body(), response.reason, release=release)


class _AttemptTimer:
    """The deadline of one attempt: the request's deadline, or the attempt's own timeout
    if sooner. For a streamed body it starts once the body has been sent.

    Waiting for the response headers is bounded by one timer handle that fails the
    response when it fires (no task cancellation on the common path); only making a new
    connection runs under an asyncio timeout.
    """

    __slots__ = ("_handle", "_loop", "_request", "_response", "ends")

    def __init__(self, request: ProxyRequest, loop: asyncio.AbstractEventLoop) -> None:
        self._request = request
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._response: AppResponse | None = None
        # Event-loop time the attempt must have its response headers by (None: not yet
        # known, while a streamed body is still being sent).
        self.ends = self._deadline() if request.deadline is not None else None

    def _deadline(self) -> float:
        request = self._request
        assert request.deadline is not None
        if request.attempt_timeout is None:
            return request.deadline
        return min(request.deadline, self._loop.time() + request.attempt_timeout)

    def slot_wait(self) -> float:
        """How long waiting for a connection may take (a streamed body: the route timeout)."""
        if self.ends is None:
            return self._request.route.timeout
        return max(self.ends - self._loop.time(), 0.0)

    async def connect(self, pool: AppPool) -> AppConnection:
        """A new connection, made before the attempt's deadline (nothing is sent yet)."""
        try:
            async with asyncio.timeout_at(self.ends):
                return await pool.connect()
        except TimeoutError:
            raise UpstreamFailure(
                Failure.CONNECT_TIMEOUT,
                errors.UPSTREAM_TIMEOUT,
                "the deadline passed while connecting to the upstream",
            ) from None

    def watch(self, response: AppResponse) -> None:
        """Fail `response` if its headers have not come by the deadline."""
        self._response = response
        if self.ends is not None:
            self._handle = self._loop.call_at(self.ends, self._expired)

    def stop(self) -> None:
        """The headers came, or the attempt is over: the deadline no longer matters."""
        self._response = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def body_sent(self) -> None:
        request = self._request
        if request.deadline is None:
            request.deadline = self._loop.time() + request.route.timeout
        self.ends = self._deadline()
        response = self._response
        if response is not None:  # still waiting for the headers: from now on, this long
            self.stop()
            self.watch(response)

    def _expired(self) -> None:
        self._handle = None
        response = self._response
        if response is not None:
            request = self._request
            limit = f"{request.route.timeout:g}s"
            if request.deadline is not None and self._loop.time() < request.deadline - 0.001:
                limit = f"{request.attempt_timeout:g}s (the per-try timeout)"
            response.abandon(
                UpstreamFailure(
                    Failure.TIMEOUT,
                    errors.UPSTREAM_TIMEOUT,
                    f"no response from the upstream within {limit}",
                )
            )
