"""WebSocketRelay on its own: a real aiohttp WebSocket app behind it, a real aiohttp client in
front, and a tiny front server doing the handler's part (build the ProxyRequest, call
`relay.connect`, then relay or discard what comes back), so what the relay promises is
tested without the rest of the sidecar: refusals relayed as the app's own answer, the
app's 101 headers, close codes both ways, heartbeat, idle timeout, shutdown, discard."""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import websocket
from sidecar.chain import Origin, ProxyRequest, ProxyResponse
from sidecar.config import RouteConfig, RouteMatch, UpstreamConfig
from sidecar.websocket import WebSocketRelay
from tests.proxy.conftest import TEST_TIMEOUT, connection, read_response, scripted_upstream
from tests.support import RawExchange, app_with, run_app

WS_TIMEOUT = 3.0
ROUTE = RouteConfig(name="ws", match=RouteMatch(path_prefix="/"))
# What the handler removes before a request goes upstream (RFC 9110 §7.6.1).
_HOP_BY_HOP = ("Connection", "Upgrade", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding")
BIG = bytes(range(256)) * 1024  # 256 KiB: more than arrives with the headers


# --- the app ---------------------------------------------------------------------------


@dataclass
class App:
    """What the upstream WebSocket app saw."""

    pongs: list[bytes] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: int = 0


def ws_app(state: App) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        state.sessions += 1
        ws = web.WebSocketResponse(autoping=False, autoclose=False, protocols=("v2",))
        ws.headers["Set-Cookie"] = "sid=abc; Path=/; HttpOnly"
        ws.headers["X-App-Session"] = "s1"
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                if msg.data == "drop":  # gone without a close frame
                    assert request.transport is not None
                    request.transport.abort()
                    break
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                state.pongs.append(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                state.closes.append((msg.data, msg.extra or ""))
                await ws.close(code=msg.data)  # echo the code, as RFC 6455 §5.5.1 suggests
                break
            else:
                break
        state.closed.set()
        return ws

    async def auth(request: web.Request) -> web.Response:
        return web.Response(
            status=401,
            text="log in first",
            headers={"WWW-Authenticate": 'Bearer realm="app"', "X-App": "yes"},
        )

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def big_refusal(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=403, headers={"X-App": "big"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(BIG), 16 * 1024):
            await response.write(BIG[start : start + 16 * 1024])
        await response.write_eof()
        return response

    return app_with({"/ws": echo, "/auth": auth, "/redirect": redirect, "/big": big_refusal})


# --- the front: the handler's part -----------------------------------------------------


def upstream_headers(raw: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    headers = CIMultiDict(raw)
    for name in _HOP_BY_HOP:
        headers.popall(name, None)
    headers["X-Forwarded-For"] = "127.0.0.1"
    return headers


@dataclass
class Front:
    relay: WebSocketRelay
    url: str = ""
    responses: list[ProxyResponse] = field(default_factory=list)
    # Discard (aclose) every response instead of relaying it, and answer 503.
    discard: bool = False

    async def handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        request = ProxyRequest(
            method=raw.method,
            target=raw.raw_path,
            path=raw.raw_path.partition("?")[0],
            headers=upstream_headers(raw.headers),
            route=ROUTE,
            request_id="req-1",
            client_ip="127.0.0.1",
            raw=raw,
        )
        response = await self.relay.connect(request)
        self.responses.append(response)
        response.headers["X-Request-Id"] = "req-1"
        if self.discard:
            await response.aclose()
            return web.Response(status=503, text="discarded")
        if response.websocket is not None:
            return await response.websocket(raw, response.headers)
        body = response.body
        if body is None or isinstance(body, bytes):
            return web.Response(status=response.status, headers=response.headers, body=body)
        stream = web.StreamResponse(status=response.status, headers=response.headers)
        await stream.prepare(raw)
        try:
            async for chunk in body:
                await stream.write(chunk)
        finally:
            if response.release is not None:
                response.release()
        await stream.write_eof()
        return stream


def app_config(url: str, **websocket: Any) -> UpstreamConfig:
    port = int(url.rsplit(":", 1)[1])
    return replace(UpstreamConfig(), url=url, host="127.0.0.1", port=port, **websocket)


@asynccontextmanager
async def front_for(relay: WebSocketRelay) -> AsyncIterator[Front]:
    """The front server for `relay` on a free port; closes the relay when done."""
    front = Front(relay)
    runner = web.ServerRunner(web.Server(front.handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    front.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield front
    finally:
        await relay.close()
        await runner.cleanup()


@asynccontextmanager
async def relay_front(
    state: App, **websocket: Any
) -> AsyncIterator[tuple[Front, aiohttp.ClientSession]]:
    async with (
        run_app(ws_app(state)) as app_url,
        front_for(WebSocketRelay(app_config(app_url, **websocket))) as front,
        aiohttp.ClientSession() as client,
    ):
        yield front, client


def handshake(path: str, key: bytes, protocols: str | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: app",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def accept_for(key: bytes) -> str:
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
    return base64.b64encode(hashlib.sha1(key + magic).digest()).decode()


async def wait_for(event: asyncio.Event) -> None:
    async with asyncio.timeout(WS_TIMEOUT):
        await event.wait()


# --- refusals --------------------------------------------------------------------------


async def test_a_refused_upgrade_is_the_apps_own_answer() -> None:
    state = App()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/auth", key))
            answer = await read_response(reader)
        [response] = front.responses
    assert answer.status == 401
    assert answer.header("WWW-Authenticate") == ['Bearer realm="app"']
    assert answer.header("X-App") == ["yes"]
    assert answer.body == b"log in first"
    assert response.origin is Origin.APP
    assert response.failure is None


async def test_a_redirected_upgrade_keeps_the_apps_location() -> None:
    state = App()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/redirect", key))
            answer = await read_response(reader)
        [response] = front.responses
    assert answer.status == 302
    assert answer.header("Location") == ["/elsewhere"]
    assert response.origin is Origin.APP


async def test_a_large_refusal_body_streams_from_the_app() -> None:
    state = App()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/big", key))
            answer = await read_response(reader)
        [response] = front.responses
    assert answer.status == 403
    assert answer.header("X-App") == ["big"]
    assert answer.body == BIG
    assert not isinstance(response.body, bytes | None)
    assert response.release is not None


# --- the 101 ---------------------------------------------------------------------------


async def test_the_apps_101_headers_reach_the_client() -> None:
    state = App()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/ws", key, protocols="chat, v2"))
            answer = await read_response(reader)
    assert answer.status == 101
    assert answer.header("Set-Cookie") == ["sid=abc; Path=/; HttpOnly"]
    assert answer.header("X-App-Session") == ["s1"]
    assert answer.header("X-Request-Id") == ["req-1"]
    # The app's choice, once; the handshake headers are this hop's own, once each.
    assert answer.header("Sec-WebSocket-Protocol") == ["v2"]
    assert answer.header("Sec-WebSocket-Accept") == [accept_for(key)]
    assert [v.lower() for v in answer.header("Upgrade")] == ["websocket"]
    assert [v.lower() for v in answer.header("Connection")] == ["upgrade"]
    assert len(answer.header("Server")) <= 1


async def test_messages_travel_both_ways_with_the_apps_subprotocol() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(state) as (front, client),
        client.ws_connect(front.url + "/ws", protocols=("chat", "v2")) as ws,
    ):
        assert ws.protocol == "v2"
        await ws.send_str("hello ✓")
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:hello ✓")
        await ws.send_bytes(BIG)
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"echo:" + BIG)
        [response] = front.responses
        assert (response.status, response.origin) == (101, Origin.APP)


# --- close codes -----------------------------------------------------------------------


async def test_the_apps_close_code_and_reason_reach_the_client() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(state) as (front, client),
        client.ws_connect(front.url + "/ws", autoclose=False) as ws,
    ):
        await ws.send_str("close:4001:bye")
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4001, "bye")


async def test_the_clients_close_code_and_reason_reach_the_app() -> None:
    state = App()
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, client):
        ws = await client.ws_connect(front.url + "/ws")
        await ws.close(code=4003, message=b"later")
        await wait_for(state.closed)
        assert state.closes == [(4003, "later")]
        # The app's reply (it echoes the code) is the client's close reply.
        assert ws.close_code == 4003


async def test_a_client_gone_without_a_close_frame_is_going_away_for_the_app() -> None:
    state = App()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/ws", key))
            assert (await read_response(reader)).status == 101
        await wait_for(state.closed)
    assert state.closes == [(1001, "client went away")]


async def test_an_app_gone_without_a_close_frame_is_an_error_for_the_client() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(state) as (front, client),
        client.ws_connect(front.url + "/ws", autoclose=False) as ws,
    ):
        await ws.send_str("drop")
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (
            WSMsgType.CLOSE,
            1011,
            "upstream connection lost",
        )


async def test_a_client_message_over_the_limit_ends_the_session_both_ways() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(state, websocket_max_message=1024) as (front, client),
        client.ws_connect(front.url + "/ws", autoclose=False) as ws,
    ):
        await ws.send_bytes(b"x" * 2048)
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)  # aiohttp's own, to the client
        await wait_for(state.closed)
    assert state.closes == [(1001, "client sent a message too big")]


