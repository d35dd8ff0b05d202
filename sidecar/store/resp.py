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
public exception classes, see `reply_error`), so the store above does not know which
transport it runs on.

Failures, and why each is handled so (docs/state-store.md, "Connections"):
- a caller that gives up (its timeout, or a cancellation) leaves its batch queued: the late
  reply is read and thrown away, so every other caller still gets its own reply. Only a
  connection that has sent nothing for a whole `state.timeout` while owing replies is
  aborted (a dead peer or a wedged link), and only that one;
- a connection that fails during AUTH/SELECT, or whose caller gives up then, is aborted;
- a READONLY reply (a master demoted behind a VIP or DNS name) retires the connection: no
  new call goes on it, the next one dials again, and it closes once its replies are in.

Used for redis:// and unix:// URLs; TLS and Sentinel URLs keep redis-py's client.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Iterable, Mapping
from typing import Any, cast

import hiredis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    ConnectionError,
    DataError,
    ExecAbortError,
    MasterDownError,
    MaxClientsReachedError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

Command = tuple[str | bytes | int | float, ...]
_MORE = object()  # hiredis' answer when a reply is not complete yet

# -- error replies ------------------------------------------------------------------------

# The classes redis-py's own parser gives each error code (redis/_parsers/base.py, which is
# private: this is our copy of the part we rely on). The store classifies by class:
# NoScriptError reloads scripts; ConnectionError and its subclasses (auth, LOADING),
# ReadOnlyError, OutOfMemoryError, TryAgainError, ClusterDownError are "unavailable".
# Codes not listed (WRONGTYPE, BUSY, ...) are a plain ResponseError with the code kept.
_ERROR_CLASSES: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
    "LOADING": BusyLoadingError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "NOPERM": NoPermissionError,
    "EXECABORT": ExecAbortError,
    "TRYAGAIN": TryAgainError,
    "CLUSTERDOWN": ClusterDownError,
    "MASTERDOWN": MasterDownError,
    "CROSSSLOT": ClusterCrossSlotError,
    "MOVED": MovedError,
    "ASK": AskError,
}
# "ERR" replies are ResponseError, except these, told apart by their exact text.
_ERR_CLASSES: dict[str, type[RedisError]] = {
    "max number of clients reached": MaxClientsReachedError,  # a ConnectionError
    "invalid password": AuthenticationError,
    "wrong number of arguments for 'auth' command": AuthenticationWrongNumberOfArgsError,
    "wrong number of arguments for 'AUTH' command": AuthenticationWrongNumberOfArgsError,
    "AUTH <password> called without any password configured for the default user. "
    "Are you sure your configuration is correct?": AuthenticationError,
    "Client sent AUTH, but no password is set": AuthenticationError,
}


def reply_error(text: str) -> RedisError:
    """The exception for an error reply (`text` is the reply without its leading "-").

    As redis-py's parser does: a known code is stripped from the message and kept as
    `status_code`; an unknown one stays in the message. Never raises: hiredis calls this
    while parsing, and a raise there would lose the reply and shift every later one.
    """
    code, _, rest = text.partition(" ")
    if code == "ERR":
        return _ERR_CLASSES.get(rest, ResponseError)(rest, status_code=code)
    error_class = _ERROR_CLASSES.get(code)
    if error_class is None:
        return ResponseError(text)
    try:
        return error_class(rest, status_code=code)
    except ValueError:  # MOVED/ASK parse "slot host:port"; a malformed one is still an error
        return ResponseError(text)


# -- URL options --------------------------------------------------------------------------

# Query options of a redis:// or unix:// URL this transport honours (plus the userinfo and
# the path: user, password, host, port, database, socket path).
HONOURED_OPTIONS = frozenset(
    {"db", "username", "password", "client_name", "socket_connect_timeout", "socket_keepalive"}
)
# Why the others are refused, for the config error (anything else: "not supported").
_REFUSED_BECAUSE = {
    "socket_timeout": "state.timeout bounds every call, and a connection silent that long "
    "while owing replies is dropped",
    "health_check_interval": "the store's one connection learns at once when Redis closes it "
    "and redials on the next call, and TCP keepalive (on by default) finds a peer that "
    "vanished; a PING before use would add a round trip to a call",
    "socket_read_size": "reads are sized by the event loop",
    "socket_keepalive_options": "a URL cannot carry them; the store tunes keepalive itself",
    "retry_on_error": "calls are sent at most once, never retried",
    "retry": "calls are sent at most once, never retried",
}


