"""The forwarder: sends a ProxyRequest to the app and streams its answer back, byte for byte.

What "faithful" means here, and why each setting below exists:
- the request target is sent exactly as received (yarl `encoded=True`; no re-quoting);
- bodies are never decompressed (`auto_decompress=False`) nor re-chunked needlessly;
- aiohttp's client adds nothing the client did not send (`skip_auto_headers`), keeps no
  cookies between users (`DummyCookieJar`) and follows no redirects;
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
from typing import Any

import aiohttp
from aiohttp import hdrs
from yarl import URL

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
from sidecar.relaying import app_client, app_origin, app_response
from sidecar.websocket import WebSocketRelay, is_websocket_upgrade


@dataclass(slots=True)
class _BodyStream:
    """The client's body streamed upstream (see ProxyRequest.stream_body).

    The route's response deadline starts when the body has been sent (`on_sent`), as in
    Envoy: a large or slow upload is not a slow app. aiohttp sends the body from a task of
    its own, so why the body stopped is noted here for `forward` to report.
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


class _FaithfulClientRequest(aiohttp.ClientRequest):
    """aiohttp's request, minus the `Content-Length: 0` it invents for bodiless POST/DELETE.

    A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112 §6.3),
    so the header adds nothing but a difference from what the client sent.
    """

    def update_body_from_data(self, body: Any, *args: Any, **kwargs: Any) -> None:
        had_length = hdrs.CONTENT_LENGTH in self.headers
        super().update_body_from_data(body, *args, **kwargs)
        if body is None and not had_length:
            self.headers.popall(hdrs.CONTENT_LENGTH, None)


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

    __slots__ = ("_forwarder", "client", "upstream")

    def __init__(self, forwarder: Forwarder, client: asyncio.BaseTransport | None) -> None:
        self._forwarder = forwarder
        self.client = client
        self.upstream: aiohttp.ClientResponse | None = None

    def finish(self) -> None:
        """The response is done with: free its connection and its budget slot (once)."""
        forwarder = self._forwarder
        if self not in forwarder._exchanges:
            return
        if self.upstream is not None:
            self.upstream.release()
        forwarder._exchanges.discard(self)
        forwarder._budget.release()

    def cut(self) -> None:
        """The retired pool's deadline passed: end both connections so neither side hangs."""
        if self.upstream is not None and self.upstream.connection is not None:
            transport = self.upstream.connection.transport
            if transport is not None:
                transport.abort()
        if self.client is not None:
            self.client.abort()  # type: ignore[attr-defined]
        self.finish()


