"""A TCP relay in front of Redis that counts request/response turns.

A "turn" starts whenever the client sends after having received something (or first
sends on a connection). A pipelined batch is one turn however many commands it holds;
a SCRIPT EXISTS before the batch, or a NOSCRIPT retry, would be a second one. It relays
real bytes to a real server: nothing is simulated. It can also hold Redis' replies back
(`hold`/`release`): requests still reach Redis and run, but stay in flight for the client.
"""

from __future__ import annotations

import asyncio
import contextlib


class TurnCountingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.turns = 0
        # When set, the next reply from Redis is dropped and the client's connection cut:
        # the request did reach Redis, the client never learns what happened.
        self.cut_next_reply = False
        self._replies_open = asyncio.Event()
        self._replies_open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        self._replies_open.clear()

    def release(self) -> None:
        self._replies_open.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        # Per connection: has the server answered since the client last sent?
        state = {"answered": True}
        up = asyncio.create_task(self._relay(client_r, server_w, state, upstream=True))
        down = asyncio.create_task(self._relay(server_r, client_w, state, upstream=False))
        self._tasks |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            client_w.close()
            server_w.close()
            self._tasks -= {up, down}

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: dict[str, bool],
        upstream: bool,
    ) -> None:
        while data := await reader.read(65536):
            if upstream and state["answered"]:
                self.turns += 1
                state["answered"] = False
            elif not upstream:
                await self._replies_open.wait()
                state["answered"] = True
                if self.cut_next_reply:
                    self.cut_next_reply = False
                    writer.close()
                    return
            writer.write(data)
            await writer.drain()
