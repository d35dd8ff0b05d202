"""Redis-only behaviour: script loading, round trips, outages, timeouts, URL schemes.

All against real redis-server processes; the raw client only looks and pokes (SCRIPT
FLUSH, INFO, CONFIG), it never stands in for the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from sidecar.store import Script, ScriptCall, StateStore
from sidecar.store.redis import parse_sentinel_url, script_sha
from tests.redis_fixture import RedisServer, free_port
from tests.store.conftest import PREFIX, Observation, expect_error, poll_until
from tests.store.proxy import TurnCountingProxy
from tests.store.servers import MASTER_PASSWORD, SENTINEL_PASSWORD, SERVICE, SecureServers
from tests.store.twins import CAS, GET_MANY, INCR_TTL, OP, SPIN

OpenStore = Callable[..., tuple[StateStore, list[Observation]]]


def command_calls(raw: redis.Redis, prefix: str) -> int:
    """How many commands whose stats name starts with `prefix` the server has run."""
    stats = raw.info("commandstats")
    return sum(int(value["calls"]) for name, value in stats.items() if name.startswith(prefix))


def three_calls() -> list[ScriptCall]:
    return [
        ScriptCall(INCR_TTL, ("a",), (1, 60_000)),
        ScriptCall(OP, ("b",), ("SET", "x")),
        ScriptCall(GET_MANY, ("a", "b")),
    ]


# -- script loading ------------------------------------------------------------------


async def test_scripts_are_loaded_on_first_use(
    redis_stores: OpenStore, raw_redis: redis.Redis
) -> None:
    raw_redis.script_flush()
    store, _ = redis_stores()
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 60_000))]) == [1]
    assert raw_redis.script_exists(script_sha(INCR_TTL)) == [True]


async def test_execute_survives_script_flush(
    redis_stores: OpenStore, raw_redis: redis.Redis
) -> None:
    store, _ = redis_stores()
    call = ScriptCall(INCR_TTL, ("n",), (1, 60_000))
    assert await store.execute([call]) == [1]
    raw_redis.script_flush()
    assert await store.execute([call]) == [2]
    assert raw_redis.get(f"{PREFIX}n") == b"2"


async def test_noscript_reruns_only_the_calls_that_did_not_run(
    redis_stores: OpenStore, raw_redis: redis.Redis
) -> None:
    store, _ = redis_stores()
    raw_redis.script_flush()
    raw_redis.script_load(INCR_TTL.lua)  # loaded: its calls run on the first send
    batch = [
        ScriptCall(INCR_TTL, ("loaded",), (1, 60_000)),
        ScriptCall(OP, ("unloaded",), ("INCRBY", "1")),
        ScriptCall(INCR_TTL, ("loaded",), (10, 60_000)),
        ScriptCall(OP, ("unloaded",), ("INCRBY", "10")),
        ScriptCall(CAS, ("h",), ("f", "", "v")),
    ]
    # Results in call order, each counter bumped exactly once per call.
    assert await store.execute(batch) == [1, 1, 11, 11, [1, b"v"]]
    assert raw_redis.get(f"{PREFIX}loaded") == b"11"
    assert raw_redis.get(f"{PREFIX}unloaded") == b"11"
    assert raw_redis.script_exists(script_sha(OP), script_sha(CAS)) == [True, True]


async def test_broken_lua_is_a_script_error(redis_stores: OpenStore) -> None:
    broken = Script("broken", "return {", lambda ks, keys, args: None)
    store, observed = redis_stores()
    error = await expect_error(store.execute([ScriptCall(broken, ())]))
    assert error.kind == "script"
    assert "broken" in str(error)
    assert observed[-1][2] == "script"


async def test_error_nested_in_a_table_is_a_script_error(redis_stores: OpenStore) -> None:
    nested = Script("nested", "return {1, redis.error_reply('inner')}", lambda ks, k, a: [1])
    store, _ = redis_stores()
    error = await expect_error(store.execute([ScriptCall(nested, ())]))
    assert error.kind == "script"
    assert "inner" in str(error)


# -- round trips ---------------------------------------------------------------------


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_url: str) -> AsyncIterator[TurnCountingProxy]:
    relay = TurnCountingProxy(redis_server.port)
    await relay.start()
    yield relay
    await relay.close()


async def test_batch_costs_one_round_trip(
    redis_stores: OpenStore, raw_redis: redis.Redis, proxy: TurnCountingProxy
) -> None:
    store, _ = redis_stores(url=proxy.url)
    await store.execute(three_calls())  # warm-up: connect, load the scripts
    turns = proxy.turns
    evalsha, script = (
        command_calls(raw_redis, "cmdstat_evalsha"),
        command_calls(raw_redis, "cmdstat_script"),
    )

    await store.execute(three_calls())

    assert proxy.turns - turns == 1
    assert command_calls(raw_redis, "cmdstat_evalsha") - evalsha == 3
    assert command_calls(raw_redis, "cmdstat_script") - script == 0


async def test_noscript_recovery_costs_one_more_round_trip(
    redis_stores: OpenStore, raw_redis: redis.Redis, proxy: TurnCountingProxy
) -> None:
    store, _ = redis_stores(url=proxy.url)
    await store.execute(three_calls())
    raw_redis.script_flush()
    turns, loads = proxy.turns, command_calls(raw_redis, "cmdstat_script|load")

    await store.execute(three_calls())

    assert proxy.turns - turns == 2
    assert command_calls(raw_redis, "cmdstat_script|load") - loads == 3


async def test_ping_is_one_round_trip(redis_stores: OpenStore, proxy: TurnCountingProxy) -> None:
    store, observed = redis_stores(url=proxy.url)
    await store.ping()
    turns = proxy.turns
    rtt = await store.ping()
    assert proxy.turns - turns == 1
    assert 0 < rtt < 1
    assert observed[-1][0] == "ping"


# -- outages and timeouts ------------------------------------------------------------


async def test_redis_down_then_back(redis_stores: OpenStore, redis_server: RedisServer) -> None:
    timeout = 1.0
    store, observed = redis_stores(timeout=timeout, max_connections=4)
    call = ScriptCall(INCR_TTL, ("n",), (1, 60_000))
    # Several calls at once; the connection they share goes stale when the server stops.
    assert sorted(await asyncio.gather(*(store.execute([call]) for _ in range(4)))) == [
        [1],
        [2],
        [3],
        [4],
    ]

    redis_server.stop()
    try:
        started = time.monotonic()
        error = await expect_error(store.execute([call]))
        assert error.kind in ("unavailable", "timeout")
        # Redis stays down until the `finally` below: the call must give up on its own,
        # within its timeout (plus ample slack for a loaded machine), not wait for Redis.
        assert time.monotonic() - started < timeout + 2.0
        assert observed[-1] == ("incr_ttl", observed[-1][1], error.kind)
        assert (await expect_error(store.ping())).kind in ("unavailable", "timeout")
    finally:
        redis_server.start()

    # Same store, no reopening: every stale connection is replaced. The restarted server
    # lost its data and scripts, so this also goes through the NOSCRIPT path.
    results = await asyncio.gather(*(store.execute([call]) for _ in range(4)))
    assert sorted(results) == [[1], [2], [3], [4]]
    assert observed[-1][2] is None


async def test_lost_reply_is_not_retried(
    redis_stores: OpenStore, raw_redis: redis.Redis, proxy: TurnCountingProxy
) -> None:
    """At most once: a batch whose reply is lost is reported, never sent again."""
    store, _ = redis_stores(url=proxy.url)
    call = ScriptCall(INCR_TTL, ("n",), (1, 60_000))
    assert await store.execute([call]) == [1]
    proxy.cut_next_reply = True
    error = await expect_error(store.execute([call]))
    assert error.kind == "unavailable"
    # It ran once (the reply was lost, not the request); a retry would have made it 3.
    assert raw_redis.get(f"{PREFIX}n") == b"2"
    assert await store.execute([call]) == [3]


async def test_saturated_pool_is_a_timeout(redis_stores: OpenStore) -> None:
    """Waiting for a free connection counts against the timeout; it is not an outage."""
    store, observed = redis_stores(timeout=0.1, max_connections=1)
    slow = store.execute([ScriptCall(SPIN, (), (300,))])
    queued = store.execute([ScriptCall(INCR_TTL, ("n",), (1, 1000))])
    errors = await asyncio.gather(slow, queued, return_exceptions=True)
    assert [getattr(error, "kind", error) for error in errors] == ["timeout", "timeout"]
    assert sorted((label, kind) for label, _, kind in observed) == [
        ("incr_ttl", "timeout"),
        ("spin", "timeout"),
    ]


async def test_resp2_is_pinned(redis_stores: OpenStore, redis_url: str) -> None:
    """Replies keep their RESP2 shape: a script that switches to RESP3 internally still
    returns a hash as a flat list, not a dict. A URL asking for RESP3 is refused (it would
    not be honoured), one asking for RESP2 is what the store does anyway."""
    with pytest.raises(ValueError, match="unsupported option protocol=3"):
        redis_stores(url=f"{redis_url}?protocol=3")
    as_map = Script(
        "as_map",
        "redis.setresp(3); return redis.call('HGETALL', KEYS[1])",
        lambda ks, keys, args: [x for kv in ks.hgetall(keys[0]).items() for x in kv],
    )
    store, _ = redis_stores(url=f"{redis_url}?protocol=2")
    await store.execute([ScriptCall(OP, ("h",), ("HSET", "f", "v"))])
    assert await store.execute([ScriptCall(as_map, ("h",))]) == [[b"f", b"v"]]


async def test_unreachable_redis_fails_fast_and_opening_does_no_io(
    redis_stores: OpenStore,
) -> None:
    # Opening cannot fail: nothing listens here, and nothing is dialled until used.
    # A long timeout: "fast" means a refused connection is reported at once, not when the
    # timeout runs out (that would also be reported as "timeout", not "unavailable").
    store, observed = redis_stores(url=f"redis://127.0.0.1:{free_port()}/0", timeout=10.0)
    started = time.monotonic()
    error = await expect_error(store.execute([ScriptCall(INCR_TTL, ("n",), (1, 1000))]))
    assert error.kind == "unavailable"
    assert time.monotonic() - started < 1.0
    assert observed == [("incr_ttl", observed[0][1], "unavailable")]


async def test_slow_script_times_out(redis_stores: OpenStore) -> None:
    # The call is cut at its timeout, not when the script ends: a 2 s script (well under
    # busy-reply-threshold, 5 s) against a 0.1 s timeout, with a bound far from both.
    timeout, spin_ms = 0.1, 2000
    store, observed = redis_stores(timeout=timeout)
    started = time.monotonic()
    error = await expect_error(store.execute([ScriptCall(SPIN, (), (spin_ms,))]))
    elapsed = time.monotonic() - started
    assert error.kind == "timeout"
    assert timeout <= elapsed < 1.0
    assert observed[-1][0] == "spin"
    assert observed[-1][2] == "timeout"

    # Redis finishes the script regardless; once it does, the same store works again.
    async def answers() -> bool:
        try:
            await store.ping()
        except Exception:
            return False
        return True

    await poll_until(answers, "Redis to finish the slow script")
    assert await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 1000))]) == [1]


async def test_busy_server_is_unavailable(redis_stores: OpenStore, raw_redis: redis.Redis) -> None:
    """Redis answers BUSY to everyone while a script overruns busy-reply-threshold."""
    raw_redis.config_set("busy-reply-threshold", 50)
    try:
        spinner, _ = redis_stores(timeout=5.0)
        store, _ = redis_stores(timeout=5.0)
        spinning = asyncio.create_task(spinner.execute([ScriptCall(SPIN, (), (400,))]))
        kinds: list[str] = []

        async def got_busy() -> bool:
            try:
                await store.execute([ScriptCall(INCR_TTL, ("n",), (1, 1000))])
            except Exception as exc:
                kinds.append(getattr(exc, "kind", repr(exc)))
                return True
            return spinning.done()

        await poll_until(got_busy, "a BUSY reply")
        assert await spinning == [1]
        assert kinds == ["unavailable"]
    finally:
        raw_redis.config_set("busy-reply-threshold", 5000)


def connections_named(raw: redis.Redis, name: str) -> int:
    """How many connections Redis has open whose CLIENT SETNAME is `name`."""
    return sum(1 for client in raw.client_list() if client["name"] == name)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_one_pipelined_connection_per_store(
    redis_stores: OpenStore, raw_redis: redis.Redis, redis_server: RedisServer, transport: str
) -> None:
    """redis:// and unix:// URLs share one connection (docs/state-store.md), whatever
    state.max_connections allows: 50 calls at once, all racing the first dial, make one."""
    url = redis_server.url + "?" if transport == "tcp" else redis_server.unix_url + "&"
    store, _ = redis_stores(url=f"{url}client_name=one-conn", max_connections=64)
    calls = [ScriptCall(INCR_TTL, ("n",), (1, 60_000))]
    results = await asyncio.gather(*(store.execute(calls) for _ in range(50)))
    assert sorted(result[0] for result in results) == list(range(1, 51))  # type: ignore[type-var]
    assert connections_named(raw_redis, "one-conn") == 1


@pytest.fixture
async def gate(redis_server: RedisServer, redis_url: str) -> AsyncIterator[TurnCountingProxy]:
    relay = TurnCountingProxy(redis_server.port)
    await relay.start()
    yield relay
    await relay.close()


async def test_max_connections_bounds_calls_in_flight(
    redis_stores: OpenStore, raw_redis: redis.Redis, gate: TurnCountingProxy
) -> None:
    """On the one pipelined connection, state.max_connections bounds the calls under way at
    once (docs/configuration.md): the store lets that many out and the rest wait for a
    slot, which a call frees when its reply is back.

    With replies held back no slot is ever freed, so what Redis has run is what is in
    flight: exactly the bound, neither more (unbounded pipelining) nor fewer.
    """
    limit, total = 3, 10
    store, observed = redis_stores(
        url=f"{gate.url}?client_name=in-flight", max_connections=limit, timeout=30.0
    )
    call = ScriptCall(INCR_TTL, ("n",), (1, 60_000))
    assert await store.execute([call]) == [1]  # dial and load the script: no NOSCRIPT below
    before = command_calls(raw_redis, "cmdstat_evalsha")

    def ran() -> int:
        return command_calls(raw_redis, "cmdstat_evalsha") - before

    async def limit_reached() -> bool:
        return ran() >= limit

    gate.hold()
    tasks = [asyncio.create_task(store.execute([call])) for _ in range(total)]
    try:
        await poll_until(limit_reached, f"{limit} calls to reach Redis")
        assert ran() == limit
        assert not any(task.done() for task in tasks)
        assert connections_named(raw_redis, "in-flight") == 1
    finally:
        gate.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    # Released, the waiting calls go out as slots free up; each ran once, none timed out.
    assert sorted(results) == [[n] for n in range(2, total + 2)]  # type: ignore[type-var]
    assert ran() == total
    assert [kind for _, _, kind in observed] == [None] * (total + 1)


# -- URL schemes ---------------------------------------------------------------------


async def test_unix_socket(
    redis_stores: OpenStore, redis_server: RedisServer, raw_redis: redis.Redis
) -> None:
    store, _ = redis_stores(url=redis_server.unix_url)
    assert await store.execute([ScriptCall(INCR_TTL, ("u",), (7, 60_000))]) == [7]
    assert raw_redis.get(f"{PREFIX}u") == b"7"


async def test_tls_with_password(redis_stores: OpenStore, secure: SecureServers) -> None:
    url = f"rediss://:{MASTER_PASSWORD}@127.0.0.1:{secure.tls_port}/0?ssl_ca_certs={secure.cert}"
    store, _ = redis_stores(url=url)
    assert await store.execute([ScriptCall(OP, ("t",), ("SET", "over tls"))]) == [b"OK"]
    assert await store.execute([ScriptCall(OP, ("t",), ("GET",))]) == [b"over tls"]
    await store.execute([ScriptCall(OP, ("t",), ("DEL",))])


async def test_tls_rejects_an_unknown_certificate(
    redis_stores: OpenStore, secure: SecureServers
) -> None:
    # No ssl_ca_certs: the self-signed certificate is not trusted, so no connection.
    store, _ = redis_stores(url=f"rediss://:{MASTER_PASSWORD}@127.0.0.1:{secure.tls_port}/0")
    error = await expect_error(store.execute([ScriptCall(OP, ("t",), ("GET",))]))
    assert error.kind == "unavailable"


def sentinel_url(secure: SecureServers, master_password: str = MASTER_PASSWORD) -> str:
    dead = f"127.0.0.1:{free_port()}"  # discovery must skip a sentinel that is down
    live = f"127.0.0.1:{secure.sentinel.port}"
    return (
        f"redis+sentinel://:{master_password}@{dead},{live}/{SERVICE}/0"
        f"?sentinel_password={SENTINEL_PASSWORD}"
    )


async def test_sentinel(redis_stores: OpenStore, secure: SecureServers) -> None:
    store, _ = redis_stores(url=sentinel_url(secure), timeout=1.0)
    assert await store.execute([ScriptCall(INCR_TTL, ("s",), (1, 1000))]) == [1]
    assert await store.ping() > 0
    master = redis.Redis(port=secure.master.port, password=MASTER_PASSWORD)
    try:
        assert master.get(f"{PREFIX}s") == b"1"
        master.delete(f"{PREFIX}s")
    finally:
        master.close()


async def test_sentinel_wrong_master_password(
    redis_stores: OpenStore, secure: SecureServers
) -> None:
    store, _ = redis_stores(url=sentinel_url(secure, master_password="wrong"), timeout=1.0)
    error = await expect_error(store.execute([ScriptCall(INCR_TTL, ("s",), (1, 1000))]))
    assert error.kind == "unavailable"


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "redis+sentinel://s1,s2:26380/mymaster",
            ([("s1", 26379), ("s2", 26380)], "mymaster", 0, None, None),
        ),
        (
            "redis+sentinel://:p%40ss@[::1]:5000/svc/3",
            ([("::1", 5000)], "svc", 3, None, "p@ss"),
        ),
        (
            "redis+sentinel://user:pw@h/svc/",
            ([("h", 26379)], "svc", 0, "user", "pw"),
        ),
    ],
)
def test_parse_sentinel_url(url: str, expected: tuple[object, ...]) -> None:
    parsed = parse_sentinel_url(url)
    assert (parsed.sentinels, parsed.service, parsed.db, parsed.username, parsed.password) == (
        expected
    )


def test_parse_sentinel_url_sentinel_auth() -> None:
    parsed = parse_sentinel_url("redis+sentinel://h/svc?sentinel_password=x&sentinel_username=u")
    assert (parsed.sentinel_username, parsed.sentinel_password) == ("u", "x")
    assert "x" not in repr(parsed)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel:///svc",
        "redis+sentinel://h",
        "redis+sentinel://h/svc/notadb",
        "redis+sentinel://h/svc/0/extra",
        "redis+sentinel://h:port/svc",
        "redis+sentinel://h/svc?timeout=1",
    ],
)
def test_parse_sentinel_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_sentinel_url(url)


def test_sha_is_computed_locally() -> None:
    import hashlib

    lua = Path(__file__).with_name("scripts").joinpath("incr_ttl.lua").read_text()
    assert script_sha(INCR_TTL) == hashlib.sha1(lua.encode()).hexdigest()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2@h:port/svc",
        "redis+sentinel://user:hunter2@h/svc/x",
        "redis+sentinel://h/svc?sentinel_password=hunter2&bogus=1",
    ],
)
def test_sentinel_url_errors_mask_passwords(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url(url)
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value)
