"""The policy chain: what a request and a response look like to policies, and how they compose.

A policy is middleware (Starlette, aiohttp, Envoy's filters): it gets the request and the
next step of the chain, and either answers itself (a short-circuit: a replay, a 429, an open
breaker) or awaits `call_next` and may then look at or change the response on its way out.
Chains are folded once per route when the config is loaded; a route with no policies *is*
the forwarder, so pass-through costs nothing extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict

if TYPE_CHECKING:
    from aiohttp import web

    from sidecar.config import RouteConfig


SpanAttribute = tuple[str, str | int | float | bool]


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
    X-Forwarded-* already set): a policy adds or removes headers here. `body` is None while
    the body is still unread on the client connection (it then streams); a policy that must
    see the body (idempotency fingerprinting) reads it with `read_body()` and it is then
    sent from memory.
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
    # Time from sending the request upstream to its response headers (set by the forwarder).
    upstream_seconds: float | None = None
    # The trace this request belongs to (set by the tracing policy), for problem bodies.
    trace_id: str | None = None
    # Key/values every log line of this request carries (trace ids, set by tracing).
    log_fields: dict[str, object] = field(default_factory=dict)
    # Policy decisions to attach to this request's span; None when no span is exported.
    span_events: list[SpanEvent] | None = None
    # Called with (status, body bytes sent) once the response is completely sent.
    finishers: list[Callable[[int, int], None]] | None = None
    continue_sent: bool = False
    # Response body bytes written to the client so far.
    bytes_sent: int = 0

    def add_finisher(self, finish: Callable[[int, int], None]) -> None:
        if self.finishers is None:
            self.finishers = []
        self.finishers.append(finish)

    async def read_body(self, limit: int) -> bytes:
        """Buffer the whole request body (BodyTooLarge past `limit`, ClientStalled if the
        client stops sending); it is then sent upstream from memory."""
        if self.body is None:
            self.body = b"".join([chunk async for chunk in self.body_chunks(limit)])
        return self.body

    async def body_chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The client's body as it arrives, for streaming it upstream or buffering it.

        Answers `Expect: 100-continue` first (only now: whatever refused the request before
        this point did so without the client sending its body), bounds the silence between
        chunks by the route's idle_timeout, and stops at `limit` bytes.
        """
        raw = self.raw
        if not self.continue_sent and raw.headers.get("Expect", "").lower() == "100-continue":
            self.continue_sent = True
            await raw.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        idle = self.route.idle_timeout
        size = 0
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await raw.content.readany()
            except TimeoutError:
                raise ClientStalled(idle) from None
            if not chunk:
                return
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            yield chunk


@dataclass(slots=True, eq=False)
class ProxyResponse:
    """A response on its way back to the client.

    `body` is bytes for a response built in memory (a local answer or a replay), or an
    async iterator of chunks for a streamed upstream body; None means no body at all
    (HEAD, 204, 304). A policy that wants to record a streamed body wraps the iterator.
    `release` frees the upstream connection once the body is done or abandoned.
    """

    status: int
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None = None
    reason: str | None = None
    release: Callable[[], None] | None = None
    # A WebSocket session to relay instead of a body (the upgrade was accepted upstream).
    # Called with the client request and the response headers (request and trace ids).
    websocket: (
        Callable[[web.BaseRequest, CIMultiDict[str]], Awaitable[web.StreamResponse]] | None
    ) = None
    # Set when the sidecar answered because the upstream failed (502/504): what happened.
    failure: UpstreamFailure | None = None
    # True for answers the sidecar made itself (problems, replays): never the app's result.
    local: bool = False


class UpstreamFailure(Exception):
    """Why a request could not be forwarded: `kind` is the metric label, `problem` the answer."""

    def __init__(self, kind: str, problem: Problem, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Problem:
    """One entry of the error catalogue (see sidecar.errors)."""

    slug: str
    status: int
    title: str

    @property
    def type(self) -> str:
        return "urn:sidecar:problem:" + self.slug


class ClientStalled(Exception):
    """The client stopped sending its body for longer than the route's idle_timeout: 408."""

    def __init__(self, idle: float) -> None:
        super().__init__(f"no request body data for {idle:g}s")
        self.idle = idle


class BodyTooLarge(Exception):
    """The request body exceeded the route's limit: the client gets 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


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
