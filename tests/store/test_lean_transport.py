"""The lean Redis transport (sidecar/store/resp.py) under failure, against real servers.

Every test talks to a real redis-server, sometimes through tests/fault_proxy.py (a relay
that can stall the link). The raw redis-py client only looks and pokes (CLIENT LIST,
REPLICAOF); it never stands in for the server.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.connection import parse_url
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MaxClientsReachedError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from sidecar.config import ConfigError, load_config
from sidecar.config.model import StateConfig
from sidecar.store import ScriptCall, StateStore, check_state_config
from sidecar.store.redis import check_url
from sidecar.store.resp import LeanConnection, reply_error
from tests.fault_proxy import FaultProxy
from tests.redis_fixture import RedisServer, free_port, redis_executable
from tests.store.conftest import Observation, expect_error, poll_until
from tests.store.servers import make_certificate
from tests.store.twins import INCR_TTL, SPIN

OpenStore = Callable[..., tuple[StateStore, list[Observation]]]

ACL_USER, ACL_PASSWORD = "sidecar", "s3cret-pw"


def named(raw: redis.Redis, name: str) -> list[int]:
    """The ids of the connections Redis has open under CLIENT SETNAME `name`."""
    return [int(client["id"]) for client in raw.client_list() if client["name"] == name]


def others(raw: redis.Redis) -> int:
    """How many connections Redis has open besides `raw`'s own."""
    own = int(raw.client_id())
    return sum(1 for client in raw.client_list() if int(client["id"]) != own)


def accepted(raw: redis.Redis) -> int:
    """How many connections Redis has accepted since it started."""
    return int(raw.info("stats")["total_connections_received"])


@pytest.fixture
def spare() -> Iterator[Callable[..., RedisServer]]:
    """Start extra redis-servers for one test (with extra arguments); all killed after."""
    started: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        server = RedisServer(redis_executable(), extra_args=extra_args)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.cleanup()


@pytest.fixture
def acl_server(spare: Callable[..., RedisServer]) -> RedisServer:
    """A Redis whose default user is disabled: only the ACL user gets in."""
    return spare(
        "--user",
        "default",
        "off",
        "--user",
        ACL_USER,
        "on",
        f">{ACL_PASSWORD}",
        "~*",
        "&*",
        "+@all",
    )


def acl_raw(server: RedisServer, db: int = 0) -> redis.Redis:
    return redis.Redis(
        port=server.port, username=ACL_USER, password=ACL_PASSWORD, db=db, socket_timeout=10
    )


@pytest.fixture
async def fault_proxy() -> AsyncIterator[Callable[[int], FaultProxy]]:
    """Fault proxies in front of given ports; closed after the test."""
    opened: list[FaultProxy] = []

    def make(port: int) -> FaultProxy:
        proxy = FaultProxy(port)
        opened.append(proxy)
        return proxy

    yield make
    for proxy in opened:
        proxy.resume()
        await proxy.close()


# -- (a) many callers on one connection, some giving up ----------------------------------


async def test_a_thousand_callers_each_get_their_own_reply_with_a_third_cancelled(
    redis_server: RedisServer, redis_url: str, fault_proxy: Callable[[int], FaultProxy]
) -> None:
    proxy = await fault_proxy(redis_server.port).start()
    connection = LeanConnection(dict(parse_url(proxy.redis_url())), silence=60.0)
    try:
        assert await connection.pipeline([("PING",)]) == [b"PONG"]
        # The link stalls, so every batch is in flight (written, reply owed) when a third
        # of the callers give up; replies then arrive all together.
        proxy.blackhole()
        tasks = [
            asyncio.create_task(
                connection.pipeline(
                    [("ECHO", f"v{n}")] if n % 2 else [("ECHO", f"v{n}"), ("ECHO", f"w{n}")]
                )
            )
            for n in range(1000)
        ]

        async def all_sent() -> bool:
            return len(connection._protocol._pending) == 1000  # type: ignore[union-attr]

        await poll_until(all_sent, "1000 batches in flight")
        for task in tasks[::3]:
            task.cancel()
        proxy.resume()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for n, result in enumerate(results):
            if n % 3 == 0:
                assert isinstance(result, asyncio.CancelledError)
            elif n % 2:
                assert result == [f"v{n}".encode()]
            else:
                assert result == [f"v{n}".encode(), f"w{n}".encode()]
        # The same connection serves the next caller, in step.
        assert await connection.pipeline([("ECHO", "after")]) == [b"after"]
        assert proxy.connections == 1
    finally:
        await connection.close()


