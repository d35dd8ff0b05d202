"""`sidecar demo`: a tiny echo app with the sidecar in front of it, nothing else needed.

The echo app answers every path with what it received (method, target, headers, body),
plus /stream (server-sent events, one per 0.5 s) and /ws (a WebSocket echo), so a newcomer
can see forwarding, streaming and upgrades work from a shell.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import (
    Address,
    IdempotencyConfig,
    RouteConfig,
    RouteMatch,
    SidecarConfig,
    embedded_config,
)
from sidecar.logs import route_library_logs


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "target": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body.decode("utf-8", "replace"),
            }
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(5):
            await response.write(f"data: event {n}\n\n".encode())
            await asyncio.sleep(0.5)
        await response.write_eof()
        return response

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(port: int, admin_port: int, app_port: int) -> SidecarConfig:
    config = embedded_config(f"http://127.0.0.1:{app_port}")
    # POST /orders is idempotent, to try the Idempotency-Key header; the rest is forwarded.
    orders = RouteConfig(
        name="orders",
        match=RouteMatch(path_prefix="/orders", methods=frozenset({"POST"})),
        idempotency=IdempotencyConfig(methods=frozenset({"POST"})),
    )
    server = replace(
        config.server,
        listen=Address("127.0.0.1", port),
        admin_listen=Address("127.0.0.1", admin_port),
        drain=0.0,
        shutdown_grace=2.0,
    )
    return replace(config, server=server, routes=(orders, *config.routes))


async def run_demo(port: int, admin_port: int) -> int:
    app_port = _free_port()
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()
    sidecar = Sidecar(demo_config(port, admin_port, app_port))
    route_library_logs(sidecar.log)
    await sidecar.start()
    sidecar.install_signal_handlers()
    base = f"http://127.0.0.1:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    print(
        f"""
sidecar demo: an echo app on 127.0.0.1:{app_port}, the sidecar in front of it on {base}
Try:
  curl -i {base}/hello?x=1
  curl -i -X POST {base}/orders -H 'Content-Type: application/json' -d '{{"amount": 42}}'
  curl -i -X POST {base}/orders -H 'Idempotency-Key: order-1' -H 'X-Org-Id: demo' \\
       -d '{{"amount": 42}}'                  # twice: the second is a replay
                                              # (Idempotent-Replayed: true)
  curl -N {base}/stream                       # server-sent events, streamed
  curl -s {admin}/health | python3 -m json.tool
  curl -s {admin}/metrics | grep sidecar_requests_total
Ctrl-C to stop.
""",
        flush=True,
    )
    await sidecar.wait_stopped()
    await sidecar.shutdown()
    await runner.cleanup()
    return 0
