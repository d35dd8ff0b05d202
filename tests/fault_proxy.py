"""A fault-injecting TCP relay for tests: put it between the sidecar and a real server.

Modes, switched at any moment and applied to every connection, open or new:
- `pass_through()`: bytes flow both ways as they arrive (the start mode);
- `blackhole()`: nothing flows either way; what is sent meanwhile is held, as TCP would
  keep retransmitting it, and delivered in order on `resume()` (a partition that heals).
  A client that closes its connection while the link is down has its held bytes
  delivered all the same once it heals (its kernel keeps retransmitting them), then the
  relayed connection closes;
- `blackhole(drop_abandoned=True)`: the same, except that a connection its client closes
  while the link is down loses what was held for it, both ways, and is closed at once
  (never dialled, if it had not been yet): a client that gave up on a call and dropped
  the connection can count on that attempt never landing later, as after a reset, or
  when the server the partition hid is not the one found after it;
- `drop_replies()`: requests still reach the server and run, but every reply byte is
  thrown away, and a connection that lost a reply stays silent (what its client sends
  next is not delivered either) until `resume()` closes it (the link died after the
  request landed: the client never learns the outcome);
- `resume()`: back to pass-through.

It relays real bytes to a real server; nothing is simulated. New connections made while
the link is down are accepted (the kernel completes the handshake) and dialled upstream
only once it is up again. Each direction is read as bytes arrive, whatever the mode, so
a client's close is seen at once, even while its bytes are held.
"""

from __future__ import annotations

import asyncio
import contextlib
from enum import Enum


class Mode(Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    DROP_REPLIES = "drop_replies"


_EOF = b""


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode = Mode.PASS
        # Reply bytes thrown away in drop_replies mode (evidence the fault was hit).
        self.dropped_reply_bytes = 0
        # Bytes a client sent that were thrown away because it closed its connection
        # while the link was down (blackhole(drop_abandoned=True)).
        self.abandoned_bytes = 0
        # Connections accepted so far (open or closed).
        self.connections = 0
        self._drop_abandoned = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        """Connections still relayed (or waiting to be): a closed one delivers nothing more."""
        return len(self._links)

    def redis_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    # -- the faults ----------------------------------------------------------------------

    def pass_through(self) -> None:
        self.resume()

    def blackhole(self, *, drop_abandoned: bool = False) -> None:
        self.mode = Mode.BLACKHOLE
        self._drop_abandoned = drop_abandoned
        self._flowing.clear()

    def drop_replies(self) -> None:
        self.mode = Mode.DROP_REPLIES
        self._flowing.set()

    def resume(self) -> None:
        self.mode = Mode.PASS
        self._drop_abandoned = False
        for link in list(self._links):
            if link.doomed:
                link.end()
        self._flowing.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.end()
        # Each relay closes both its ends as it finishes, which it does at once once ended.
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(OSError):
                await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- relaying ------------------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)  # type: ignore[arg-type]
        self.connections += 1
        link = _Link(self, client_r, client_w)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)
            self._handlers.discard(handler)  # type: ignore[arg-type]

    def _client_left_while_down(self) -> bool:
        return self._drop_abandoned and not self._flowing.is_set()


class _Link:
    """One client connection and, once the link is up, its connection to the server."""

    def __init__(
        self, proxy: FaultProxy, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_r = client_r
        self.client_w = client_w
        self.server_w: asyncio.StreamWriter | None = None
        # This connection lost a reply: it carries nothing more, either way.
        self.doomed = False
        self._up: asyncio.Queue[bytes] = asyncio.Queue()
        self._down: asyncio.Queue[bytes] = asyncio.Queue()
        self._ended = asyncio.Event()
        # What the client-to-server delivery has taken off its queue and not yet written.
        self._in_hand = _EOF

    def end(self) -> None:
        self._ended.set()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._read(self.client_r, self._up, client=True))]
        ended = asyncio.create_task(self._ended.wait())
        try:
            dial = asyncio.create_task(self._dial())
            tasks.append(dial)
            await asyncio.wait({dial, ended}, return_when=asyncio.FIRST_COMPLETED)
            if self._ended.is_set() or dial.exception() is not None:
                return
            server_r, self.server_w = dial.result()
            tasks += [
                asyncio.create_task(self._read(server_r, self._down, client=False)),
                asyncio.create_task(self._deliver(self._up, self.server_w, upstream=True)),
                asyncio.create_task(self._deliver(self._down, self.client_w, upstream=False)),
            ]
            await ended
        finally:
            ended.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, ended, return_exceptions=True)
            self.client_w.close()
            if self.server_w is not None:
                self.server_w.close()

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await self.proxy._flowing.wait()
        return await asyncio.open_connection(self.proxy.upstream_host, self.proxy.upstream_port)

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[bytes], *, client: bool
    ) -> None:
        """Everything the peer sends, as it arrives; its close as one empty chunk."""
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = _EOF
            if not data and client and self.proxy._client_left_while_down():
                # The client gave up while its bytes were held: they never land.
                self.proxy.abandoned_bytes += len(self._in_hand)
                while not queue.empty():
                    self.proxy.abandoned_bytes += len(queue.get_nowait())
                self.end()
                return
            queue.put_nowait(data)
            if not data:
                return

    async def _deliver(
        self, queue: asyncio.Queue[bytes], writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while True:
            data = await queue.get()
            if upstream:
                self._in_hand = data
            # Held while the link is down (blackhole), delivered in order once it is up.
            await self.proxy._flowing.wait()
            self._in_hand = _EOF
            if not data:
                self.end()  # that side closed: so does the relayed connection
                return
            if not upstream and self.proxy.mode is Mode.DROP_REPLIES:
                self.proxy.dropped_reply_bytes += len(data)
                self.doomed = True
            if self.doomed:
                continue
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                self.end()
                return
