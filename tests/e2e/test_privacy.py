"""Secrets sent by clients, apps and operators never reach a real sidecar's log output."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import (
    PLANTED_SECRET,
    SidecarProcess,
    app_with,
    free_port,
    run_app,
    write_config,
)

LOGGING = f"""\
logging:
  level: debug
  access:
    headers: [Authorization, Proxy-Authorization, Cookie, X-Api-Key, User-Agent]
    redact_headers: [X-Api-Key]
state:
  url: redis://:${{PLANTED_PASSWORD}}@127.0.0.1:{free_port()}/0
"""


async def test_planted_secret_never_reaches_the_logs(tmp_path: Path) -> None:
    async def app(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", f"session={PLANTED_SECRET}; HttpOnly")
        return response

    os.environ["PLANTED_PASSWORD"] = PLANTED_SECRET
    try:
        async with run_app(app_with({"/{tail:.*}": app})) as url:
            path = str(tmp_path / "sidecar.yaml")
            port, admin_port = free_port(), free_port()
            server = {"reload_interval": "0s", "drain": "0s"}
            write_config(path, url, port, admin_port, server=server, extra=LOGGING)
            proc = await SidecarProcess(path, port, admin_port).start()
            try:
                await exercise(proc, path, url, server)
            finally:
                await proc.stop()
    finally:
        del os.environ["PLANTED_PASSWORD"]
    output = b"".join(proc.stdout)
    assert b'"event":"access"' in output  # the requests were logged...
    assert PLANTED_SECRET.encode() not in output  # ...without the secret


async def exercise(proc: SidecarProcess, path: str, url: str, server: dict[str, str]) -> None:
    secret_headers = {
        "Authorization": f"Bearer {PLANTED_SECRET}",
        "Proxy-Authorization": f"Basic {PLANTED_SECRET}",
        "Cookie": f"sid={PLANTED_SECRET}",
        "X-Api-Key": PLANTED_SECRET,
        "User-Agent": "privacy-test",
    }
    async with aiohttp.ClientSession() as session:
        for target in (f"/ok?token={PLANTED_SECRET}", "/ok"):
            async with session.get(proc.url + target, headers=secret_headers) as response:
                assert response.status == 200
        # The store is down (its URL holds the planted password): /health reports it.
        async with session.get(proc.admin_url + "/health") as response:
            health = await response.text()
        assert PLANTED_SECRET not in health
        assert '"state":{"status":"down"' in health
    # An invalid reload whose error would quote the URL with the password in it.
    bad = LOGGING.replace("redis://", "redsi://")
    write_config(path, url, proc.port, proc.admin_port, server=server, extra=bad)
    proc.signal(signal.SIGHUP)
    failed = await proc.wait_event("config.reload_failed")
    assert "state.url" in str(failed["errors"])
    proc.signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        assert await proc.wait_exit() == 0
