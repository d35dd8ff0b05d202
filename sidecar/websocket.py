"""WebSocket relay: the upgrade is asked of the app first, then frames are pumped both ways.

What a session looks like to each side:
- The handshake upstream is the sidecar's own (aiohttp's `ws_connect` keeps nothing of a
  refusal but its status): the client's request goes to the app with a fresh key. Any answer
  but a valid 101 is the app's answer to the client, like any response (a 401 with its
  `WWW-Authenticate` and body, a 302 with its `Location`), with origin APP.
- The app's 101 headers (`Set-Cookie`, its own) are on the client's 101; only the per-hop
  handshake headers are made afresh, and the subprotocol is the one the app chose.
- Frames travel as they are: text (not decoded), binary, pings and pongs with their payloads,
  close codes and reasons both ways (autoping, autoclose and compression off on both ends).
- The sidecar pings a client that has been silent for `websocket_heartbeat` and ends the
  session when the pong does not come within `websocket_pong_timeout`; those pongs stay
  with the sidecar (its ping payload is recognised). A session that carried no frame either
  way for `websocket_idle_timeout` is closed both ways with 1001 (heartbeats do not count).
- A session holds one connection to the app for as long as it lasts, so WebSocketRelay has
  a connector of its own: sessions never take (or starve) the request pool.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Literal

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http import WS_KEY, WebSocketError, WebSocketReader, WebSocketWriter
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import errors
from sidecar.chain import Failure, ProxyRequest, ProxyResponse, UpstreamFailure
from sidecar.config import UpstreamConfig
from sidecar.relaying import (
    app_client,
    app_response,
    app_url,
    connection_tokens,
    strip_hop_by_hop,
)

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
ClientSide = web.WebSocketResponse[Literal[False]]
AppSide = aiohttp.ClientWebSocketResponse[Literal[False]]

# The client's handshake headers the sidecar replaces with its own for the app's hop (the
# client's subprotocol offer goes on as it is; no extension is offered, see the module doc).
_CLIENT_HANDSHAKE = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
)
# The app's 101 headers aiohttp's server makes afresh for the client's hop.
_APP_HANDSHAKE = (
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "content-length",
)
_VERSIONS = frozenset({"13", "8", "7"})  # what aiohttp's server accepts from a client
# aiohttp's client would otherwise invent these for every request.
# How long one side's close handshake may take (its reply to our close frame); the whole
# close of a session is bounded by twice this, then both connections are cut.
CLOSE_TIMEOUT = 5.0
_READ_LIMIT = 2**16
_NORMAL = 1000
_GOING_AWAY = 1001
_INTERNAL_ERROR = 1011


def is_websocket_upgrade(headers: Headers) -> bool:
    """A handshake needs both `Upgrade: websocket` and the `upgrade` Connection option."""
    upgrade = headers.get(hdrs.UPGRADE)
    if upgrade is None or upgrade.strip().lower() != "websocket":
        return False
    return "upgrade" in connection_tokens(headers)


class WebSocketRelay:
    """Opens WebSocket sessions to the app and relays them; one per forwarder.

    `connect` is the forwarder's answer to an upgrade request: the app's refusal as a plain
    response, or a 101 whose `websocket` callable relays the session once the client is
    upgraded (and whose `closer` closes the app's side if the chain discards it instead).
    `close` ends every live session with 1001 both ways, then the connections.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        # One connection per session, for as long as it lasts: no pool limit.
        self._session = app_client(config, limit=0)
        self._closed = False
        # Upgraded upstream, not yet relayed or discarded.
        self._pending: set[_Upgraded] = set()
        self._sessions: set[_Session] = set()
        # Closing handshakes under way (strong references: a task may outlive its session).
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def sessions(self) -> int:
        """WebSocket sessions being relayed now."""
        return len(self._sessions)

    async def connect(self, request: ProxyRequest) -> ProxyResponse:
        """Ask the app for the upgrade; its answer, or a problem if it could not be asked."""
        if self._closed:
            failure = UpstreamFailure(
                Failure.SHUTDOWN,
                errors.UPSTREAM_CONNECT_FAILED,
                "the sidecar is shutting down and opens no new WebSocket sessions",
            )
            return errors.failure_response(request, failure)
        if not _valid_client_handshake(request.raw.headers):
            return errors.problem_for(
                errors.BAD_REQUEST,
                request,
                detail="a WebSocket upgrade needs a Sec-WebSocket-Key of 16 bytes"
                " and Sec-WebSocket-Version 13",
            )
        key = base64.b64encode(os.urandom(16)).decode()
        loop = asyncio.get_running_loop()
        route = request.route
        if request.deadline is None:
            request.deadline = loop.time() + route.timeout
        ends = request.deadline
        if request.attempt_timeout is not None:
            ends = min(ends, loop.time() + request.attempt_timeout)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.connect_timeout, sock_read=route.idle_timeout
        )
        request.upstream_sent = True
        sent_at = time.perf_counter()
        try:
            async with asyncio.timeout_at(ends):
                upstream = await self._session.request(
                    request.method,
                    app_url(self.config, request.target),
                    headers=_upstream_handshake(request.headers, key),
                    allow_redirects=False,
                    timeout=timeout,
                )
        except aiohttp.ClientError as exc:
            # Before TimeoutError: aiohttp's socket timeouts are TimeoutErrors too.
            return errors.failure_response(request, errors.classify_client_error(exc))
        except TimeoutError:
            failure = UpstreamFailure(
                Failure.TIMEOUT,
                errors.UPSTREAM_TIMEOUT,
                f"no answer to the WebSocket upgrade within {route.timeout:g}s",
            )
            return errors.failure_response(request, failure)
        request.upstream_seconds = time.perf_counter() - sent_at
        if upstream.status != 101:
            # The app did not upgrade: its answer goes to the client like any other.
            return app_response(request.method, upstream, upstream.release)
        offered = _protocols(request.headers)
        problem = _invalid_101(upstream.headers, key, offered)
        if problem is not None:
            upstream.close()
            failure = UpstreamFailure(Failure.BAD_RESPONSE, errors.UPSTREAM_BAD_RESPONSE, problem)
            return errors.failure_response(request, failure)
        chosen = upstream.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL)
        chosen = chosen.strip() if chosen else None
        app = _open_app_side(upstream, chosen, self.config.websocket_max_message, loop)
        upgraded = _Upgraded(self, request, app, upstream, chosen)
        self._pending.add(upgraded)
        return ProxyResponse(
            101,
            _relayed_101_headers(upstream.headers),
            reason=upstream.reason,
            websocket=upgraded.relay,
            closer=upgraded.discard,
        )

    async def close(self, reason: str = "sidecar shutting down") -> None:
        """End every live session with 1001 and `reason` both ways (the app's side of
        upgrades not yet relayed too), wait for those closes (bounded), then close the
        connections. No session starts after this; calling it again is harmless."""
        self._closed = True
        work = [session.shut_down(reason) for session in list(self._sessions)]
        work += [upgraded.discard(reason) for upgraded in list(self._pending)]
        await asyncio.gather(*work, return_exceptions=True)
        if self._closing:  # closes begun by sessions that ended (or were cancelled) meanwhile
            await asyncio.wait(set(self._closing), timeout=2 * CLOSE_TIMEOUT + 1)
        await self._session.close()


