"""Bodies stream through: framing is kept, slow streams arrive chunk by chunk, and a 1 GiB
body in either direction costs the sidecar only a few MiB of memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.proxy.conftest import (
    TEST_TIMEOUT,
    RawExchange,
    connection,
    exchange,
    read_response,
    scripted_upstream,
)
from tests.support import RawUpstream, app_with, free_port, run_app, run_sidecar, sidecar_config

# -- 10: Content-Length kept when known, chunked when not ---------------------------------


async def test_upload_with_content_length_keeps_it(raw_upstream: RawUpstream) -> None:
    body = os.urandom(200_000)
    raw = (
        b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url)) as sc:
            response = await exchange(sc.port, raw)
    assert response.status == 200
    seen = raw_upstream.exchanges[0]
    assert seen.header("Content-Length") == [str(len(body))]
    assert seen.header("Transfer-Encoding") == []
    assert seen.body == body


def _dechunk(raw: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += raw[:size]
        raw = raw[size + 2 :]


async def test_chunked_upload_forwarded_chunked(raw_upstream: RawUpstream) -> None:
    chunks = [b"first chunk|", os.urandom(5000), b"|last"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    raw = (
        b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    ) + framed
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(raw_upstream.url)) as sc:
            response = await exchange(sc.port, raw)
    assert response.status == 200
    seen = raw_upstream.exchanges[0]
    assert seen.header("Transfer-Encoding") == ["chunked"]
    assert seen.header("Content-Length") == []
    assert _dechunk(seen.body) == b"".join(chunks)


async def test_response_content_length_kept() -> None:
    body = os.urandom(100_000)
    upstream = RawUpstream(
        response=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    await upstream.start()
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            async with run_sidecar(sidecar_config(upstream.url)) as sc:
                response = await exchange(
                    sc.port, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
                )
    finally:
        await upstream.stop()
    assert response.header("Content-Length") == [str(len(body))]
    assert response.header("Transfer-Encoding") == []
    assert response.raw_body == body


async def test_chunked_response_relayed_chunked() -> None:
    parts = [b"alpha-", b"beta-", b"gamma"]

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no content_length: aiohttp sends it chunked
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        await response.write_eof()
        return response

    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_app(app_with({"/s": stream})) as url, run_sidecar(sidecar_config(url)) as sc:
            response = await exchange(
                sc.port, b"GET /s HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
            )
    assert response.header("Transfer-Encoding") == ["chunked"]
    assert response.header("Content-Length") == []
    assert response.body == b"".join(parts)


async def test_close_delimited_response_relayed_complete_and_framed() -> None:
    # The app ends its body by closing (no Content-Length, not chunked): the sidecar must
    # frame it for the client's keep-alive connection, which stays usable afterwards.
    def close_delimited(exchange: RawExchange) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited body"

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        scripted_upstream(close_delimited, close_after=True) as upstream,
        run_sidecar(sidecar_config(upstream.url)) as sc,
        connection(sc.port) as (reader, writer),
    ):
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            response = await read_response(reader)
            assert response.status == 200
            assert response.header("Transfer-Encoding") == ["chunked"]
            assert response.body == b"close-delimited body"


# -- 11: slow streams arrive as they are written ------------------------------------------


async def test_server_sent_events_arrive_one_by_one() -> None:
    first_read = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: 1\ndata: first\n\n")
        # Event 2 is written only after the client has read event 1 through the sidecar:
        # a sidecar that buffered would never deliver event 1, and the timeout would fire.
        await first_read.wait()
        await response.write(b"id: 2\ndata: second\n\n")
        await response.write_eof()
        return response

    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            run_app(app_with({"/events": events})) as url,
            run_sidecar(sidecar_config(url)) as sc,
            aiohttp.ClientSession() as client,
            client.get(sc.url + "/events") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            async with asyncio.timeout(3):
                event1 = await resp.content.readuntil(b"\n\n")
            assert event1 == b"id: 1\ndata: first\n\n"
            first_read.set()
            async with asyncio.timeout(3):
                event2 = await resp.content.readuntil(b"\n\n")
            assert event2 == b"id: 2\ndata: second\n\n"
            assert await resp.content.read() == b""


# -- 12: streaming memory (1 GiB each way, sidecar in a subprocess) -----------------------

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
CHUNK = 256 * 1024
RSS_BUDGET = 16 * 1024 * 1024
_BLOCK = os.urandom(CHUNK)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """Samples a process's RSS every ~50 ms in the background; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = _rss_bytes(pid)
        self.peak = self.baseline
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, _rss_bytes(self.pid))
            self.samples += 1
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self.peak = max(self.peak, _rss_bytes(self.pid))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