# -- (b) AUTH and SELECT ------------------------------------------------------------------


async def test_auth_and_select_from_the_url(
    redis_stores: OpenStore, acl_server: RedisServer
) -> None:
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{acl_server.port}/3"
    store, _ = redis_stores(url=url)
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (5, 60_000))]) == [5]
    in_db3, in_db0 = acl_raw(acl_server, db=3), acl_raw(acl_server, db=0)
    try:
        assert in_db3.get("test:n") == b"5"
        assert in_db0.get("test:n") is None
    finally:
        in_db3.close()
        in_db0.close()


async def test_a_refused_auth_is_unavailable_and_says_so(
    redis_stores: OpenStore, acl_server: RedisServer
) -> None:
    store, observed = redis_stores(url=f"redis://{ACL_USER}:wrong-pw@127.0.0.1:{acl_server.port}/3")
    error = await expect_error(store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]))
    assert error.kind == "unavailable"
    assert "AUTH" in str(error)
    assert "invalid username-password pair" in str(error)
    assert "wrong-pw" not in str(error)
    assert observed[-1][2] == "unavailable"
    # The refused connection is not left open.
    raw = acl_raw(acl_server)
    try:
        await poll_until(lambda: _async(others(raw) == 0), "the refused connection to close")
    finally:
        raw.close()


async def _async(value: bool) -> bool:
    return value


# -- (c) a slow reply, and a silent connection --------------------------------------------


async def test_a_slow_reply_times_out_only_its_caller_and_keeps_the_connection(
    redis_stores: OpenStore, redis_url: str, raw_redis: redis.Redis
) -> None:
    """X's reply arrives while A waits, so the connection is alive: A's timeout must not
    drop it under B, which was sent behind A and is still waiting. A's late reply is read
    and thrown away; B gets its own, and C after it, all on the one connection."""
    store, observed = redis_stores(url=f"{redis_url}?client_name=slow-reply", timeout=2.0)
    assert await store.ping() > 0
    [connection] = named(raw_redis, "slow-reply")
    # SPIN loaded first: were X and A both answered NOSCRIPT, their re-sends could reach
    # Redis in either order, and A's 1.4 s would run before X.
    assert await store.execute([ScriptCall(SPIN, (), (0,))]) == [1]

    # Redis runs them one after the other: X ends at ~1 s, A at ~2.4 s. (Wide margins:
    # other test runs may share the machine.)
    x = asyncio.create_task(store.execute([ScriptCall(SPIN, (), (1000,))]))
    # A must reach Redis after X started running: commands read in one go are all run
    # before any of their replies is flushed, so X's reply would wait for A's 1.4 s. A busy
    # Redis answers nobody, so there is nothing to wait on but time.
    await asyncio.sleep(0.2)
    a = asyncio.create_task(store.execute([ScriptCall(SPIN, (), (1400,))]))
    assert await x == [1]
    # B, sent at ~1 s, is answered once A's script ends (~2.4 s), within its timeout.
    b = asyncio.create_task(store.execute([ScriptCall(INCR_TTL, ("b",), (1, 60_000))]))
    error = await expect_error(a)  # gives up at ~2.2 s, while B is in flight
    assert error.kind == "timeout"
    assert await b == [1]
    assert await store.execute([ScriptCall(INCR_TTL, ("b",), (1, 60_000))]) == [2]
    assert named(raw_redis, "slow-reply") == [connection]
    kinds = [kind for label, _, kind in observed if label != "ping"]
    assert sorted(kinds, key=str) == [None, None, None, None, "timeout"]


