"""A raw-TCP app on 127.0.0.1 that plays a script per request, for the upstream client's
tests: it records every complete request with the connection it came on, and the script
decides what goes back on the wire (any bytes, held answers, a close, a reset).

A script is `async def script(conn, exchange)`: it is awaited once per complete request
(head and body read), writes whatever it wants with `conn.send`, and may end the
connection with `conn.close()`, `conn.reset()` or `conn.finish_writing()`. When it
returns, the app reads the next request on that connection, until the peer closes it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from tests.support import LoopbackServer, RawExchange, _read_raw_body


@dataclass
class Seen:
    """One complete request the app read, and the connection (by number) it came on."""

    connection: int
    exchange: RawExchange

    @property
    def request_line(self) -> bytes:
        return self.exchange.request_line


class AppConnection:
    """One connection accepted by the app, as its script sees it."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self.reader = reader
        self.writer = writer
        # Complete requests read on this connection so far.
        self.requests = 0
        # Set once the connection is over, whichever side ended it.
        self.ended = asyncio.Event()
        # The script closed or reset it: the app reads no further request on it.
        self.stopped = False

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        """A graceful close (FIN) once what was sent is flushed."""
        self.stopped = True
        self.writer.close()

    def reset(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0, then abort): no FIN, and
        whatever was not yet flushed is discarded."""
        self.stopped = True
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def finish_writing(self) -> None:
        """Half-close (FIN) and keep reading: `ended` is set only when the peer closes its
        side too, which is how a test knows the peer has seen the close."""
        self.writer.write_eof()


Script = Callable[[AppConnection, RawExchange], Awaitable[None]]


@dataclass(kw_only=True)
class ScriptedApp(LoopbackServer):
    script: Script
    seen: list[Seen] = field(default_factory=list)
    connections: list[AppConnection] = field(default_factory=list)

    def requests_on(self, index: int) -> list[RawExchange]:
        return [s.exchange for s in self.seen if s.connection == index]

    async def wait_requests(self, count: int, timeout: float = 5.0) -> None:
        """Until the app has read `count` complete requests (bounded)."""
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                await asyncio.sleep(0.005)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = AppConnection(len(self.connections), reader, writer)
        self.connections.append(conn)
        try:
            while not conn.stopped:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_raw_body(reader, head)
                exchange = RawExchange(head[:-4], body)
                conn.requests += 1
                self.seen.append(Seen(conn.index, exchange))
                await self.script(conn, exchange)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if not conn.stopped:
                writer.close()
            conn.ended.set()


@asynccontextmanager
async def scripted_app(script: Script) -> AsyncIterator[ScriptedApp]:
    app = await ScriptedApp(script=script).start()
    try:
        yield app
    finally:
        for conn in app.connections:
            if not conn.ended.is_set():
                conn.writer.transport.abort()
        await app.stop()


def answering(response: bytes) -> Script:
    """A script that answers every request with the same bytes."""

    async def script(conn: AppConnection, exchange: RawExchange) -> None:
        conn.send(response)
        await conn.drain()

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
