"""The keep-alive connections of one forwarder to the app.

Idle connections are kept most-recent first (LIFO), so a quiet period lets the least used
ones reach `upstream.idle_timeout` and close while the busy ones stay warm. A connection
older than that is never handed out: the idle timeout sits below the app server's own
keep-alive timeout, so the app does not close a connection just as a request is written
to it. One the app closed while it sat idle is noticed (its EOF) and dropped, and
`take_idle` skips any that is closing: finding a pooled connection dead before writing to
it costs a new connection, never a resent request.

How many connections are in use at once is bounded by the forwarder's ConnectionBudget,
not here: a connection is only ever made for a request that holds a budget slot and found
no idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from functools import partial

from sidecar import errors
from sidecar.chain import Failure, UpstreamFailure
from sidecar.config import UpstreamConfig
from sidecar.http1.connection import AppConnection


class AppPool:
    """Connections to the app: idle ones to reuse, new ones made on demand."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._host = config.host
        self._port = config.port
        self._ssl = ssl.create_default_context() if config.scheme == "https" else None
        self._connect_timeout = config.connect_timeout
        self._idle_timeout = config.idle_timeout
        self._idle: deque[AppConnection] = deque()
        self._open: set[AppConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def take_idle(self) -> AppConnection | None:
        """The most recently used idle connection still fit to carry a request."""
        idle = self._idle
        if not idle:
            return None
        now = idle[-1].loop.time()  # a connection knows its loop: no lookup per request
        while idle:
            connection = idle.pop()
            since = connection.idle_since
            connection.idle_since = None
            if connection.usable and since is not None and now - since < self._idle_timeout:
                return connection
            connection.close()
        return None

    async def connect(self) -> AppConnection:
        """A new connection (UpstreamFailure `connect` or `connect_timeout` if none can
        be made: nothing of the request was sent)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout) as timer:
                _, protocol = await loop.create_connection(
                    partial(AppConnection, self, loop), self._host, self._port, ssl=self._ssl
                )
        except TimeoutError:
            if not timer.expired():
                raise  # the caller's own deadline
            raise UpstreamFailure(
                Failure.CONNECT_TIMEOUT,
                errors.UPSTREAM_CONNECT_FAILED,
                f"connecting to the upstream took longer than {self._connect_timeout:g}s",
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UpstreamFailure(
                Failure.CONNECT,
                errors.UPSTREAM_CONNECT_FAILED,
                f"cannot connect to the upstream: {reason}",
            ) from None
        if self._closed:
            protocol.abort()
            raise UpstreamFailure(
                Failure.CONNECT, errors.UPSTREAM_CONNECT_FAILED, "the connection pool was closed"
            )
        self._open.add(protocol)
        return protocol

    def put(self, connection: AppConnection) -> None:
        """A connection whose exchange ended cleanly, for the next request."""
        if self._closed or not connection.usable:
            connection.close()
            return
        loop = connection.loop
        connection.idle_since = loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(self._idle_timeout, self._close_expired)

    def lost(self, connection: AppConnection) -> None:
        self._open.discard(connection)
        if connection.idle_since is not None:
            connection.idle_since = None
            with contextlib.suppress(ValueError):
                self._idle.remove(connection)

    def close_idle(self) -> None:
        """Close every idle connection (they would count against a budget shared with
        the next pool)."""
        while self._idle:
            connection = self._idle.pop()
            connection.idle_since = None
            connection.close()

    def close(self) -> None:
        """Close everything, in use or not: nothing more goes through this pool."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.close_idle()
        for connection in self._open:
            connection.abort()
        self._open.clear()

    def _close_expired(self) -> None:
        """Close the connections idle for idle_timeout (the oldest are on the left)."""
        self._sweep = None
        idle = self._idle
        loop = asyncio.get_running_loop()
        now = loop.time()
        while idle:
            since = idle[0].idle_since
            if since is not None and now - since < self._idle_timeout:
                self._sweep = loop.call_later(since + self._idle_timeout - now, self._close_expired)
                return
            connection = idle.popleft()
            connection.idle_since = None
            connection.close()