async def test_a_connection_silent_for_a_whole_timeout_is_dropped_and_redialled(
    redis_stores: OpenStore, redis_server: RedisServer, redis_url: str,
    fault_proxy: Callable[[int], FaultProxy], raw_redis: redis.Redis,
) -> None:  # fmt: skip
    proxy = await fault_proxy(redis_server.port).start()
    store, _ = redis_stores(url=f"{proxy.redis_url()}?client_name=silent", timeout=0.2)
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]) == [1]
    [first] = named(raw_redis, "silent")

    proxy.blackhole()  # nothing comes back: a dead peer, as far as the store can tell
    assert (await expect_error(store.ping())).kind == "timeout"
    proxy.resume()

    # The silent connection was dropped by the call that gave up: this one dials anew.
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]) == [2]
    assert proxy.connections == 2
    await poll_until(
        lambda: _async(first not in named(raw_redis, "silent")), "the old one to close"
    )
    assert len(named(raw_redis, "silent")) == 1


async def test_a_fresh_connection_that_never_answers_is_dropped_by_its_first_caller(
    redis_stores: OpenStore, redis_server: RedisServer, redis_url: str,
    fault_proxy: Callable[[int], FaultProxy],
) -> None:  # fmt: skip
    """The first call's timeout began a moment before its dial: its connection has been
    silent for all of that timeout that it existed, which is silent enough."""
    proxy = await fault_proxy(redis_server.port).start()
    store, _ = redis_stores(url=proxy.redis_url(), timeout=0.2)
    proxy.drop_replies()  # requests reach Redis; no reply ever comes back
    assert (await expect_error(store.ping())).kind == "timeout"
    assert proxy.connections == 1
    assert (await expect_error(store.ping())).kind == "timeout"
    assert proxy.connections == 2  # the second call did not queue on the dead connection
    proxy.resume()  # closes the connections that lost a reply: the store has let go of them
    assert await store.ping() > 0
    assert proxy.connections == 3


# -- (d) a restart ------------------------------------------------------------------------


async def test_reconnects_after_redis_restarts(
    redis_stores: OpenStore, redis_server: RedisServer, raw_redis: redis.Redis, redis_url: str
) -> None:
    store, _ = redis_stores(url=f"{redis_url}?client_name=restart", timeout=1.0)
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]) == [1]
    # Off the event loop, so the store sees Redis close its connection meanwhile.
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(redis_server.start)
    # A new connection, and scripts loaded again (the new server has none).
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]) == [1]
    fresh = redis.Redis(port=redis_server.port, socket_timeout=10)
    try:
        assert len(named(fresh, "restart")) == 1
    finally:
        fresh.close()


# -- (e) the handshake stalls ---------------------------------------------------------------


async def test_a_timeout_during_auth_closes_that_connection(
    redis_stores: OpenStore, acl_server: RedisServer, fault_proxy: Callable[[int], FaultProxy]
) -> None:
    proxy = await fault_proxy(acl_server.port).start()
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{proxy.port}/3"
    store, _ = redis_stores(url=url, timeout=0.2)
    proxy.blackhole()  # the TCP connect succeeds; AUTH gets no answer
    assert (await expect_error(store.ping())).kind == "timeout"
    assert proxy.connections == 1
    raw = acl_raw(acl_server)
    try:
        received = accepted(raw)
        proxy.resume()  # the proxy dials Redis now and relays the held AUTH
        await poll_until(lambda: _async(accepted(raw) > received), "the proxy to reach Redis")
        # The store dropped its end, so the relayed connection closes; a leaked one, past
        # AUTH now, would stay open.
        await poll_until(lambda: _async(others(raw) == 0), "the half-set-up connection to close")
        assert await store.ping() > 0  # and the next call dials a new one
    finally:
        raw.close()


async def test_socket_connect_timeout_bounds_the_dial(
    redis_stores: OpenStore, acl_server: RedisServer, fault_proxy: Callable[[int], FaultProxy]
) -> None:
    proxy = await fault_proxy(acl_server.port).start()
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{proxy.port}/0?socket_connect_timeout=0.1"
    store, _ = redis_stores(url=url, timeout=10.0)
    proxy.blackhole()
    started = time.monotonic()
    error = await expect_error(store.ping())
    # Well before state.timeout, and "unavailable": the call never left the sidecar.
    assert time.monotonic() - started < 5.0
    assert error.kind == "unavailable"
    assert "socket_connect_timeout" in str(error)


# -- (f) READONLY ---------------------------------------------------------------------------


