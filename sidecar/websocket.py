"""WebSocket relay: the upgrade is accepted upstream first, then frames are pumped both ways.

Both ends run with autoping/autoclose off so pings, pongs (with their payloads) and close
codes travel end to end instead of being answered by the sidecar itself, and with
compression off so messages are relayed as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import errors
from sidecar.chain import ProxyRequest, ProxyResponse, UpstreamFailure

if TYPE_CHECKING:
    from sidecar.upstream import Forwarder

# The handshake headers belong to each hop: aiohttp makes fresh ones on both sides.
_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
WSConnection = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    """A handshake needs both `Upgrade: websocket` and the `upgrade` Connection option."""
    upgrade = headers.get("Upgrade")
    if upgrade is None or upgrade.strip().lower() != "websocket":
        return False
    return any(
        token.strip().lower() == "upgrade"
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    )


async def connect_websocket(forwarder: Forwarder, request: ProxyRequest) -> ProxyResponse:
    """Open the upstream WebSocket; the returned response relays it once the client is upgraded."""
    requested = request.raw.headers.get("Sec-WebSocket-Protocol", "")
    protocols = tuple(p.strip() for p in requested.split(",") if p.strip())
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _HANDSHAKE_HEADERS
    )
    max_msg = forwarder.config.websocket_max_message
    try:
        async with asyncio.timeout(request.route.timeout):
            upstream = await forwarder.session.ws_connect(
                forwarder.upstream_url(request.target),
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=False,
                max_msg_size=max_msg,
                compress=0,
            )
    except aiohttp.WSServerHandshakeError as exc:
        # The app said no (auth, wrong path...): the client sees the app's status.
        return errors.problem_for(
            errors.WEBSOCKET_FAILED,
            request,
            detail=f"upstream answered the upgrade with {exc.status}",
            status=exc.status,
        )
    except aiohttp.ClientError as exc:
        # Before TimeoutError: aiohttp's socket timeouts are TimeoutErrors too.
        return errors.failure_response(request, errors.classify_client_error(exc))
    except TimeoutError:
        failure = UpstreamFailure(
            "timeout", errors.UPSTREAM_TIMEOUT, "the WebSocket handshake timed out"
        )
        return errors.failure_response(request, failure)

    async def relay(raw: web.BaseRequest, headers: CIMultiDict[str]) -> web.StreamResponse:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            max_msg_size=max_msg,
            compress=False,
        )
        client.headers.extend(headers)  # request and trace ids on the 101 too
        try:
            await client.prepare(raw)
        except BaseException:
            await upstream.close()
            raise
        await _pump_both_ways(client, upstream)
        return client

    return ProxyResponse(101, CIMultiDict(), websocket=relay)


async def _pump_both_ways(client: web.WebSocketResponse, upstream: WSConnection) -> None:
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    try:
        await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        for task in (to_upstream, to_client):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await upstream.close()
        await client.close()


async def _pump(source: WSConnection, sink: WSConnection) -> None:
    """Copy frames from source to sink until either side closes."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            await sink.close(code=msg.data, message=(msg.extra or "").encode())
            return
        else:  # CLOSING, CLOSED, ERROR: the source is gone.
            return
