"""Real servers and clients for the tests: aiohttp upstreams, a raw TCP upstream that records
exact bytes, raw-socket clients, and an in-process sidecar on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Self

import aiohttp
import orjson
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import Address, SidecarConfig, parse_config
from sidecar.logs import LogSink

# A value tests send where secrets go (Authorization, cookies, passwords, queries). Every log
# line the suite produces is kept in LOG_OUTPUT and the session fails if this appears in any.
PLANTED_SECRET = "pl4nted-s3cret-7f3a9c"
LOG_OUTPUT: list[bytes] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def run_app(app: web.Application, **runner_kwargs: object) -> AsyncIterator[str]:
    """Serve an aiohttp app on a free 127.0.0.1 port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class RawExchange:
    """One request as the raw upstream received it: head bytes and body bytes."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def header_lines(self) -> list[tuple[str, str]]:
        lines = self.head.split(b"\r\n")[1:]
        out = []
        for line in lines:
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                out.append((name, value.strip()))
        return out

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.header_lines if k.lower() == name.lower()]


@dataclass(kw_only=True)
class LoopbackServer:
    """A TCP server on a free 127.0.0.1 port; subclasses say how to `_serve` a connection."""

    server: asyncio.AbstractServer | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class RawUpstream(LoopbackServer):
    """A TCP server speaking just enough HTTP/1.1 to record requests byte for byte.

    It reads the head, then a Content-Length or chunked body (kept raw, chunk framing
    included), stores the exchange and answers with `response` (raw bytes).
    """

    response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    exchanges: list[RawExchange] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_raw_body(reader, head)
                self.exchanges.append(RawExchange(head[:-4], body))
                self.received.set()
                writer.write(self.response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _read_raw_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        raw = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            if size == 0:
                return raw
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":", 1)[1]))
    return b""


async def raw_request(port: int, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read the whole reply (the request should close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            return await reader.read()
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[bytes, list[tuple[str, str]], bytes]:
    """(status line, headers in order, body bytes as received) of a raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    return lines[0], headers, body


def config_on_free_ports(text: str, **server: object) -> SidecarConfig:
    """A whole YAML config parsed by the real loader, then moved onto free 127.0.0.1 ports
    with no drain, for an in-process sidecar; `server` overrides more server settings."""
    config = parse_config(text, source="<test>")
    settings: dict[str, object] = {
        "listen": Address("127.0.0.1", 0),
        "admin_listen": Address("127.0.0.1", 0),
        "drain": 0.0,
        "shutdown_grace": 5.0,
        "reload_interval": 0.0,
    }
    settings.update(server)
    return replace(config, server=replace(config.server, **settings))  # type: ignore[arg-type]


def sidecar_config(upstream_url: str, yaml: str = "", **server: object) -> SidecarConfig:
    """A config for `upstream_url` plus any other YAML sections (routes, logging...)."""
    return config_on_free_ports(f"upstream:\n  url: {upstream_url}\n{yaml}", **server)


class CapturingSink(LogSink):
    """A LogSink that keeps records in memory so tests can read the log lines."""

    def __init__(self) -> None:
        super().__init__(stream=_NullStream(), level="debug")
        self.records: list[dict[str, object]] = []

    def emit(self, record: dict[str, object]) -> None:
        self.records.append(record)
        LOG_OUTPUT.append(orjson.dumps(record))
        super().emit(record)


class _NullStream:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    port: int
    admin_port: int
    log: CapturingSink

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@asynccontextmanager
async def run_sidecar(
    config: SidecarConfig, config_path: str | None = None
) -> AsyncIterator[RunningSidecar]:
    log = CapturingSink()
    sidecar = Sidecar(config, config_path, log=log)
    await sidecar.start()
    port, admin_port = sidecar.bound_ports
    try:
        yield RunningSidecar(sidecar, port, admin_port, log)
    finally:
        await sidecar.shutdown()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def app_with(routes: dict[str, Handler], method: str = "*") -> web.Application:
    """An aiohttp app with the given path -> handler routes (every method)."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route(method, path, handler)
    return app


@dataclass
class SidecarProcess:
    """`python -m sidecar run --config FILE` as a child process, stopped by its PID."""

    config_path: str
    port: int
    admin_port: int
    process: asyncio.subprocess.Process | None = None
    stdout: list[bytes] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, *, ready_path: str = "/live", timeout: float = 20.0) -> SidecarProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--config",
            self.config_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group: stop() can end any workers it started, too.
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._collect())
        await self.wait_admin(ready_path, 200, timeout)
        return self

    async def _collect(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            self.stdout.append(line)
            LOG_OUTPUT.append(line)

    def events(self) -> list[dict[str, object]]:
        """The JSON log lines printed so far."""
        out = []
        for line in self.stdout:
            if line.startswith(b"{"):
                out.append(orjson.loads(line))
        return out

    async def wait_event(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        async with asyncio.timeout(timeout):
            while True:
                for record in self.events():
                    if record.get("event") == event:
                        return record
                await asyncio.sleep(0.02)

    async def wait_admin(self, path: str, status: int, timeout: float = 10.0) -> None:
        """Poll the admin endpoint until it answers `status` (bounded by `timeout`)."""
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise RuntimeError(f"sidecar exited: {b''.join(self.stdout).decode()}")
                try:
                    async with session.get(self.admin_url + path) as response:
                        if response.status == status:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.02)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader  # the rest of its output
        return code

    async def stop(self) -> None:
        """Kill it and anything it started (its process group), by PID."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


def write_config(
    path: str,
    upstream_url: str,
    port: int,
    admin_port: int,
    *,
    server: dict[str, str] | None = None,
    extra: str = "",
) -> None:
    """Write a config file for a sidecar subprocess; `server` adds keys to `server:`."""
    lines = ["server:", f"  listen: 127.0.0.1:{port}", f"  admin_listen: 127.0.0.1:{admin_port}"]
    lines += [f"  {key}: {value}" for key, value in (server or {}).items()]
    lines += ["upstream:", f"  url: {upstream_url}"]
    text = "\n".join(lines) + "\n" + extra
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic, like a ConfigMap update: a watcher never sees half a file