async def test_an_invalid_client_handshake_never_reaches_the_app() -> None:
    state = App()
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/ws", b"too-short"))
            answer = await read_response(reader)
    assert answer.status == 400
    assert answer.json()["type"] == "urn:sidecar:problem:bad-request"
    assert state.sessions == 0


async def test_an_invalid_101_from_the_app_is_a_bad_response() -> None:
    def bad_accept(exchange: RawExchange) -> bytes:
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\n"
        )

    key = base64.b64encode(os.urandom(16))
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_upstream(bad_accept) as app,
        front_for(WebSocketRelay(app_config(app.url))) as front,
    ):
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/ws", key))
            answer = await read_response(reader)
        [response] = front.responses
    assert answer.status == 502
    assert answer.json()["type"] == "urn:sidecar:problem:upstream-bad-response"
    assert response.failure is not None and response.failure.kind == "bad_response"


# --- idle timeout and heartbeat --------------------------------------------------------


async def test_an_idle_session_is_closed_both_ways() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(state, websocket_idle_timeout=0.3, websocket_heartbeat=0.0) as (
            front,
            client,
        ),
        client.ws_connect(front.url + "/ws", autoclose=False) as ws,
    ):
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
        await wait_for(state.closed)
    assert state.closes == [(1001, "idle timeout")]