class SidecarProcess:
    """`python -m sidecar run --config FILE` as a child process, ready when /ready says so."""

    def __init__(self, tmp_path: Path, upstream_url: str) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = tmp_path / "sidecar.yaml"
        self.config_path.write_text(
            "server:\n"
            f"  listen: 127.0.0.1:{self.port}\n"
            f"  admin_listen: 127.0.0.1:{self.admin_port}\n"
            "  drain: 0s\n"
            "  shutdown_grace: 5s\n"
            "  max_body: 2GiB\n"
            f"upstream:\n  url: {upstream_url}\n"
            "defaults:\n  timeout: 60s\n"
        )
        self.log_path = tmp_path / "sidecar.log"
        self.process: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def __aenter__(self) -> SidecarProcess:
        with open(self.log_path, "wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "--config",
                str(self.config_path),
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _wait_ready(self) -> None:
        assert self.process is not None
        ready_url = f"http://127.0.0.1:{self.admin_port}/ready"
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # 300 x 50 ms: 15 s at most
                assert self.process.returncode is None, self.log_text()
                try:
                    async with session.get(
                        ready_url, timeout=aiohttp.ClientTimeout(total=1)
                    ) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"sidecar not ready in 15 s:\n{self.log_text()}")

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                os.kill(self.process.pid, signal.SIGKILL)
                await self.process.wait()
                raise AssertionError("the sidecar did not stop within 10 s of SIGTERM") from None
        self.returncode = self.process.returncode


async def _generate(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        block = _BLOCK[: min(CHUNK, total - sent)]
        sent += len(block)
        yield block


def _report(direction: str, sampler: RssSampler, seconds: float) -> None:
    mib = 1024 * 1024
    print(
        f"\n[rss] {direction}: baseline {sampler.baseline / mib:.1f} MiB, "
        f"peak {sampler.peak / mib:.1f} MiB, growth {sampler.growth / mib:.2f} MiB, "
        f"{sampler.samples} samples, {GIB / mib / seconds:.0f} MiB/s"
    )


@pytest.mark.slow
async def test_one_gib_download_streams_in_constant_memory(tmp_path: Path) -> None:
    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = GIB
        await response.prepare(request)
        async for block in _generate(GIB):
            await response.write(block)
        await response.write_eof()
        return response

    async with asyncio.timeout(60):
        async with (
            run_app(app_with({"/download": download})) as url,
            SidecarProcess(tmp_path, url) as sidecar,
        ):
            assert sidecar.process is not None
            received = 0
            started = time.monotonic()
            async with (
                aiohttp.ClientSession() as client,
                RssSampler(sidecar.process.pid) as sampler,
                client.get(sidecar.url + "/download") as resp,
            ):
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(GIB)
                async for chunk in resp.content.iter_chunked(CHUNK):
                    received += len(chunk)
            elapsed = time.monotonic() - started
    _report("download", sampler, elapsed)
    assert sidecar.returncode == 0
    assert received == GIB
    assert sampler.samples >= 5
    assert sampler.growth <= RSS_BUDGET, f"RSS grew by {sampler.growth} bytes"


@pytest.mark.slow
async def test_one_gib_upload_streams_in_constant_memory(tmp_path: Path) -> None:
    async def upload(request: web.Request) -> web.Response:
        consumed = 0
        async for chunk in request.content.iter_any():
            consumed += len(chunk)
        return web.Response(text=str(consumed))

    async with asyncio.timeout(60):
        async with (
            run_app(app_with({"/upload": upload})) as url,
            SidecarProcess(tmp_path, url) as sidecar,
        ):
            assert sidecar.process is not None
            started = time.monotonic()
            async with (
                aiohttp.ClientSession() as client,
                RssSampler(sidecar.process.pid) as sampler,
                client.post(
                    sidecar.url + "/upload",
                    data=_generate(GIB),
                    headers={"Content-Length": str(GIB)},
                ) as resp,
            ):
                assert resp.status == 200, await resp.text()
                consumed = int(await resp.text())
            elapsed = time.monotonic() - started
    _report("upload", sampler, elapsed)
    assert sidecar.returncode == 0
    assert consumed == GIB
    assert sampler.samples >= 5
    assert sampler.growth <= RSS_BUDGET, f"RSS grew by {sampler.growth} bytes"