class _Upgraded:
    """The app's side of an accepted upgrade, until the client is upgraded too (or not)."""

    __slots__ = ("_app", "_protocol", "_relay", "_request", "_response", "_taken")

    def __init__(
        self,
        relay: WebSocketRelay,
        request: ProxyRequest,
        app: AppSide,
        response: aiohttp.ClientResponse,
        protocol: str | None,
    ) -> None:
        self._relay = relay
        self._request = request
        self._app = app
        self._response = response
        self._protocol = protocol
        self._taken = False

    async def relay(self, raw: web.BaseRequest, headers: CIMultiDict[str]) -> web.StreamResponse:
        """Upgrade the client (with the app's 101 headers and the chain's) and relay the
        session until it ends."""
        if self._taken:
            raise RuntimeError("this WebSocket upgrade was already relayed or discarded")
        self._taken = True
        relay = self._relay
        relay._pending.discard(self)
        config = relay.config
        client = _ClientSide(
            protocols=(self._protocol,) if self._protocol else (),
            autoping=False,
            autoclose=False,
            compress=False,
            decode_text=False,
            max_msg_size=config.websocket_max_message,
            timeout=CLOSE_TIMEOUT,
        )
        client.headers.extend(headers)
        try:
            await client.prepare(raw)
        except BaseException:
            await _close_app_side(self._app, self._response, "client not upgraded")
            raise
        session = _Session(
            config, self._request, raw, client, self._app, self._response, relay._closing
        )
        relay._sessions.add(session)
        try:
            if relay._closed:  # closed while the chain was still running
                session.end(_GOING_AWAY, "sidecar shutting down")
            await session.run()
        finally:
            relay._sessions.discard(session)
        return client

    async def discard(self, reason: str = "going away") -> None:
        """The client will not be upgraded: close the app's side (1001)."""
        if self._taken:
            return
        self._taken = True
        self._relay._pending.discard(self)
        await _close_app_side(self._app, self._response, reason)