async def test_readonly_drops_the_connection_and_the_next_call_redials(
    redis_stores: OpenStore, redis_server: RedisServer, redis_url: str,
    spare: Callable[..., RedisServer],
) -> None:  # fmt: skip
    """A master demoted behind its address answers READONLY: that call fails
    "unavailable", and the store stops using the connection, so the next call dials
    again (behind a VIP or DNS name, that reaches the new master)."""
    target = spare()
    raw = redis.Redis(port=target.port, socket_timeout=10)
    try:
        store, _ = redis_stores(url=f"{target.url}?client_name=demoted")
        call = ScriptCall(INCR_TTL, ("n",), (1, 60_000))
        assert await store.execute([call]) == [1]
        [before] = named(raw, "demoted")

        raw.replicaof("127.0.0.1", redis_server.port)
        error = await expect_error(store.execute([call]))
        assert error.kind == "unavailable"
        assert "READONLY" in str(error) or "read only" in str(error)
        await poll_until(lambda: _async(named(raw, "demoted") == []), "the connection to close")

        raw.replicaof("NO", "ONE")
        # A key never written: whether or not the replica had synced the master's data.
        assert await store.execute([ScriptCall(INCR_TTL, ("m",), (1, 60_000))]) == [1]
        [after] = named(raw, "demoted")
        assert after != before
    finally:
        raw.close()


async def test_readonly_on_tls_drops_redis_pys_pooled_connections_too(
    redis_stores: OpenStore, redis_server: RedisServer, redis_url: str,
    spare: Callable[..., RedisServer], tmp_path: Path,
) -> None:  # fmt: skip
    """rediss:// uses redis-py's pool: after READONLY the store disconnects it, so the
    next call dials again, as on the lean transport."""
    cert, key = make_certificate(tmp_path)
    tls_port = free_port()
    target = spare(
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    raw = redis.Redis(port=target.port, socket_timeout=10)
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}&client_name=tls-demoted"
        store, _ = redis_stores(url=url)
        assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]) == [1]
        [before] = named(raw, "tls-demoted")

        raw.replicaof("127.0.0.1", redis_server.port)
        error = await expect_error(store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]))
        assert error.kind == "unavailable"
        await poll_until(lambda: _async(named(raw, "tls-demoted") == []), "the pool to let go")

        raw.replicaof("NO", "ONE")
        assert await store.execute([ScriptCall(INCR_TTL, ("m",), (1, 60_000))]) == [1]
        [after] = named(raw, "tls-demoted")
        assert after != before
    finally:
        raw.close()


# -- (g) keepalive --------------------------------------------------------------------------


def keepalive(store: StateStore) -> tuple[int, int | None]:
    """SO_KEEPALIVE and TCP_KEEPIDLE of the store's lean connection's socket."""
    protocol = store._lean._protocol  # type: ignore[attr-defined]
    sock = protocol.transport.get_extra_info("socket")
    idle = (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        if hasattr(socket, "TCP_KEEPIDLE")
        else None
    )
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), idle


async def test_tcp_keepalive_is_on_by_default(redis_stores: OpenStore, redis_url: str) -> None:
    store, _ = redis_stores(url=redis_url)
    await store.ping()
    on, idle = keepalive(store)
    assert on != 0
    assert idle in (None, 60)


async def test_socket_keepalive_false_turns_it_off(redis_stores: OpenStore, redis_url: str) -> None:
    store, _ = redis_stores(url=f"{redis_url}?socket_keepalive=false")
    await store.ping()
    assert keepalive(store)[0] == 0


# -- URL options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "db=2",
        "client_name=x",
        "socket_connect_timeout=0.5",
        "socket_keepalive=false",
        "password=pw&username=u",
        "protocol=2",
        "retry_on_timeout=false",
    ],
)
def test_url_options_the_lean_transport_honours(query: str) -> None:
    check_url(f"redis://h:6379/0?{query}")
    if not query.startswith("socket_keepalive"):  # TCP only: rejected on a unix socket
        check_url(f"unix:///run/redis.sock?{query}")