class Forwarder:
    """The terminal step of every chain: one pooled aiohttp client per process.

    A reload that changes the upstream retires this forwarder (`retire`): it takes no new
    requests, closes when its last response is done, and at the deadline cuts what is
    still open, so no stream is left hanging on a closed pool.
    """

    def __init__(self, config: UpstreamConfig, budget: ConnectionBudget | None = None) -> None:
        self.config = config
        self._origin = app_origin(config)  # made once: a request only appends its target
        self._budget = budget if budget is not None else ConnectionBudget(config.max_connections)
        self._exchanges: set[_Exchange] = set()
        # Requests of the config generations that use this forwarder, from the moment they
        # enter the chain until their response is done with (the handler counts them: a
        # request still reading its body or inside a policy has no exchange yet).
        self.users = 0
        self._drained: asyncio.Future[None] | None = None
        self.session = app_client(config, config.max_connections, _FaithfulClientRequest)
        # WebSocket sessions have connections of their own, never the request pool's.
        self.websockets = WebSocketRelay(config)

    def leave(self) -> None:
        """A request counted in `users` is done with (see ProxyHandler)."""
        self.users -= 1
        drained = self._drained
        if self.users == 0 and drained is not None and not drained.done():
            drained.set_result(None)

    def for_route(self, route: RouteConfig) -> Next:
        """The terminal step of one route's chain, its timeouts made once at config load.

        Failures come back as problem responses (with `failure` set), not exceptions, so
        they travel out through the chain like any response: tracing adds its headers,
        a breaker or retry policy sees what happened.
        """
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.config.connect_timeout,
            # Bounds every read, so also the silence between two chunks of a streamed body.
            sock_read=route.idle_timeout,
        )
        forward = self.forward

        async def terminal(request: ProxyRequest) -> ProxyResponse:
            try:
                return await forward(request, timeout)
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
        await self.session.close()

    async def retire(self, deadline: float) -> None:
        """No new request comes here: close the idle pooled connections now, close the
        rest once the requests under way (WebSocket sessions included) are done, or cut
        them at `deadline` (event-loop time) so their clients see the connection end."""
        self._close_idle_connections()
        loop = asyncio.get_running_loop()
        if self.users:
            self._drained = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                    await self._drained
        for exchange in list(self._exchanges):
            exchange.cut()
        await self.close()

    def _close_idle_connections(self) -> None:
        # Idle pooled connections would count against the budget the new pool shares.
        connector = self.session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        for connections in connector._conns.values():
            for protocol, _ in connections:
                protocol.close()
        connector._conns.clear()

    async def forward(
        self, request: ProxyRequest, client_timeout: aiohttp.ClientTimeout
    ) -> ProxyResponse:
        route = request.route
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
            request.deadline = loop.time() + route.timeout
        attempt = _AttemptTimer(request, loop)
        if isinstance(body, _BodyStream):
            body.on_sent = attempt.body_sent
        exchange = _Exchange(self, request.raw.transport)
        await self._take_slot(request, attempt)
        self._exchanges.add(exchange)
        request.upstream_sent = True  # from here on the app may see bytes of it
        sent_at = time.perf_counter()
        try:
            async with attempt.timer:
                upstream = await self.session.request(
                    request.method,
                    self.upstream_url(request.target),
                    headers=request.headers,
                    data=body,
                    # A buffered chunked body is sent chunked still, as the client framed it.
                    chunked=True if isinstance(body, bytes) and request.chunked else None,
                    allow_redirects=False,
                    timeout=client_timeout,
                )
        except BaseException as exc:
            exchange.finish()
            if isinstance(body, _BodyStream):
                body.raise_client_fault()
            if isinstance(exc, aiohttp.ClientError):
                # Before TimeoutError: aiohttp's socket timeouts are TimeoutErrors too.
                raise errors.classify_client_error(exc) from None
            if isinstance(exc, TimeoutError):
                raise attempt.timed_out() from None
            raise
        exchange.upstream = upstream
        request.upstream_seconds = time.perf_counter() - sent_at
        return app_response(request.method, upstream, exchange.finish)

    async def _take_slot(self, request: ProxyRequest, attempt: _AttemptTimer) -> None:
        """A budget slot, waiting at most until the attempt's deadline (nothing sent yet)."""
        if self._budget.try_acquire():
            return
        try:
            async with asyncio.timeout(attempt.slot_wait()):
                await self._budget.acquire()
        except TimeoutError:
            raise UpstreamFailure(
                Failure.POOL,
                errors.UPSTREAM_POOL_EXHAUSTED,
                f"all {self._budget.limit} upstream connections stayed busy",
            ) from None

    def upstream_url(self, target: str) -> URL:
        return URL(self._origin + target, encoded=True)

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


class _AttemptTimer:
    """The deadline of one attempt: the request's deadline, or the attempt's own timeout
    if sooner. For a streamed body it starts once the body has been sent."""

    __slots__ = ("_loop", "_request", "timer")

    def __init__(self, request: ProxyRequest, loop: asyncio.AbstractEventLoop) -> None:
        self._request = request
        self._loop = loop
        self.timer = asyncio.Timeout(self._ends() if request.deadline is not None else None)

    def _ends(self) -> float:
        request = self._request
        assert request.deadline is not None
        if request.attempt_timeout is None:
            return request.deadline
        return min(request.deadline, self._loop.time() + request.attempt_timeout)

    def slot_wait(self) -> float:
        """How long waiting for a connection may take (a streamed body: the route timeout)."""
        if self._request.deadline is None:
            return self._request.route.timeout
        return max(self._ends() - self._loop.time(), 0.0)

    def body_sent(self) -> None:
        request = self._request
        if request.deadline is None:
            request.deadline = self._loop.time() + request.route.timeout
        # The app may have answered (and the timer been left) before the body ended.
        with contextlib.suppress(RuntimeError):
            self.timer.reschedule(self._ends())

    def timed_out(self) -> UpstreamFailure:
        return UpstreamFailure(
            Failure.TIMEOUT,
            errors.UPSTREAM_TIMEOUT,
            f"no response from the upstream within {self._request.route.timeout:g}s",
        )


def _nothing() -> None:
    pass
