"""One keep-alive HTTP/1.1 connection to the app, and the one exchange it carries at a time.

The response is parsed by llhttp (through httptools), the parser Node.js and uvicorn use;
everything llhttp leaves to its caller is done here, each with a test:
- a response to HEAD, and 304, end at their headers whatever Content-Length says (llhttp
  cannot know the request was HEAD), and a fresh parser reads every response;
- `100 Continue` is consumed, `103 Early Hints` relayed to the client as it comes, and
  `101` is a malformed answer (this client never asks to upgrade: WebSocket sessions
  have a relay of their own);
- a body with neither Content-Length nor chunking ends when the connection closes;
- trailer fields after a chunked body are dropped;
- the whole head is bounded (`upstream.max_response_header_size`), also while one field
  is still arriving;
- a connection goes back to the pool only after a complete, well-framed response whose
  request body was sent whole; any byte the app sends unasked closes it.

Nothing here ever sends a request twice. Whether a failure left the request unsent is the
caller's knowledge (it wrote nothing before this module's `send`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Protocol, cast

import httptools

from sidecar import errors
from sidecar.chain import (
    BodyTooLarge,
    ClientStalled,
    Failure,
    UpstreamBodyBroken,
    UpstreamFailure,
)
from sidecar.relaying import HOP_BY_HOP

# Response body bytes held while the client is slower than the app: past this, reading
# from the app pauses until the client has taken what is held (backpressure).
HIGH_WATER = 256 * 1024

Header = tuple[str, str]
HeaderPairs = list[Header]


class Pool(Protocol):
    """What a connection tells the pool it belongs to."""

    def lost(self, connection: AppConnection) -> None: ...


class _Garbage(Exception):
    """The app sent bytes after a complete response: the connection is out of step."""


class AppConnection(asyncio.Protocol):
    """A TCP (or TLS) connection to the app; `send` starts one exchange on it."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        # The app closed its side, or the connection is lost: never reusable again.
        self.closed = False
        # Event-loop time it went back to the pool (None while in use).
        self.idle_since: float | None = None
        self._exchange: AppResponse | None = None
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes nobody asked for on an idle connection: the app is out of step.
            self.abort()
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        self.closed = True
        if self._exchange is not None:
            self._exchange.ended()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._exchange is not None:
            self._exchange.ended()
        self._wake_writer()
        self._pool.lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- for the pool and the forwarder --------------------------------------------------

    @property
    def usable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def send(
        self,
        head: bytes,
        body: bytes | None,
        *,
        head_only: bool,
        header_limit: int,
        idle_timeout: float,
        early_hints: Callable[[bytes], None] | None,
    ) -> AppResponse:
        """Write a request (its head and a body in memory) and start reading its response."""
        transport = self.transport
        assert transport is not None and self._exchange is None
        self.idle_since = None
        exchange = AppResponse(self, head_only, header_limit, idle_timeout, early_hints)
        self._exchange = exchange
        if body:
            transport.writelines((head, body))
        else:
            transport.write(head)
        return exchange

    def done(self, exchange: AppResponse) -> None:
        """The exchange is over; the pool decides what happens to the connection."""
        if self._exchange is exchange:
            self._exchange = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while the app is not reading what we write (at most `timeout` seconds)."""
        if not self._writing_paused or self.closed:
            return
        drained = self._drained = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await drained
        finally:
            self._drained = None

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close at once, dropping anything unsent (a connection in an unknown state)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close an idle connection politely."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake_writer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)


class AppResponse:
    """The app's response to one request: llhttp's callbacks, the body as it arrives,
    and whether the connection may carry another request afterwards."""

    __slots__ = (
        "_body_sent",
        "_body_task",
        "_body_waiter",
        "_buffered",
        "_chunks",
        "_connection",
        "_early_hints",
        "_error",
        "_fed_head",
        "_head_only",
        "_head_size",
        "_header_limit",
        "_headers_ready",
        "_idle_timeout",
        "_parser",
        "_paused",
        "_reason",
        "_reusable",
        "complete",
        "headers",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(
        self,
        connection: AppConnection,
        head_only: bool,
        header_limit: int,
        idle_timeout: float,
        early_hints: Callable[[bytes], None] | None,
    ) -> None:
        self._connection = connection
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._header_limit = header_limit
        self._idle_timeout = idle_timeout
        self._early_hints = early_hints
        self._headers_ready: asyncio.Future[None] = connection.loop.create_future()
        self._fed_head = 0  # bytes fed before the final headers: all of them head bytes
        self._head_size = 0
        self._reason = b""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_task: asyncio.Task[None] | None = None
        self._body_sent = True  # until a streamed body is started (send_body)
        self._error: BaseException | None = None
        self._reusable = True
        self.status = 0
        self.reason = ""
        self.headers: HeaderPairs = []
        self.keep_alive = False
        # The whole response has arrived (its body, if any, is in the buffer).
        self.complete = False

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.status:
            raise _Garbage()  # a second message after the final response

    def on_status(self, reason: bytes) -> None:
        self._reason = reason
        self._count(len(reason) + 15)  # "HTTP/1.1 200 " and CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a trailer field after a chunked body: dropped
        self._count(len(name) + len(value) + 4)
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._interim(status)
            return
        self.status = status
        self.reason = self._reason.decode("utf-8", "surrogateescape")
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only or status == 304:
            self.complete = True
        if not self._headers_ready.done():
            self._headers_ready.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self.complete:
            raise _Garbage()  # body bytes for a response that has none (HEAD, 304)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.status:  # (an interim response's end is not the response's)
            self.complete = True
            self._wake_body()

    # -- fed by the connection -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if not self.status:
            # Before the final headers every byte fed was a head byte: this bounds a head
            # whose one field never ends, which the per-field count cannot see.
            if self._fed_head > self._header_limit:
                self._fail(self._head_too_large())
                return
            self._fed_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Garbage) and self.complete:
                self._reusable = False
                return
            if isinstance(cause, UpstreamFailure):
                self._fail(cause)
                return
            self._fail(_bad_response("it sent bytes after its response"))
        except httptools.HttpParserUpgrade:
            self._fail(_bad_response("it switched protocols unasked"))
        except httptools.HttpParserError as exc:
            # llhttp's reasons are fixed texts ("Duplicate Content-Length"): safe to show.
            self._fail(_bad_response(str(exc).rstrip(".")))

    def ended(self) -> None:
        """The app closed the connection (or it was lost)."""
        if self.complete or self._error is not None:
            return
        if not self.status:
            self._fail(
                UpstreamFailure(
                    Failure.RESET,
                    errors.UPSTREAM_RESET,
                    "the upstream closed the connection before the response headers",
                )
            )
        elif self._ends_at_close():
            self.complete = True
            self._reusable = False
            self._wake_body()
        else:
            self._fail(UpstreamBodyBroken("the upstream closed the connection mid-body"))

    # -- for the forwarder ---------------------------------------------------------------

    async def headers_received(self) -> None:
        """Wait for the final response headers (UpstreamFailure if they never come)."""
        await self._headers_ready

    def abandon(self, error: BaseException) -> None:
        """Give up waiting for the headers (the attempt's deadline): `error` is raised."""
        if not self._headers_ready.done():
            self._fail(error)

    def send_body(self, chunks: AsyncIterable[bytes], chunked: bool) -> None:
        """Stream the request body from its own task, so an early answer is read meanwhile."""
        self._body_sent = False
        self._body_task = self._connection.loop.create_task(self._write_body(chunks, chunked))

    def take_body(self) -> bytes:
        """Everything of the body that has arrived (and let the app send more)."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # b"" when none
        chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._connection.resume_reading()
        return data

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def head_only(self) -> bool:
        """The request was HEAD: the response has no body, whatever its headers say."""
        return self._head_only

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever has come each time, so server-sent events
        reach the client as each is written. UpstreamBodyBroken if it breaks off."""
        while True:
            if self._chunks:
                yield self.take_body()
            elif self.complete:
                return
            elif self._error is not None:
                error = self._error
                if isinstance(error, UpstreamBodyBroken):
                    raise error
                raise UpstreamBodyBroken(str(error))
            else:
                await self._wait_body()

    def release(self) -> bool:
        """The response is done with. True if the connection may carry another request:
        the response came whole, the request body went whole, and neither side said close."""
        connection = self._connection
        connection.done(self)
        task = self._body_task
        if task is not None and not task.done():
            task.cancel()  # the app answered before taking the whole body
        reusable = (
            self.complete
            and self._reusable
            and self.keep_alive
            and self._body_sent
            and self._error is None
            and not self._chunks
        )
        if reusable:
            return True
        if self.complete and self._body_sent and self._error is None:
            connection.close()  # a whole exchange; the app (or its framing) said close
        else:
            connection.abort()
        return False

    # -- inside ------------------------------------------------------------------------

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._header_limit:
            raise self._head_too_large()

    def _head_too_large(self) -> UpstreamFailure:
        return _bad_response(f"its response head is larger than {self._header_limit} bytes")

    def _interim(self, status: int) -> None:
        if status == 101:
            raise _bad_response("it answered 101 Switching Protocols to a request without Upgrade")
        early_hints = self._early_hints
        if status == 103 and early_hints is not None:
            early_hints(_interim_head(status, self._reason, self.headers))
        self.headers = []  # `100 Continue` (and any other 1xx) is consumed

    def _ends_at_close(self) -> bool:
        """A response framed by neither Content-Length nor chunking (RFC 9112 §6.3)."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                return False
            if lowered == "transfer-encoding" and value.rsplit(",", 1)[-1].strip().lower() == (
                "chunked"
            ):
                return False
        return True

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._reusable = False
        ready = self._headers_ready
        if not ready.done():
            ready.set_exception(error)
        self._wake_body()
        self._connection.abort()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_body(self) -> None:
        loop = self._connection.loop
        waiter = self._body_waiter = loop.create_future()
        timer = loop.call_later(self._idle_timeout, self._idle_expired, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._body_waiter = None

    def _idle_expired(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(
                UpstreamBodyBroken(
                    f"the upstream sent no body data for {self._idle_timeout:g}s"
                    " (the route's idle_timeout)"
                )
            )

    async def _write_body(self, chunks: AsyncIterable[bytes], chunked: bool) -> None:
        """Send a streamed request body; a failure ends the exchange (never raised here:
        the forwarder learns it from `headers_received` or the body)."""
        connection = self._connection
        try:
            async for chunk in chunks:
                if connection.closed:
                    return  # the app went away: its side of the exchange says how
                if chunked:
                    connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    connection.write(chunk)
                await connection.drain(self._idle_timeout)
            if chunked:
                connection.write(b"0\r\n\r\n")
            self._body_sent = True
        except (BodyTooLarge, ClientStalled) as fault:
            self._fail(fault)  # the forwarder answers the client's fault (413, 408)
        except TimeoutError:
            self._fail(
                UpstreamFailure(
                    Failure.TIMEOUT,
                    errors.UPSTREAM_TIMEOUT,
                    f"the upstream read none of the request body for {self._idle_timeout:g}s",
                )
            )
        except Exception:
            # The client went away mid-upload (aiohttp reports it as a payload error).
            self._fail(ClientStalled("the request body broke off before its end"))


def _bad_response(why: str) -> UpstreamFailure:
    return UpstreamFailure(
        Failure.BAD_RESPONSE,
        errors.UPSTREAM_BAD_RESPONSE,
        f"the upstream's response is not valid HTTP/1.1: {why}",
    )


def _interim_head(status: int, reason: bytes, headers: HeaderPairs) -> bytes:
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP:  # relayed without the hop-by-hop fields
            lines.append(
                b"%b: %b\r\n" % (name.encode("latin-1"), value.encode("utf-8", "surrogateescape"))
            )
    lines.append(b"\r\n")
    return b"".join(lines)