@pytest.mark.parametrize(
    "query, reason",
    [
        ("socket_timeout=1", "state.timeout bounds every call"),
        ("health_check_interval=10", "TCP keepalive"),
        ("socket_read_size=65536", "event loop"),
        ("retry_on_timeout=true", "at most once"),
        ("protocol=3", "RESP2"),
        ("max_connections=5", "state.max_connections"),
        ("decode_responses=true", "bytes"),
        ("socket_connect_timeout=0", "> 0"),
        ("lib_name=x", "not supported"),
        ("path=/tmp/x.sock", "not supported"),
    ],
)
def test_url_options_the_lean_transport_would_ignore_are_rejected(query: str, reason: str) -> None:
    name = query.partition("=")[0]
    for url in (
        f"redis://:hunter2@h:6379/0?{query}",
        f"unix:///run/redis.sock?password=hunter2&{query}",
    ):
        with pytest.raises(ValueError) as caught:
            check_state_config(StateConfig(url=url))
        message = str(caught.value)
        assert message.startswith(f"state.url: unsupported option {name}")
        assert reason in message
        assert "hunter2" not in message


def test_options_the_store_pins_are_rejected_on_tls_urls_too() -> None:
    check_url("rediss://h:6380/0?socket_timeout=1&health_check_interval=10")  # redis-py's own
    for query in ("protocol=3", "retry_on_timeout=true", "max_connections=5"):
        with pytest.raises(ValueError, match="unsupported option"):
            check_url(f"rediss://h:6380/0?{query}")


def test_a_rejected_option_is_a_config_error_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        'state:\n  key_prefix: "x:"\n  url: "redis://redis:6379/0?health_check_interval=5"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_state=check_state_config)
    text = str(caught.value)
    assert f"{path}:3" in text
    assert "state.url: unsupported option health_check_interval" in text


# -- error replies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, kind, message",
    [
        (
            "NOSCRIPT No matching script. Please use EVAL.",
            NoScriptError,
            "No matching script. Please use EVAL.",
        ),
        (
            "READONLY You can't write against a read only replica.",
            ReadOnlyError,
            "You can't write against a read only replica.",
        ),
        ("OOM command not allowed when used memory > 'maxmemory'.", OutOfMemoryError, None),
        ("LOADING Redis is loading the dataset in memory", BusyLoadingError, None),
        ("NOAUTH Authentication required.", AuthenticationError, None),
        (
            "WRONGPASS invalid username-password pair or user is disabled.",
            AuthenticationError,
            None,
        ),
        ("NOPERM this user has no permissions to run the 'eval' command", NoPermissionError, None),
        ("CLUSTERDOWN The cluster is down", ClusterDownError, None),
        ("TRYAGAIN Multiple keys request during rehashing of slot", TryAgainError, None),
        ("MOVED 3999 127.0.0.1:6381", MovedError, "3999 127.0.0.1:6381"),
        ("ASK 3999 127.0.0.1:6381", AskError, None),
        ("MOVED garbage", ResponseError, "MOVED garbage"),  # malformed: never raises
        (
            "ERR max number of clients reached",
            MaxClientsReachedError,  # a ConnectionError: the store is unavailable
            "max number of clients reached",
        ),
        (
            "ERR user_script:1: Script attempted to access nonexistent global",
            ResponseError,
            "user_script:1: Script attempted to access nonexistent global",
        ),
        (
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            ResponseError,
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ),
        (
            "BUSY Redis is busy running a script.",
            ResponseError,
            "BUSY Redis is busy running a script.",
        ),
        ("", ResponseError, ""),
    ],
)
def test_error_replies_map_to_redis_py_classes(
    reply: str, kind: type[Exception], message: str | None
) -> None:
    error = reply_error(reply)
    assert type(error) is kind
    if message is not None:
        assert str(error) == message


def test_error_mapping_matches_redis_py_parser_where_it_has_one() -> None:
    """Our copy of redis-py's (private) mapping gives the same class and text as the
    installed redis-py, so the two transports classify replies alike."""
    from redis._parsers import BaseParser  # the private module resp.py no longer imports

    replies = [
        "NOSCRIPT x", "READONLY y", "OOM z", "LOADING l", "NOAUTH a", "WRONGPASS w", "NOPERM p",
        "EXECABORT e", "TRYAGAIN t", "CLUSTERDOWN c", "MASTERDOWN m", "CROSSSLOT k",
        "MOVED 1 h:2", "ASK 1 h:2", "ERR invalid password", "ERR max number of clients reached",
        "ERR other", "WRONGTYPE w", "BUSY b",
    ]  # fmt: skip
    for reply in replies:
        ours, theirs = reply_error(reply), BaseParser.parse_error(reply)
        assert (type(ours), str(ours)) == (type(theirs), str(theirs)), reply
