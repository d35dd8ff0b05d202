"""The policy chain: what a request and a response look like to policies, and how they compose.

A policy is middleware (Starlette, aiohttp, Envoy's filters): it gets the request and the
next step of the chain, and either answers itself (a short-circuit: a replay, a 429, an open
breaker) or awaits `call_next` and may then look at or change the response on its way out.
Chains are folded once per route when the config is loaded; a route with no policies *is*
the forwarder, so pass-through costs nothing extra.

What the core offers every policy (docs/architecture.md shows each in use):
- an `Outcome` per request, given to finishers once the response is completely sent or
  abandoned (status, failure kind, duration, bytes, whether the upstream saw a byte);
- `ProxyResponse.aclose()`, the one way to discard a response (connection, body, WebSocket);
- replayable request bodies: a buffered body can be sent again, a streamed one cannot;
- an absolute deadline per request and a per-attempt timeout the forwarder honours;
- the origin of every response (app, sidecar, replay, fallback);
- policy state that survives a reload (`sidecar.policies.base.PolicyState`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from multidict import CIMultiDict

if TYPE_CHECKING:
    from sidecar.config import RouteConfig


SpanAttribute = tuple[str, str | int | float | bool]
# The interim response that asks a client to send its body (RFC 9110 §15.2.1).
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Marks a client request that was sent CONTINUE (an interim answer, not the response).
CONTINUE_SENT = web.RequestKey("sidecar.continue_sent", bool)


class Origin(enum.Enum):
    """Who made a response. Only APP answers are the app's result (idempotency stores
    only those; a breaker counts only those)."""

    APP = "app"
    SIDECAR = "sidecar"  # a problem answer or another answer of the sidecar's own
    REPLAY = "replay"  # a stored response replayed by idempotency
    FALLBACK = "fallback"  # a configured stand-in for the app (an open breaker's)


class Failure:
    """Failure kinds: what went wrong with a request, the label of
    `sidecar_upstream_errors_total` and `Outcome.failure`."""

    NONE = "none"
    CONNECT = "connect"  # the upstream refused or could not be reached: nothing was sent
    CONNECT_TIMEOUT = "connect_timeout"  # connecting took too long: nothing was sent
    POOL = "pool"  # no pooled connection became free in time: nothing was sent
    TIMEOUT = "timeout"  # no response headers within the deadline
    RESET = "reset"  # the upstream closed the connection before the response headers
    BAD_RESPONSE = "bad_response"  # the upstream's answer was not valid HTTP/1.1
    STREAM = "stream"  # the response body broke off midway (after the status was sent)
    CLIENT_GONE = "client_gone"  # the client went away before the response was complete
    SHUTDOWN = "shutdown"  # cancelled at the shutdown deadline
    INTERNAL = "internal"  # the sidecar itself failed (a bug): 500

    # Kinds that prove no request byte reached the upstream: always safe to try again.
    NOT_SENT = frozenset({CONNECT, CONNECT_TIMEOUT, POOL})

    # The app's failures as `circuit_breaker.failures` and `retry.on` name them. A pool
    # timeout is the sidecar's own congestion, not the app's: a retry may add it.
    CONFIG_NAMES = {
        CONNECT: "connect_error",
        CONNECT_TIMEOUT: "connect_error",
        TIMEOUT: "timeout",
        RESET: "reset",
        BAD_RESPONSE: "reset",
        STREAM: "stream",
    }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request, known once its response is completely sent or abandoned.

    `request_sent` is False only when the sidecar knows no byte of the request reached
    the upstream (it was answered locally, or the failure is one of Failure.NOT_SENT);
    otherwise the upstream may have acted on it.
    """

    status: int
    failure: str
    origin: Origin
    duration: float
    bytes_in: int
    bytes_out: int
    request_sent: bool

    @property
    def ok(self) -> bool:
        """The app answered and the whole response reached the client."""
        return self.failure == Failure.NONE and self.origin is Origin.APP


Finisher = Callable[[Outcome], None]