class _Session:
    """One relayed session: a pump each way, and a watchdog for the heartbeat and idle
    timeout. Whoever ends it first (a close frame from either side, a side gone, the
    watchdog, shutdown) starts the one closing handshake; the pumps then stop."""

    def __init__(
        self,
        config: UpstreamConfig,
        request: ProxyRequest,
        raw: web.BaseRequest,
        client: ClientSide,
        app: AppSide,
        response: aiohttp.ClientResponse,
        keep: set[asyncio.Task[None]],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._raw = raw
        self.client = client
        self.app = app
        self._response = response
        self._idle_timeout = config.websocket_idle_timeout
        self._heartbeat = config.websocket_heartbeat
        self._pong_timeout = config.websocket_pong_timeout
        now = self._loop.time()
        self._last_frame = now  # the last frame relayed, either way
        self._last_client = now  # the last frame from the client, heartbeat pongs included
        self._ping_sent: float | None = None  # an unanswered heartbeat ping
        self._ping_payload = b"sidecar-heartbeat-" + os.urandom(8).hex().encode()
        self._ponged = asyncio.Event()  # wakes the watchdog to schedule the next ping
        self._closer: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._keep = keep  # where the closing task is held while it runs

    async def run(self) -> None:
        pumps = (
            asyncio.create_task(self._from_client()),
            asyncio.create_task(self._from_app()),
        )
        tasks = list(pumps)
        if self._idle_timeout > 0 or self._heartbeat > 0:
            tasks.append(asyncio.create_task(self._watch()))
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            # A pump ends only once a close has begun, unless it failed (a bug).
            await (self._closer or self.end(_INTERNAL_ERROR, "relay error"))
            await asyncio.wait(pumps, timeout=CLOSE_TIMEOUT)
        finally:
            for task in tasks:
                task.cancel()
            if self._closer is None:  # cancelled (the shutdown deadline): still say goodbye
                self.end(_GOING_AWAY, "sidecar shutting down")
        for task in tasks:
            if task.done() and not task.cancelled() and (failed := task.exception()):
                raise failed  # our bug: aiohttp logs it; both sides are closed already

    async def shut_down(self, reason: str = "sidecar shutting down") -> None:
        """Close both sides with 1001 and wait (bounded) until the session has ended."""
        self.end(_GOING_AWAY, reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * CLOSE_TIMEOUT + 1):
                await self._done.wait()

    # -- the pumps ---------------------------------------------------------------------

    async def _from_client(self) -> None:
        client, app, loop = self.client, self.app, self._loop
        while True:
            msg = await client.receive()
            kind = msg.type
            if kind is WSMsgType.CLOSE:
                self._begin(partial(self._client_closed, msg.data, msg.extra or ""))
                return
            if kind not in _FRAMES:  # CLOSING: we are closing it; CLOSED, ERROR: it is gone
                self._client_gone(_why(kind, msg.data, "client", "client went away"))
                return
            now = loop.time()
            self._last_client = now
            if kind is WSMsgType.PONG and msg.data == self._ping_payload:
                self._ping_sent = None  # the answer to our heartbeat: not the app's business
                self._ponged.set()
                continue
            self._last_frame = now
            if not await _send(app, msg.data, kind):
                self._app_gone("upstream connection lost")
                return

    async def _from_app(self) -> None:
        client, app, loop, request = self.client, self.app, self._loop, self._request
        while True:
            msg = await app.receive()
            kind = msg.type
            if kind is WSMsgType.CLOSE:
                self._begin(partial(self._app_closed, msg.data, msg.extra or ""))
                return
            if kind not in _FRAMES:
                self._app_gone(_why(kind, msg.data, "upstream", "upstream connection lost"))
                return
            self._last_frame = loop.time()
            if not await _send(client, msg.data, kind):
                self._client_gone("client went away")
                return
            request.bytes_sent += len(msg.data)

    # -- heartbeat and idle timeout ----------------------------------------------------

    async def _watch(self) -> None:
        loop = self._loop
        idle, heartbeat, pong_timeout = self._idle_timeout, self._heartbeat, self._pong_timeout
        while self._closer is None:
            self._ponged.clear()
            now = loop.time()
            wake = math.inf
            if idle > 0:
                due = self._last_frame + idle
                if now >= due:
                    self.end(_GOING_AWAY, "idle timeout")
                    return
                wake = due
            if heartbeat > 0:
                if self._ping_sent is not None:
                    due = self._ping_sent + pong_timeout
                    if now >= due:
                        self.end(_GOING_AWAY, "ping timeout")
                        return
                else:
                    due = self._last_client + heartbeat
                    if now >= due:
                        self._ping_sent = now
                        due = now + pong_timeout
                        if not await self._ping_client():
                            return  # the client is gone: its pump sees it too
                wake = min(wake, due)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wake):
                    await self._ponged.wait()

    async def _ping_client(self) -> bool:
        try:
            # A client that does not read may block the write: its pong deadline runs anyway.
            async with asyncio.timeout(self._pong_timeout):
                await self.client.ping(self._ping_payload)
        except TimeoutError:
            pass
        except ConnectionError:
            return False
        return True

    # -- closing -----------------------------------------------------------------------

    def _client_gone(self, why: str) -> None:
        # Whatever the client's side still accepts; the app learns why.
        self._begin(partial(self._both, _GOING_AWAY, "", _GOING_AWAY, why))

    def _app_gone(self, why: str) -> None:
        self._begin(partial(self._both, _INTERNAL_ERROR, why))

    def end(self, code: int, reason: str) -> asyncio.Task[None]:
        """Close both sides with `code` and `reason` (the sidecar's own decision)."""
        return self._begin(lambda: self._both(code, reason))

    def _begin(self, work: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Start the session's one closing handshake (a no-op once one has started)."""
        if self._closer is None:
            self._closer = asyncio.create_task(self._bounded(work))
            self._keep.add(self._closer)
            self._closer.add_done_callback(self._keep.discard)
        return self._closer

    async def _bounded(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            async with asyncio.timeout(2 * CLOSE_TIMEOUT):
                await work()
        except (TimeoutError, ConnectionError):
            transport = self._raw.transport
            if transport is not None:
                transport.abort()
        finally:
            self._response.close()  # the app's connection, whatever became of its close
            self._done.set()

    async def _client_closed(self, code: int, reason: str) -> None:
        # The client's close goes to the app; the app's reply is the client's reply.
        code = _sendable(code, _NORMAL)
        await self.app.close(code=code, message=reason.encode())
        await self.client.close(code=_sendable(self.app.close_code, code))

    async def _app_closed(self, code: int, reason: str) -> None:
        code = _sendable(code, _NORMAL)
        await asyncio.gather(
            self.client.close(code=code, message=reason.encode()),
            self.app.close(code=code),
            return_exceptions=True,
        )

    async def _both(
        self, client_code: int, client_reason: str, app_code: int = 0, app_reason: str = ""
    ) -> None:
        """Close the client's side and the app's; the app gets the client's code and reason
        unless told otherwise."""
        if not app_code:
            app_code, app_reason = client_code, client_reason
        await asyncio.gather(
            self.client.close(code=client_code, message=client_reason.encode()),
            self.app.close(code=app_code, message=app_reason.encode()),
            return_exceptions=True,
        )


# Frames that are relayed; anything else (CLOSING, CLOSED, ERROR) means a side is done.
_FRAMES = frozenset({WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG})


def _why(kind: WSMsgType, data: object, side: str, gone: str) -> str:
    """The close reason for the other side when `side` ended without a close frame."""
    if kind is not WSMsgType.ERROR:
        return gone
    if isinstance(data, WebSocketError) and data.code == WSCloseCode.MESSAGE_TOO_BIG:
        return f"{side} sent a message too big"
    return f"{side} broke the WebSocket protocol"


async def _send(sink: ClientSide | AppSide, data: bytes, kind: WSMsgType) -> bool:
    """Send one frame as it was received; False if the sink is gone or closing."""
    try:
        await sink.send_frame(data, kind)
    except ConnectionError:  # aiohttp's ClientConnectionResetError among them
        return False
    return True


async def _close_app_side(app: AppSide, response: aiohttp.ClientResponse, reason: str) -> None:
    try:
        async with asyncio.timeout(2 * CLOSE_TIMEOUT):
            await app.close(code=_GOING_AWAY, message=reason.encode())
    except (TimeoutError, ConnectionError):
        pass
    finally:
        response.close()


def _sendable(code: int | None, default: int) -> int:
    """`code` if a close frame may carry it (RFC 6455 §7.4), else `default` (no code at all
    arrives as 0; 1005, 1006 and 1015 only describe a close, they are never sent)."""
    if code is not None and (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return code
    return default


class _ClientSide(web.WebSocketResponse[Literal[False]]):
    """The client's side, adding nothing to the app's 101 headers but the handshake's own.

    aiohttp's server would add its `Server` header to a 101 without one; relayed as if it
    came from the app, it would be a lie (as for every relayed response, see the handler).
    """

    async def _prepare_headers(self) -> None:
        had_server = hdrs.SERVER in self.headers
        await super()._prepare_headers()
        if not had_server:
            self.headers.popall(hdrs.SERVER, None)


def _open_app_side(
    response: aiohttp.ClientResponse,
    protocol: str | None,
    max_message: int,
    loop: asyncio.AbstractEventLoop,
) -> AppSide:
    """The WebSocket over the app's upgraded connection, built the way aiohttp 3.14's
    `ClientSession._ws_connect` builds it after its own handshake: masked frames, no
    compression, autoping and autoclose off, text left as bytes."""
    connection = response.connection
    assert connection is not None
    protocol_ = connection.protocol
    transport = connection.transport
    assert protocol_ is not None and transport is not None
    protocol_.read_timeout = None  # the session's idle timeout applies, not the route's
    queue = WebSocketDataQueue(protocol_, _READ_LIMIT, loop=loop)
    writer = WebSocketWriter(protocol_, transport, use_mask=True)
    app: AppSide = aiohttp.ClientWebSocketResponse(
        queue,
        writer,
        protocol,
        response,
        aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
        False,  # autoclose
        False,  # autoping
        loop,
    )
    app._parser = WebSocketReader(queue, max_message, compress=False, decode_text=False)
    protocol_.set_parser(app._parser, queue)
    return app


def _upstream_handshake(headers: CIMultiDict[str], key: str) -> CIMultiDict[str]:
    out = CIMultiDict(headers)
    for name in _CLIENT_HANDSHAKE:
        out.popall(name, None)
    out[hdrs.UPGRADE] = "websocket"
    out[hdrs.CONNECTION] = "Upgrade"
    out[hdrs.SEC_WEBSOCKET_VERSION] = "13"
    out[hdrs.SEC_WEBSOCKET_KEY] = key
    return out


def _valid_client_handshake(headers: Headers) -> bool:
    """What aiohttp's server will require of the client: checked before asking the app."""
    if headers.get(hdrs.SEC_WEBSOCKET_VERSION, "").strip() not in _VERSIONS:
        return False
    key = headers.get(hdrs.SEC_WEBSOCKET_KEY, "")
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _invalid_101(headers: Headers, key: str, offered: list[str]) -> str | None:
    """Why the app's 101 is not a valid WebSocket handshake (RFC 6455 §4.1), or None."""
    if headers.get(hdrs.UPGRADE, "").strip().lower() != "websocket":
        return "the upstream's 101 does not upgrade to websocket"
    if "upgrade" not in connection_tokens(headers):
        return "the upstream's 101 lacks Connection: upgrade"
    expected = base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest()).decode()
    if headers.get(hdrs.SEC_WEBSOCKET_ACCEPT, "").strip() != expected:
        return "the upstream's Sec-WebSocket-Accept does not match the key it was sent"
    chosen = headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL)
    if chosen is not None and chosen.strip() not in offered:
        return "the upstream chose a subprotocol the client did not offer"
    if hdrs.SEC_WEBSOCKET_EXTENSIONS in headers:
        return "the upstream accepted a WebSocket extension that was not offered"
    return None


def _protocols(headers: Headers) -> list[str]:
    return [
        token.strip()
        for value in headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for token in value.split(",")
        if token.strip()
    ]


def _relayed_101_headers(headers: Headers) -> CIMultiDict[str]:
    out = strip_hop_by_hop(headers)
    for name in _APP_HANDSHAKE:
        out.popall(name, None)
    return out