def check_options(names: Iterable[str], options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first query option (of `names`) this transport would not
    honour; `options` are the URL's, as redis-py's parse_url reads them."""
    for name in names:
        if name not in HONOURED_OPTIONS:
            reason = _REFUSED_BECAUSE.get(name, "not supported on redis:// and unix:// URLs")
            raise ValueError(f"{name}: {reason}")
    connect_timeout = options.get("socket_connect_timeout")
    if connect_timeout is not None and not connect_timeout > 0:
        raise ValueError(f"socket_connect_timeout: must be > 0 seconds, not {connect_timeout:g}")


# -- the connection -----------------------------------------------------------------------

# TCP keepalive probing (where the platform has the knobs): an idle connection whose peer
# vanished without a FIN (host down, NAT or firewall state dropped) is found within about
# 60 + 3 * 10 s, instead of the kernel default of over two hours.
_KEEPALIVE_TUNING = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


# A caller's timeout starts a moment before its connection is dialled or its batch sent
# (packing, taking a slot): a connection silent for all but that moment of a whole timeout
# counts as silent for it.
_SILENT_SHARE = 0.95


class _Pending:
    """One batch waiting for its replies."""

    __slots__ = ("expected", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future = future
        self.expected = expected
        self.replies: list[Any] = []


class _RespProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, dialled_at: float) -> None:
        self._loop = loop
        self._reader = hiredis.Reader(replyError=self._error, notEnoughData=_MORE)
        self._pending: collections.deque[_Pending] = collections.deque()
        self.transport: asyncio.Transport | None = None
        # Set once nothing more may be sent on this connection: it was lost, aborted, or
        # retired after READONLY. Callers then fail at once and the next call redials.
        self.failed: BaseException | None = None
        # When bytes last came in, for the silence check; to begin with, when the dial
        # started: a connect is a request too, and a fresh connection that never answers
        # is as dead as an old one gone quiet.
        self.heard_at = dialled_at

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes, expected: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        if self.failed is not None or self.transport is None or self.transport.is_closing():
            future.set_exception(
                ConnectionError(f"the connection to Redis is closed: {self.failed}")
            )
            return future
        # Queued even if its caller later gives up (a timeout): its replies still arrive,
        # and must be consumed in order so the next batch gets its own.
        self._pending.append(_Pending(future, expected))
        self.transport.write(payload)
        return future

    def data_received(self, data: bytes) -> None:
        self.heard_at = self._loop.time()
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not _MORE:
            head = self._pending[0]
            head.replies.append(reply)
            if len(head.replies) == head.expected:
                self._pending.popleft()
                if not head.future.done():
                    head.future.set_result(head.replies)
        if self.failed is not None and not self._pending and self.transport is not None:
            self.transport.close()  # retired (READONLY) and every reply it owed is in

    def _error(self, text: str) -> RedisError:
        error = reply_error(text)
        if isinstance(error, ReadOnlyError) and self.failed is None:
            # The server behind this connection is a replica now (a demoted master behind
            # a VIP or DNS name): dialling again may reach the new master. Calls already
            # queued here still get their replies.
            self.failed = ConnectionError("Redis answered READONLY (now a replica)")
        return error

    def give_up(self, silence: float) -> None:
        """A caller stopped waiting for its reply (timeout or cancellation).

        Its batch stays queued, so that alone breaks nothing. But a connection that has
        received nothing for `silence` seconds while owing replies is dead or wedged:
        abort it (abort, not close: close would wait to flush to a peer that is gone), so
        the callers queued on it fail now and the next call dials again.
        """
        if self._pending and self._loop.time() - self.heard_at >= silence * _SILENT_SHARE:
            self.abort(f"Redis sent nothing for {silence:g} s while replies were owed")

    def abort(self, reason: str) -> None:
        if self.failed is None:
            self.failed = ConnectionError(reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failed is None:
            self.failed = exc or ConnectionError("Redis closed the connection")
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(ConnectionError(f"connection to Redis lost: {self.failed}"))

    def close(self) -> None:
        if self.failed is None:
            self.failed = ConnectionError("the store closed the connection")
        if self.transport is not None:
            self.transport.close()


class LeanConnection:
    """The store's connection to one Redis: dialled lazily, redialled after a failure.

    `silence`: how long a connection may owe replies without sending a byte before a
    caller that gives up aborts it (the store passes `state.timeout`).
    """

    def __init__(self, options: dict[str, Any], silence: float) -> None:
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._path: str | None = options.get("path")
        self._handshake = _handshake(options)
        self._connect_timeout: float | None = options.get("socket_connect_timeout")
        # On unless the URL says socket_keepalive=false (parse_url gives None for "").
        self._keepalive = options.get("socket_keepalive") is not False
        self._silence = silence
        self._protocol: _RespProtocol | None = None
        self._dialling: asyncio.Lock | None = None

    async def pipeline(self, commands: list[Command]) -> list[Any]:
        """Send the commands in one write; their replies (error replies as exceptions)."""
        try:
            payload = b"".join(_pack(command) for command in commands)
        except TypeError as exc:
            raise DataError(str(exc)) from None  # a bool or None argument: a caller bug
        protocol = await self._connected()
        replies = protocol.send(payload, len(commands))
        try:
            return await replies
        except asyncio.CancelledError:
            protocol.give_up(self._silence)  # the connection this caller used, no other
            raise

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def _connected(self) -> _RespProtocol:
        protocol = self._protocol
        if protocol is not None and protocol.failed is None:
            return protocol
        if self._dialling is None:
            self._dialling = asyncio.Lock()
        async with self._dialling:  # one dial for all the callers that found it down
            protocol = self._protocol
            if protocol is None or protocol.failed is not None:
                self._protocol = None  # a dial that fails leaves no broken connection behind
                protocol = self._protocol = await self._dial()
            return protocol

    async def _dial(self) -> _RespProtocol:
        """A connection that has passed AUTH/SELECT, within socket_connect_timeout if set."""
        bound = asyncio.timeout(self._connect_timeout)
        try:
            async with bound:
                protocol = await self._open()
                try:
                    await self._set_up(protocol)
                except BaseException:
                    # Failed, timed out or cancelled half-way: never leave it open.
                    protocol.abort("the connection setup did not complete")
                    raise
                return protocol
        except TimeoutError:
            if not bound.expired():
                raise
            raise ConnectionError(
                f"no connection to Redis within socket_connect_timeout={self._connect_timeout:g}s"
            ) from None

    async def _open(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()

        dialled_at = loop.time()

        def factory() -> _RespProtocol:
            return _RespProtocol(loop, dialled_at)

        if self._path is not None:
            _, protocol = await loop.create_unix_connection(factory, self._path)
            return protocol
        transport, protocol = await loop.create_connection(factory, self._host, self._port)
        if self._keepalive:
            _keep_alive(transport)
        return protocol

    async def _set_up(self, protocol: _RespProtocol) -> None:
        if not self._handshake:
            return
        replies = await protocol.send(
            b"".join(_pack(c) for c in self._handshake), len(self._handshake)
        )
        for command, reply in zip(self._handshake, replies, strict=True):
            if isinstance(reply, Exception):
                # The command's name only: AUTH's arguments hold the password.
                raise ConnectionError(f"Redis refused {command[0]!s} on connecting: {reply}")


def _keep_alive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE_TUNING:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _pack(command: Command) -> bytes:
    # hiredis' stub types a command as a 1-tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def _handshake(options: dict[str, Any]) -> list[Command]:
    """AUTH, SELECT and CLIENT SETNAME, sent before anything else on a new connection."""
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