@dataclass(frozen=True, slots=True)
class SpanEvent:
    """A policy decision recorded on the request's span (quota.denied, breaker.opened...)."""

    name: str
    time_ns: int
    attributes: tuple[SpanAttribute, ...] = ()


@dataclass(slots=True, eq=False)
class ProxyRequest:
    """One client request on its way upstream.

    `headers` are the headers that will be sent upstream (hop-by-hop ones already removed,
    X-Forwarded-* already set): a policy adds or removes headers here.

    The body: `body` holds it once buffered (then it can be sent any number of times: a
    retry resends it); a body too large to buffer streams from the client connection, and
    can then be sent only once (`replayable` turns False and the forwarder refuses a second
    send rather than send an empty body). A policy that must see the body (idempotency
    fingerprinting) reads it with `read_body()`.
    """

    method: str
    # The request target exactly as the client sent it (origin-form): path and query.
    target: str
    # The path part of `target`, still percent-encoded.
    path: str
    headers: CIMultiDict[str]
    route: RouteConfig
    request_id: str
    client_ip: str
    raw: web.BaseRequest
    body: bytes | None = None
    # Set once any of the client's body has been streamed upstream (it cannot be resent).
    body_streamed: bool = False
    # Absolute event-loop time by which the response headers must have arrived. Set by the
    # forwarder from the route's timeout when the body is in hand (as in Envoy, a slow
    # upload is not a slow app); a policy may set it earlier, never later.
    deadline: float | None = None
    # Upper bound for one attempt (a retry policy's per-try timeout); the forwarder uses
    # the earlier of this and `deadline`.
    attempt_timeout: float | None = None
    # Whether a byte of the request may have reached the upstream (set by the forwarder).
    upstream_sent: bool = False
    # Set by a policy that makes sending the request again harmless whatever its method
    # (idempotency, holding the key's claim): the retry policy may then resend it.
    retry_safe: bool = False
    # Time from sending the request upstream to its response headers (set by the forwarder).
    upstream_seconds: float | None = None
    # The trace this request belongs to (set by the tracing policy), for problem bodies.
    trace_id: str | None = None
    # Key/values every log line of this request carries (trace ids, set by tracing).
    log_fields: dict[str, object] = field(default_factory=dict)
    # Policy decisions to attach to this request's span; None when no span is exported.
    span_events: list[SpanEvent] | None = None
    # Called with the request's Outcome once the response is completely sent or abandoned.
    finishers: list[Finisher] | None = None
    # Set by the core once the response is completely sent or abandoned (the finishers ran).
    finished: bool = False
    # Response body bytes written to the client so far.
    bytes_sent: int = 0
    # Request body bytes read from the client so far.
    bytes_received: int = 0
    # What buffer_body read of a body too large to buffer, and the rest of it.
    _partial: tuple[list[bytes], AsyncIterator[bytes]] | None = None

    def add_finisher(self, finish: Finisher) -> None:
        if self.finishers is None:
            self.finishers = []
        self.finishers.append(finish)

    def after_response(self, work: Callable[[], object]) -> None:
        """Run `work` once the response is completely sent or abandoned, or at once if it
        already is (the client left while a shielded upstream call went on): what the
        answer does not wait for (a store write of its outcome) is then done after its
        bytes went out, not before them."""
        if self.finished:
            work()
        else:
            self.add_finisher(partial(_run_after_response, work))

    @property
    def chunked(self) -> bool:
        """The client framed its body with chunked transfer coding."""
        return self.raw.headers.get("Transfer-Encoding") is not None

    @property
    def replayable(self) -> bool:
        """Whether the request can be sent (again): no body, a buffered one, or one not
        yet streamed (the forwarder will buffer it if it is small enough)."""
        return not self.body_streamed

    def time_left(self) -> float | None:
        """Seconds until `deadline` (negative once past it), or None with no deadline yet."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    async def read_body(self, limit: int) -> bytes:
        """Buffer the whole request body (BodyTooLarge past `limit`, ClientStalled if the
        client is too slow); it is then sent upstream from memory, as often as needed."""
        await self.buffer_body(limit, limit)
        assert self.body is not None
        return self.body

    async def buffer_body(self, buffer_limit: int, limit: int) -> bool:
        """Read the body into `body` if it is at most `buffer_limit` bytes; True if it was.

        A larger body is left half-read: `stream_body()` then sends what was read and the
        rest as it arrives. BodyTooLarge past `limit`, ClientStalled if the client is slow.
        """
        if self.body is not None:
            return True
        if self.body_streamed:
            raise BodyNotReplayable()
        if self._partial is not None:
            return False
        chunks = self.body_chunks(limit)
        read: list[bytes] = []
        size = 0
        async for chunk in chunks:
            read.append(chunk)
            size += len(chunk)
            if size > buffer_limit:
                self._partial = (read, chunks)
                return False
        self.body = b"".join(read)
        return True

    def stream_body(self, limit: int) -> AsyncIterator[bytes]:
        """The body for sending once, as it arrives (after what `buffer_body` read).

        It counts as sent only once the first chunk is taken: an attempt that failed
        before sending anything (connect, pool) leaves the body replayable.
        """
        if self.body_streamed:
            raise BodyNotReplayable()
        return self._stream_once(limit)

    async def _stream_once(self, limit: int) -> AsyncIterator[bytes]:
        if self.body_streamed:
            raise BodyNotReplayable()
        self.body_streamed = True
        if self._partial is None:
            chunks = self.body_chunks(limit)
        else:
            read, rest = self._partial
            self._partial = None
            chunks = chain_chunks(read, rest)
        async for chunk in chunks:
            yield chunk

    async def body_chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The client's body as it arrives, for streaming it upstream or buffering it.

        Answers `Expect: 100-continue` first (only now: whatever refused the request before
        this point did so without the client sending its body). Two bounds keep a slow
        client from holding resources (see UploadPace): the silence between chunks
        (the route's idle_timeout) and a minimum average rate. Stops at `limit` bytes.
        """
        raw = self.raw
        if CONTINUE_SENT not in raw and raw.headers.get("Expect", "").lower() == "100-continue":
            raw[CONTINUE_SENT] = True
            await raw.writer.write(CONTINUE)
        route = self.route
        pace = UploadPace(route.body_timeout, route.min_upload_rate, route.idle_timeout)
        size = 0
        while True:
            try:
                async with asyncio.timeout(pace.wait_limit(size)):
                    chunk = await raw.content.readany()
            except TimeoutError:
                raise ClientStalled(pace.reason(size)) from None
            if not chunk:
                return
            size += len(chunk)
            self.bytes_received = size
            if size > limit:
                raise BodyTooLarge(limit)
            yield chunk


