"""The Redis state store: scripts run by EVALSHA, a batch costs one pipeline round trip.

This is the only module of the sidecar that imports redis-py. Every failure leaves it as a
`StoreError`: "timeout" (no answer within `state.timeout`), "unavailable" (cannot reach or
use Redis) or "script" (a script raised, or was called wrongly).

Calls are sent at most once. redis-py's retries are turned off because a retried pipeline
whose first attempt reached Redis would run non-idempotent scripts (counters) twice; the
caller already decides what a failed call means (fail open or closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    DataError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from sidecar.config.describe import mask_url
from sidecar.config.model import StateConfig
from sidecar.store.base import Script, ScriptCall, ScriptResult, StoreError
from sidecar.store.observe import StoreObserver, batch_label, report
from sidecar.store.resp import LeanConnection, check_options, usable_for

T = TypeVar("T")
Command = tuple[Any, ...]

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_DEFAULT_PORT = 26379

# For error messages: "scheme://user:PASSWORD@" and "?...password=PASSWORD".

# Errors meaning "Redis cannot serve this now", not "the script is wrong": connection
# trouble, and replies like READONLY (a demoted master) or OOM. BUSY (another script overran
# busy-reply-threshold) has no exception class of its own in redis-py.
_UNAVAILABLE = (ConnectionError, ReadOnlyError, OutOfMemoryError, TryAgainError, ClusterDownError)


class RedisStore:
    """A `StateStore` on Redis (plain, TLS, unix socket or behind Sentinel)."""

    def __init__(self, config: StateConfig, observe: StoreObserver | None = None) -> None:
        self._prefix = config.key_prefix
        self._timeout = config.timeout
        self._observe = observe
        # Waiting for a free connection counts against the call's timeout, so a saturated
        # pool reports "timeout" instead of redis-py's "Too many connections" error.
        self._slots = asyncio.Semaphore(config.max_connections)
        check_url(config.url)  # fail now on a URL option nobody would read, not on first use
        self._lean = _lean_connection(config)
        self._client: Redis | None = None
        self._sentinel: Sentinel | None = None
        if self._lean is None:
            self._client, self._sentinel = _make_client(config)
        self._closed = False

    @property
    def backend(self) -> str:
        return "redis"

    async def execute(self, calls: Sequence[ScriptCall]) -> list[ScriptResult]:
        if not calls:
            return []
        label = batch_label(calls)
        started = time.perf_counter()
        try:
            results = await self._guarded(lambda: self._run(calls))
        except StoreError as exc:
            report(self._observe, label, started, exc)
            raise
        report(self._observe, label, started, None)
        return results

    async def ping(self) -> float:
        started = time.perf_counter()
        try:
            elapsed = await self._guarded(self._ping)
        except StoreError as exc:
            report(self._observe, "ping", started, exc)
            raise
        report(self._observe, "ping", started, None)
        return elapsed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lean is not None:
            await self._lean.close()
        if self._client is not None:
            await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    # -- one guarded operation ----------------------------------------------------------

    async def _guarded(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation` on a pool slot within the timeout; every failure -> StoreError."""
        if self._closed:
            raise StoreError("unavailable", "the store is closed")
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    return await operation()
        except TimeoutError as exc:
            # The lean transport decides itself whether the connection this call used is
            # dead (silent for a whole timeout): see LeanConnection.pipeline.
            raise StoreError("timeout", f"no answer within {self._timeout * 1000:g} ms") from exc
        except RedisTimeoutError as exc:
            raise StoreError("timeout", str(exc)) from exc
        except (ConnectionError, OSError) as exc:
            raise StoreError("unavailable", _describe(exc)) from exc
        except DataError as exc:
            # redis-py refused to encode an argument (a bool, None...): a caller bug.
            raise StoreError("script", str(exc)) from exc
        except RedisError as exc:
            raise StoreError(_reply_kind(exc), _describe(exc)) from exc

    async def _ping(self) -> float:
        started = time.perf_counter()
        if self._lean is not None:
            (reply,) = await self._lean.pipeline([("PING",)])
            if isinstance(reply, Exception):
                raise reply
        else:
            assert self._client is not None
            await self._client.ping()
        return time.perf_counter() - started

    # -- scripts ------------------------------------------------------------------------

    async def _run(self, calls: Sequence[ScriptCall]) -> list[ScriptResult]:
        replies = await self._pipeline([self._evalsha(call) for call in calls])
        missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            replies = await self._load_and_rerun(calls, replies, missing)
        return [_result(call, reply) for call, reply in zip(calls, replies, strict=True)]

    async def _load_and_rerun(
        self, calls: Sequence[ScriptCall], replies: list[Any], missing: list[int]
    ) -> list[Any]:
        """Load the scripts Redis did not know and re-send only the calls that failed.

        A NOSCRIPT reply means that call did not run, while every other call of the batch
        did: re-sending those would run them twice. Loads and re-sent calls share one
        pipeline, so the cold path costs exactly one extra round trip.
        """
        scripts = list({calls[index].script.lua: calls[index].script for index in missing}.values())
        loads: list[Command] = [("SCRIPT", "LOAD", script.lua) for script in scripts]
        reruns = [self._evalsha(calls[index]) for index in missing]
        answers = await self._pipeline(loads + reruns)
        for script, answer in zip(scripts, answers, strict=False):
            if isinstance(answer, ResponseError):
                raise StoreError(_reply_kind(answer), f"{script.name}: cannot load: {answer}")
        merged = list(replies)
        for index, answer in zip(missing, answers[len(loads) :], strict=True):
            merged[index] = answer
        return merged

    def _evalsha(self, call: ScriptCall) -> Command:
        keys = [self._prefix + key for key in call.keys]
        return ("EVALSHA", script_sha(call.script), len(keys), *keys, *call.args)

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        """Send all commands in one write and read all replies: one round trip.

        Error replies come back in the list (raise_on_error=False) so one failing call
        cannot hide what happened to the others. Scripts are not registered with the
        pipeline on purpose: its auto-loading asks SCRIPT EXISTS first, every time.
        """
        if self._lean is not None:
            replies: list[Any] = await self._lean.pipeline(commands)
            return replies
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
        if self._sentinel is None and any(isinstance(reply, ReadOnlyError) for reply in replies):
            # A demoted master (behind a VIP or DNS name), as the lean transport handles it:
            # drop the pooled connections so the next calls dial again. (Sentinel's own
            # connections already drop themselves on READONLY and ask the sentinels.)
            await self._client.connection_pool.disconnect(inuse_connections=False)
        return replies


