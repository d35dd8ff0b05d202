"""What the docs promise about `server.workers`: N processes share the port under a small
supervisor that restarts a worker that dies (here: SIGKILLed, as the OOM killer would)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import SidecarProcess, app_with, free_port, run_app, write_config

TEST_TIMEOUT = 60.0


async def answering_pid(proc: SidecarProcess) -> int:
    """The pid of whichever worker takes a fresh admin connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(proc.admin_url + "/health") as response,
    ):
        pid: int = (await response.json())["pid"]
        return pid


async def pids_until(proc: SidecarProcess, done: Callable[[set[int]], bool]) -> set[int]:
    """Pids seen on fresh connections until `done(pids)` holds (the kernel spreads them)."""
    seen: set[int] = set()
    while not done(seen):
        with contextlib.suppress(aiohttp.ClientError):
            seen.add(await answering_pid(proc))
    return seen


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(tmp_path: Path) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with asyncio.timeout(TEST_TIMEOUT), run_app(app_with({"/{tail:.*}": ok})) as url:
        path = str(tmp_path / "sidecar.yaml")
        port, admin_port = free_port(), free_port()
        server = {"workers": "2", "drain": "0s", "reload_interval": "0s"}
        write_config(path, url, port, admin_port, server=server)
        proc = await SidecarProcess(path, port, admin_port).start()
        try:
            workers = await pids_until(proc, lambda seen: len(seen) == 2)
            assert proc.pid not in workers  # the supervisor serves nothing itself
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)

            # The supervisor says so, and a new worker takes the dead one's place.
            while not any(
                re.search(rb"sidecar: worker \d+ exited \(-9\); restarting", line)
                for line in proc.stdout
            ):
                await asyncio.sleep(0.05)
            survivor = (workers - {victim}).pop()
            now = await pids_until(proc, lambda seen: len(seen - {survivor}) >= 1)
            assert victim not in now
            replacement = (now - {survivor}).pop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, 0)
                raise AssertionError("the killed worker is still there")

            # Both workers serve traffic again, on the same port.
            for _ in range(40):
                connector = aiohttp.TCPConnector(force_close=True)
                async with (
                    aiohttp.ClientSession(connector=connector) as session,
                    session.get(proc.url + "/x") as response,
                ):
                    assert (response.status, await response.text()) == (200, "ok")
            both = {survivor, replacement}
            assert await pids_until(proc, lambda seen: seen >= both) == both

            proc.signal(signal.SIGTERM)
            assert await proc.wait_exit(timeout=30) == 0
        finally:
            await proc.stop()