async def chain_chunks(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks already read, then the rest of the iterator they came from."""
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


class UploadPace:
    """How long the next body chunk may take: the silence bound, and a minimum rate.

    The rate rule is Apache mod_reqtimeout's `body=T,MinRate=R`: the body must be complete
    within T seconds, extended by one second per R bytes received, so a large upload at
    any honest speed is never cut while one byte a minute is (in T seconds).
    """

    __slots__ = ("_grace", "_idle", "_rate", "_started")

    def __init__(self, grace: float, rate: int, idle: float) -> None:
        self._grace = grace
        self._rate = rate
        self._idle = idle
        self._started = asyncio.get_running_loop().time()

    def wait_limit(self, received: int) -> float:
        if self._rate <= 0:
            return self._idle
        allowed_until = self._started + self._grace + received / self._rate
        left = allowed_until - asyncio.get_running_loop().time()
        return max(0.0, min(self._idle, left))

    def reason(self, received: int) -> str:
        if self._rate > 0 and self.wait_limit(received) < self._idle:
            return (
                f"the request body arrived slower than {self._rate} bytes/s"
                f" (after {self._grace:g}s; the route's min_upload_rate)"
            )
        return f"no request body data arrived for {self._idle:g}s (the route's idle_timeout)"


@dataclass(slots=True, eq=False)
class ProxyResponse:
    """A response on its way back to the client.

    `body` is bytes for a response built in memory (a local answer or a replay), or an
    async iterator of chunks for a streamed upstream body; None means no body at all
    (HEAD, 204, 304). A policy that wants to record a streamed body wraps the iterator.
    A policy that does not pass a response on (a retry, a fallback) discards it with
    `aclose()`, which frees whatever the response holds.
    """

    status: int
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None = None
    reason: str | None = None
    # Frees the upstream connection (reused only if the body was read to its end).
    release: Callable[[], None] | None = None
    # A WebSocket session to relay instead of a body (the upgrade was accepted upstream).
    # Called with the client request and the response headers (request and trace ids).
    websocket: (
        Callable[[web.BaseRequest, CIMultiDict[str]], Awaitable[web.StreamResponse]] | None
    ) = None
    # Closes what `websocket` would relay (the upstream WebSocket) if it is never relayed.
    closer: Callable[[], Awaitable[None]] | None = None
    # Set when the sidecar answered because the upstream failed (502/504): what happened.
    failure: UpstreamFailure | None = None
    origin: Origin = Origin.APP

    @property
    def local(self) -> bool:
        """True for answers the sidecar made itself (problems, replays, fallbacks)."""
        return self.origin is not Origin.APP

    @property
    def holds_resources(self) -> bool:
        """Whether aclose() has anything to free (a body in memory holds nothing)."""
        body = self.body
        return (
            self.release is not None
            or self.closer is not None
            or (body is not None and not isinstance(body, bytes))
        )

    async def aclose(self) -> None:
        """Discard this response: close a streamed body, release the upstream connection
        (closed, not pooled, since its body was not read to the end), close an upstream
        WebSocket. Safe to call more than once."""
        body, self.body = self.body, None
        release, self.release = self.release, None
        closer, self.closer = self.closer, None
        self.websocket = None
        try:
            if body is not None and not isinstance(body, bytes):
                close = getattr(body, "aclose", None)
                if close is not None:
                    await close()
        finally:
            # Whatever a body wrapper does on closing, the connection and its slot go back.
            if release is not None:
                release()
            if closer is not None:
                await closer()


class UpstreamFailure(Exception):
    """Why a request could not be forwarded: `kind` (a Failure) and the problem to answer."""

    def __init__(self, kind: str, problem: Problem, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.problem = problem
        self.detail = detail

    @property
    def request_sent(self) -> bool:
        return self.kind not in Failure.NOT_SENT


@dataclass(frozen=True, slots=True)
class Problem:
    """One entry of the error catalogue (see sidecar.errors)."""

    slug: str
    status: int
    title: str

    @property
    def type(self) -> str:
        return "urn:sidecar:problem:" + self.slug


class UpstreamBodyBroken(Exception):
    """Raised by a streamed response body when the app's body breaks off after its headers
    (failure kind `stream`): a policy reading the body learns the app's outcome is unknown."""


class ClientStalled(Exception):
    """The client sent its body too slowly (idle_timeout, min_upload_rate): 408."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BodyTooLarge(Exception):
    """The request body exceeded the route's limit: the client gets 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class BodyNotReplayable(Exception):
    """A second send of a body that was streamed (and so is gone): a policy's mistake,
    refused rather than sending an empty or partial body."""

    def __init__(self) -> None:
        super().__init__("the request body was streamed upstream once and cannot be resent")


Next = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Policy(Protocol):
    """One link of a route's chain."""

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse: ...


def build_chain(policies: Sequence[Policy], terminal: Next) -> Next:
    """Fold policies around the terminal step: the first policy sees the request first."""
    chain = terminal
    for policy in reversed(policies):
        chain = partial(policy, call_next=chain)
    return chain


def _run_after_response(work: Callable[[], object], _outcome: Outcome) -> None:
    work()