def script_sha(script: Script) -> str:
    """The SHA1 EVALSHA names a script by, computed here rather than asked of Redis."""
    return _sha1(script.lua)


@cache
def _sha1(lua: str) -> str:
    # Scripts are a small static set, so this cache stays small.
    return hashlib.sha1(lua.encode()).hexdigest()


def _result(call: ScriptCall, reply: Any) -> ScriptResult:
    """The reply as the caller sees it, or StoreError if it (or a nested value) is an error."""
    if isinstance(reply, RedisError):
        raise StoreError(_reply_kind(reply), f"{call.script.name}: {reply}")
    if isinstance(reply, list):
        for item in reply:
            _result(call, item)
    return reply


def _reply_kind(error: RedisError) -> str:
    """The StoreError kind of a Redis error: only the script's own failures are "script"."""
    if isinstance(error, RedisTimeoutError):
        return "timeout"
    if isinstance(error, _UNAVAILABLE) or str(error).startswith("BUSY"):
        return "unavailable"
    return "script"


def _describe(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- building the client (no I/O happens here) --------------------------------------------


def _lean_connection(config: StateConfig) -> LeanConnection | None:
    """The lean transport for plain and unix-socket URLs (see store/resp.py); TLS and
    Sentinel URLs use redis-py's client."""
    if urlsplit(config.url).scheme.lower() == SENTINEL_SCHEME:
        return None
    options: dict[str, Any] = dict(parse_url(config.url))
    return LeanConnection(options, silence=config.timeout) if usable_for(options) else None


def _make_client(config: StateConfig) -> tuple[Redis, Sentinel | None]:
    if urlsplit(config.url).scheme.lower() == SENTINEL_SCHEME:
        return _sentinel_client(parse_sentinel_url(config.url), config)
    # redis://, rediss:// (TLS; ssl_* options in the query) and unix:// are redis-py's own
    # URL forms. The URL may tune the socket; the settings the store relies on win.
    # (No socket timeouts needed: asyncio.timeout(config.timeout) bounds every call.)
    # TCP keepalive is on unless the URL turns it off, as on the lean transport.
    options: dict[str, Any] = {
        "socket_keepalive": True,
        **parse_url(config.url),
        **_pinned(config),
    }
    pool = ConnectionPool(**options)
    _check_options(pool, config.url)
    return Redis.from_pool(pool), None


def check_url(url: str) -> None:
    """Raise ValueError for a URL the store could not use (no client is built, no I/O)."""
    if urlsplit(url).scheme.lower() == SENTINEL_SCHEME:
        parse_sentinel_url(url)
        return
    try:
        options = parse_url(url)
    except ValueError as exc:
        raise ValueError(f"state.url: {exc}: {mask_url(url)}") from None
    query = {name: values[-1] for name, values in parse_qs(urlsplit(url).query).items()}
    try:
        _check_pinned(query)
        if usable_for(dict(options)):
            check_options(set(query) - set(_PINNED), dict(options))
    except ValueError as exc:
        raise ValueError(f"state.url: unsupported option {exc}: {mask_url(url)}") from None
    _check_options(ConnectionPool(**options), url)


# URL options whose value the store fixes on every transport: accepted only when they ask
# for what the store does anyway, so that no setting in the URL is silently overridden.
_FALSE = frozenset({"0", "f", "false", "n", "no"})  # as redis-py reads a false value
_PINNED: dict[str, tuple[frozenset[str], str]] = {
    "protocol": (
        frozenset({"2"}),
        "the store speaks RESP2 only, so that script replies have one shape everywhere",
    ),
    "retry_on_timeout": (_FALSE, "calls are sent at most once, never retried"),
    "decode_responses": (_FALSE, "replies are bytes"),
    "max_connections": (frozenset(), "set state.max_connections instead"),
}


def _check_pinned(query: dict[str, str]) -> None:
    for name, (allowed, reason) in _PINNED.items():
        if name in query and query[name].lower() not in allowed:
            raise ValueError(f"{name}={query[name]}: {reason}")


def _check_options(pool: ConnectionPool, url: str) -> None:
    """Fail now on an unknown URL query option, not with a TypeError on first use.

    Connections are only built lazily; building one here (no I/O) checks its arguments.
    """
    try:
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        raise ValueError(f"state.url: unsupported option in {mask_url(url)}: {exc}") from None


def _pinned(config: StateConfig) -> dict[str, Any]:
    return {
        "max_connections": config.max_connections,
        # No retries: see the module docstring.
        "retry": Retry(NoBackoff(), 0),
        # Replies keep the Lua -> RESP2 shapes the memory backend mirrors: under RESP3 a
        # script using redis.setresp(3) could return maps and booleans. (No HELLO, either.)
        "protocol": 2,
        "decode_responses": False,
        # redis-py 8 skips its stale-connection check on pool checkout while maintenance
        # notifications are on ("auto" by default), so after a Redis restart the first
        # call on every pooled connection would fail. They need RESP3 anyway.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }


def _sentinel_client(url: SentinelURL, config: StateConfig) -> tuple[Redis, Sentinel]:
    # Discovery asks the sentinels one after another; each gets a slice of the call's
    # timeout so one hung sentinel cannot use it all and hide the others.
    per_sentinel = config.timeout / (len(url.sentinels) + 1)
    sentinel_options = _pinned(config) | {
        "socket_timeout": per_sentinel,
        "socket_connect_timeout": per_sentinel,
    }
    if url.sentinel_password is not None:
        sentinel_options["password"] = url.sentinel_password
        sentinel_options["username"] = url.sentinel_username
    sentinel = Sentinel(url.sentinels, sentinel_kwargs=sentinel_options)
    # The URL's userinfo authenticates to the master, as it does in a redis:// URL.
    client = sentinel.master_for(
        url.service,
        db=url.db,
        username=url.username,
        password=url.password,
        socket_keepalive=True,
        **_pinned(config),
    )
    return client, sentinel


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`,
    with optional `?sentinel_password=...&sentinel_username=...` for the sentinels."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelURL:
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _userinfo(userinfo)
    sentinels = [_host_port(item, url) for item in hostlist.split(",") if item]
    if not sentinels:
        raise ValueError(f"state.url names no sentinel: {mask_url(url)}")
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError(f"state.url must end in /service_name[/db]: {mask_url(url)}")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"state.url: database must be a number: {mask_url(url)}") from None
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"state.url: unknown sentinel options {sorted(unknown)}: {mask_url(url)}")
    return SentinelURL(
        sentinels=sentinels,
        service=path[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
    )


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if has_password else None)


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.partition(":")
    try:
        port = int(port_text) if port_text else SENTINEL_DEFAULT_PORT
    except ValueError:
        raise ValueError(f"state.url: bad sentinel port in {item!r}: {mask_url(url)}") from None
    if not host:
        raise ValueError(f"state.url: empty sentinel host: {mask_url(url)}")
    return host, port