async def test_heartbeat_pongs_stay_with_the_sidecar_and_are_not_activity() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(
            state, websocket_heartbeat=0.05, websocket_pong_timeout=2.0, websocket_idle_timeout=0.6
        ) as (front, client),
        client.ws_connect(front.url + "/ws", autoping=False, autoclose=False) as ws,
    ):
        pings: list[bytes] = []
        while len(pings) < 2:
            msg = await ws.receive(timeout=WS_TIMEOUT)
            assert msg.type is WSMsgType.PING
            pings.append(msg.data)
            await ws.pong(msg.data)
        # An app-bound pong of the client's own is relayed; the sidecar's are not.
        await ws.pong(b"mine")
        await ws.send_str("x")
        while (msg := await ws.receive(timeout=WS_TIMEOUT)).type is WSMsgType.PING:
            await ws.pong(msg.data)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:x")
        assert state.pongs == [b"mine"]
        assert pings[0] == pings[1] and pings[0].startswith(b"sidecar")
        # Answered heartbeats keep a session alive but not busy: the idle timeout still ends it.
        while (msg := await ws.receive(timeout=WS_TIMEOUT)).type is WSMsgType.PING:
            await ws.pong(msg.data)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
        await wait_for(state.closed)
    assert state.closes == [(1001, "idle timeout")]


async def test_an_unanswered_heartbeat_closes_the_session() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(
            state, websocket_heartbeat=0.05, websocket_pong_timeout=0.1, websocket_idle_timeout=0
        ) as (front, client),
        client.ws_connect(front.url + "/ws", autoping=False, autoclose=False) as ws,
    ):
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert msg.type is WSMsgType.PING  # and never answered
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "ping timeout")
        await wait_for(state.closed)
    assert state.closes == [(1001, "ping timeout")]


# --- shutdown and discard --------------------------------------------------------------


async def test_close_ends_live_sessions_with_going_away_both_ways() -> None:
    state = App()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        relay_front(state) as (front, client),
        client.ws_connect(front.url + "/ws", autoclose=False) as ws,
    ):
        await ws.send_str("x")
        assert (await ws.receive(timeout=WS_TIMEOUT)).data == "echo:x"
        await front.relay.close()
        await front.relay.close()  # harmless twice (the forwarder closes it again)
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "sidecar shutting down")
        await wait_for(state.closed)
        assert state.closes == [(1001, "sidecar shutting down")]
        # And no new session starts once closed.
        async with client.get(front.url + "/ws", headers=_upgrade_headers()) as refused:
            assert refused.status == 502
        assert state.sessions == 1


async def test_a_discarded_upgrade_closes_the_upstream_websocket() -> None:
    state = App()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(TEST_TIMEOUT), relay_front(state) as (front, _):
        front.discard = True
        port = int(front.url.rsplit(":", 1)[1])
        async with connection(port) as (reader, writer):
            writer.write(handshake("/ws", key))
            answer = await read_response(reader)
        assert answer.status == 503
        await wait_for(state.closed)
        [response] = front.responses
        assert response.status == 101
        assert response.closer is None and response.websocket is None  # aclose took them
    assert state.closes == [(1001, "going away")]


def _upgrade_headers() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }


# --- structure -------------------------------------------------------------------------


def test_the_relay_does_not_import_the_forwarder() -> None:
    # Not even for type checking: the forwarder holds a relay, never the other way round.
    tree = ast.parse(Path(websocket.__file__).read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("sidecar.upstream")}
    code = "import sys, sidecar.websocket; print('sidecar.upstream' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
