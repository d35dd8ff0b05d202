"""A lean Redis transport: one connection per store, every call pipelined on it.

Why not redis-py's client for the hot path: measured on the benchmark machine, one EVALSHA
through redis-py's asyncio pipeline costs ~150 µs of the sidecar's CPU (~125 µs as a plain
call): pool checkout, a pipeline object, command packing and reply handling in Python. The
same call written with hiredis' C packer and parsed by hiredis' C reader on one asyncio
connection costs ~55 µs. For a policy that makes one store call per request that is the
difference between a cheap and an expensive feature.

Concurrent calls share the connection: their commands go out in order and their replies
come back in the same order (Redis answers one connection in order), so nothing waits for
a free connection and a busy sidecar gets pipelining for free. Replies, error replies
included, have exactly the shapes redis-py's pipeline gives (error replies become redis-py's
exception classes), so the store above does not know which transport it runs on.

Used for redis:// and unix:// URLs; TLS and Sentinel URLs keep redis-py's client.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

import hiredis
from redis._parsers import BaseParser
from redis.exceptions import ConnectionError, DataError

Command = tuple[str | bytes | int | float, ...]
_MORE = object()  # hiredis' answer when a reply is not complete yet


class _Pending:
    """One batch waiting for its replies."""

    __slots__ = ("expected", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future = future
        self.expected = expected
        self.replies: list[Any] = []


class _RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)
        self._pending: collections.deque[_Pending] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes, expected: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            future.set_exception(ConnectionError("the connection to Redis is closed"))
            return future
        # Queued even if its caller later gives up (a timeout): its replies still arrive,
        # and must be consumed in order so the next batch gets its own.
        self._pending.append(_Pending(future, expected))
        self.transport.write(payload)
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not _MORE:
            head = self._pending[0]
            head.replies.append(reply)
            if len(head.replies) == head.expected:
                self._pending.popleft()
                if not head.future.done():
                    head.future.set_result(head.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(ConnectionError(f"connection to Redis lost: {self.lost}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class LeanConnection:
    """The store's connection to one Redis: dialled lazily, redialled after a failure."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._path: str | None = options.get("path")
        self._handshake = _handshake(options)
        self._protocol: _RespProtocol | None = None
        self._dialling: asyncio.Lock | None = None

    async def pipeline(self, commands: list[Command]) -> list[Any]:
        """Send the commands in one write; their replies (error replies as exceptions)."""
        try:
            payload = b"".join(_pack(command) for command in commands)
        except TypeError as exc:
            raise DataError(str(exc)) from None  # a bool or None argument: a caller bug
        protocol = await self._connected()
        return await protocol.send(payload, len(commands))

    def reset(self) -> None:
        """Drop the connection (after a timeout it may be wedged); the next call redials."""
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def close(self) -> None:
        self.reset()

    async def _connected(self) -> _RespProtocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._dialling is None:
            self._dialling = asyncio.Lock()
        async with self._dialling:  # one dial for all the callers that found it down
            if self._protocol is None or self._protocol.lost is not None:
                self._protocol = await self._dial()
            return self._protocol

    async def _dial(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        if self._path is not None:
            _, protocol = await loop.create_unix_connection(_RespProtocol, self._path)
        else:
            _, protocol = await loop.create_connection(_RespProtocol, self._host, self._port)
        if self._handshake:
            replies = await protocol.send(
                b"".join(_pack(c) for c in self._handshake), len(self._handshake)
            )
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            if failed is not None:
                protocol.close()
                raise ConnectionError(f"Redis refused the connection setup: {failed}")
        return protocol


def _pack(command: Command) -> bytes:
    # hiredis' stub types a command as a 1-tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def _handshake(options: dict[str, Any]) -> list[Command]:
    """AUTH and SELECT, sent before anything else on a new connection."""
    commands: list[Command] = []
    password = options.get("password")
    if password is not None:
        username = options.get("username")
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    db = int(options.get("db") or 0)
    if db:
        commands.append(("SELECT", db))
    client_name = options.get("client_name")
    if client_name:
        commands.append(("CLIENT", "SETNAME", client_name))
    return commands


def usable_for(options: dict[str, Any]) -> bool:
    """Whether this transport can serve the URL (plain TCP or unix socket, no TLS)."""
    connection_class = options.get("connection_class")
    return connection_class is None or connection_class.__name__ == "UnixDomainSocketConnection"
