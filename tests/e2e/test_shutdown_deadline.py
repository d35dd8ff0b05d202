"""One shutdown deadline: requests under way get `shutdown_grace` in total, then are
cancelled, and the process exits 0 within drain + shutdown_grace + 1 s (aiohttp's own
handler shutdown would wait the grace twice, overrunning the pod's grace period)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from aiohttp import web

from tests.e2e.test_lifecycle import start_process
from tests.support import app_with, run_app

DRAIN = 0.2
GRACE = 3.0
# Background writes get at least this long after the requests' deadline (app.py).
LAST_WRITES = 1.0
# Process teardown on a loaded 2-core machine; well under the second grace aiohttp added.
SLACK = 0.8


async def test_a_request_that_never_ends_is_cancelled_at_one_deadline(tmp_path: Path) -> None:
    arrived = asyncio.Event()
    released = asyncio.Event()

    async def stalled(request: web.Request) -> web.Response:
        arrived.set()
        await released.wait()  # not before the sidecar has exited
        return web.Response(text="too late")

    async with run_app(app_with({"/{tail:.*}": stalled})) as url:
        proc = await start_process(
            tmp_path, url, server={"drain": f"{DRAIN}s", "shutdown_grace": f"{GRACE}s"}
        )
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            writer.write(b"GET /forever HTTP/1.1\r\nHost: app\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                await arrived.wait()
            signalled = time.monotonic()
            proc.signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                # The client is not left hanging: its connection ends at the deadline.
                assert await reader.read() == b""
                cut = time.monotonic() - signalled
                code = await proc.wait_exit()
            elapsed = time.monotonic() - signalled
            writer.close()
        finally:
            released.set()
            await proc.stop()
    assert code == 0
    # The request had its whole grace, and not a second one.
    assert cut >= DRAIN + GRACE
    assert elapsed < DRAIN + GRACE + LAST_WRITES + SLACK, elapsed
    events = [e["event"] for e in proc.events()]
    assert "sidecar.stopped" in events
