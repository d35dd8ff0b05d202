"""WebSocket relay: messages, pings/pongs with payloads, close codes and subprotocols travel
end to end between a real aiohttp client and a real aiohttp WebSocket app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from yarl import URL

from sidecar.app import Sidecar
from tests.proxy.conftest import TEST_TIMEOUT
from tests.support import (
    CapturingSink,
    RunningSidecar,
    app_with,
    run_app,
    run_sidecar,
    sidecar_config,
)

WS_TIMEOUT = 3.0
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


@dataclass
class WsApp:
    """What the upstream WebSocket app saw."""

    pings: list[bytes] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)
    requested_protocols: list[str] = field(default_factory=list)
    handshake_headers: list[dict[str, list[str]]] = field(default_factory=list)
    ping_seen: asyncio.Event = field(default_factory=asyncio.Event)
    close_seen: asyncio.Event = field(default_factory=asyncio.Event)


def ws_app(state: WsApp) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        state.requested_protocols.append(request.headers.get("Sec-WebSocket-Protocol", ""))
        seen: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            seen.setdefault(name.lower(), []).append(value)
        seen[":target"] = [request.raw_path]
        state.handshake_headers.append(seen)
        ws = web.WebSocketResponse(autoping=False, protocols=("v2",))
        ws.headers["Set-Cookie"] = "sid=abc; Path=/"
        ws.headers["X-App-Session"] = "s1"
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4002, message=b"app says bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
            elif msg.type is WSMsgType.PING:
                state.pings.append(msg.data)
                state.ping_seen.set()
                await ws.pong(msg.data)
        return ws

    async def close_frame(request: web.Request) -> web.WebSocketResponse:
        # Records the close frame itself (code and reason) before replying to it.
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        while True:  # not `async for`: it ends at a CLOSE without handing it over
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:
                state.closes.append((msg.data, msg.extra or ""))
                state.close_seen.set()
                await ws.close()
                break
            if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
        return ws

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(
            status=401, text="no websockets for you", headers={"WWW-Authenticate": "Bearer"}
        )

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    return app_with({"/ws": echo, "/ws-close": close_frame, "/ws-refuse": refuse, "/plain": plain})


@asynccontextmanager
async def through_sidecar(
    state: WsApp, upstream_yaml: str = ""
) -> AsyncIterator[tuple[RunningSidecar, aiohttp.ClientSession]]:
    async with (
        run_app(ws_app(state)) as url,
        run_sidecar(sidecar_config(url, upstream_yaml)) as sc,
        aiohttp.ClientSession() as client,
    ):
        yield sc, client


async def test_text_and_binary_messages_echo() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(sc.url + "/ws") as ws,
    ):
        await ws.send_str("hello ✓")
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:hello ✓")
        payload = bytes(range(256)) * 4
        await ws.send_bytes(payload)
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"echo:" + payload)


async def test_ping_and_pong_payloads_travel_end_to_end() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(sc.url + "/ws", autoping=False) as ws,
    ):
        await ws.ping(b"p1")
        async with asyncio.timeout(WS_TIMEOUT):
            await state.ping_seen.wait()
        assert state.pings == [b"p1"]
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert msg.type is WSMsgType.PONG
        assert msg.data == b"p1"


async def test_client_close_code_reaches_app() -> None:
    state = WsApp()
    async with asyncio.timeout(TEST_TIMEOUT), through_sidecar(state) as (sc, client):
        ws = await client.ws_connect(sc.url + "/ws-close")
        await ws.close(code=4001, message=b"client leaving")
        async with asyncio.timeout(WS_TIMEOUT):
            await state.close_seen.wait()
    assert state.closes == [(4001, "client leaving")]


async def test_app_close_code_reaches_client() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(sc.url + "/ws") as ws,
    ):
        await ws.send_str("close-me")
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 4002
        assert msg.extra == "app says bye"
    assert ws.close_code == 4002


async def test_subprotocol_negotiated_with_app() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(sc.url + "/ws", protocols=("chat", "v2")) as ws,
    ):
        assert ws.protocol == "v2"
        await ws.send_str("x")
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert msg.data == "echo:x"
    assert [p.replace(" ", "") for p in state.requested_protocols] == ["chat,v2"]


async def test_no_subprotocol_when_app_supports_none_requested() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(sc.url + "/ws", protocols=("chat",)) as ws,
    ):
        assert ws.protocol is None


async def test_refused_upgrade_is_the_apps_answer() -> None:
    state = WsApp()
    async with asyncio.timeout(TEST_TIMEOUT), through_sidecar(state) as (sc, client):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(sc.url + "/ws-refuse")
        async with client.get(sc.url + "/ws-refuse", headers=UPGRADE) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "X-Request-Id" in response.headers
            assert await response.text() == "no websockets for you"
    assert refused.value.status == 401


async def test_the_apps_101_headers_reach_the_client() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(sc.url + "/ws", headers={"X-Request-Id": "ws-2"}) as ws,
    ):
        # The 101 the client got: the app's own headers and the sidecar's request id.
        assert ws._response.headers.getall("Set-Cookie") == ["sid=abc; Path=/"]
        assert ws._response.headers.getall("X-App-Session") == ["s1"]
        assert ws._response.headers.getall("X-Request-Id") == ["ws-2"]


async def test_websocket_sessions_do_not_take_the_request_pool() -> None:
    # One pooled connection: two live sessions still leave it to plain requests.
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state, "  max_connections: 1\n") as (sc, client),
        client.ws_connect(sc.url + "/ws") as first,
        client.ws_connect(sc.url + "/ws") as second,
    ):
        for ws in (first, second):
            await ws.send_str("x")
            assert (await ws.receive(timeout=WS_TIMEOUT)).data == "echo:x"
        async with client.get(sc.url + "/plain") as response:
            assert (response.status, await response.text()) == (200, "plain")


async def test_handshake_forwards_end_to_end_headers() -> None:
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        through_sidecar(state) as (sc, client),
        client.ws_connect(
            # encoded=True: the test's own client must not requote the target either.
            URL(sc.url + "/ws?room=a%2Fb", encoded=True),
            headers={"Cookie": "sid=1", "Authorization": "Bearer t", "X-Request-Id": "ws-1"},
        ) as ws,
    ):
        await ws.send_str("x")
        assert (await ws.receive(timeout=WS_TIMEOUT)).data == "echo:x"
    [seen] = state.handshake_headers
    assert seen[":target"] == ["/ws?room=a%2Fb"]
    assert seen["cookie"] == ["sid=1"]
    assert seen["authorization"] == ["Bearer t"]
    assert seen["x-request-id"] == ["ws-1"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert len(seen["sec-websocket-key"]) == 1


async def test_shutdown_ends_live_sessions_at_once_with_going_away() -> None:
    # A grace far longer than the test may take: sessions must not wait it out.
    state = WsApp()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_app(ws_app(state)) as url,
        aiohttp.ClientSession() as client,
    ):
        sidecar = Sidecar(sidecar_config(url, shutdown_grace=60.0), None, log=CapturingSink())
        await sidecar.start()
        port, _ = sidecar.bound_ports
        ws = await client.ws_connect(f"http://127.0.0.1:{port}/ws", autoclose=False)
        await ws.send_str("x")
        assert (await ws.receive(timeout=WS_TIMEOUT)).data == "echo:x"
        stopping = asyncio.create_task(sidecar.shutdown())
        try:
            msg = await ws.receive(timeout=WS_TIMEOUT)
            assert (msg.type, msg.data, msg.extra) == (
                WSMsgType.CLOSE,
                1001,
                "sidecar shutting down",
            )
        finally:
            await ws.close()
            await stopping
