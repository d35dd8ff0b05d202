"""The fault proxy (tests/fault_proxy.py) against a real redis-server: it passes bytes
through, holds them in a blackhole and delivers them in order when the link heals (or
loses them, if asked, once their client gives up), and in drop_replies lets commands run
while their replies vanish. Raw sockets speak RESP through it; a redis-py client on the
server's own port checks what really landed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.fault_proxy import FaultProxy, Mode
from tests.idempotency.conftest import eventually
from tests.redis_fixture import RedisServer

TIMEOUT = 10.0
# How long a fault is held before looking at what got through: the fault's duration.
HOLD = 0.3


def resp(*args: str) -> bytes:
    """One command in RESP."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@pytest.fixture
async def direct(redis_url: str, redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on the server itself, never through the proxy (the keyspace is flushed)."""
    client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(redis_server.port) as started:
        try:
            yield started
        finally:
            started.resume()


async def dialled(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection through the proxy that has reached Redis (it answered a PING)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(resp("PING"))
    await writer.drain()
    assert await reader.readexactly(7) == b"+PONG\r\n"
    return reader, writer


async def nothing_arrives(reader: asyncio.StreamReader, within: float = HOLD) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(within):
            data = await reader.read(1)
            pytest.fail(f"expected nothing, read {data!r}")


async def test_pass_through_relays_both_ways(proxy: FaultProxy, direct: aioredis.Redis) -> None:
    async with asyncio.timeout(TIMEOUT):
        client = aioredis.Redis.from_url(proxy.redis_url(), socket_timeout=5)
        try:
            assert await client.set("k", "through") is True
            assert await client.get("k") == b"through"
            assert await client.rpush("l", "a", "b") == 2
        finally:
            await client.aclose()
        assert await direct.get("k") == b"through"
        assert await direct.lrange("l", 0, -1) == [b"a", b"b"]
        assert proxy.connections == 1
        assert proxy.mode is Mode.PASS


async def test_blackhole_holds_both_ways_then_delivers_in_order(
    proxy: FaultProxy, direct: aioredis.Redis
) -> None:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await dialled(proxy)
        proxy.blackhole()
        for item in ("a", "b", "c"):
            writer.write(resp("RPUSH", "l", item))
            await writer.drain()
        # A connection made while the link is down is accepted, and dialled once it is up.
        late_r, late_w = await asyncio.open_connection("127.0.0.1", proxy.port)
        late_w.write(resp("SET", "late", "1"))
        await late_w.drain()
        await nothing_arrives(reader)
        assert await direct.exists("l", "late") == 0  # nothing reached Redis
        assert proxy.connections == 2
        proxy.resume()
        assert await reader.readexactly(12) == b":1\r\n:2\r\n:3\r\n"
        assert await late_r.readexactly(5) == b"+OK\r\n"
        assert await direct.lrange("l", 0, -1) == [b"a", b"b", b"c"]
        assert await direct.get("late") == b"1"
        # Replies held on their way back are delivered too, in order.
        writer.write(resp("RPUSH", "l", "d") + resp("LLEN", "l"))
        await writer.drain()
        assert await reader.readexactly(8) == b":4\r\n:4\r\n"
        for w in (writer, late_w):
            w.close()


async def test_blackhole_holds_replies_that_were_on_their_way_back(
    proxy: FaultProxy, direct: aioredis.Redis
) -> None:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await dialled(proxy)
        # The command reaches Redis; its reply comes back while the link is down.
        writer.write(resp("BLPOP", "q", "5"))
        await writer.drain()

        async def blocked() -> bool:
            return int((await direct.info("clients"))["blocked_clients"]) == 1

        await eventually(blocked, "BLPOP to block in Redis")
        proxy.blackhole()
        await direct.rpush("q", "x")
        await nothing_arrives(reader)
        assert await direct.llen("q") == 0  # Redis did send its reply: popped
        proxy.resume()
        assert await reader.readexactly(18) == b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"
        writer.close()


async def test_a_client_that_leaves_while_blackholed_still_lands_its_bytes_by_default(
    proxy: FaultProxy, direct: aioredis.Redis
) -> None:
    async with asyncio.timeout(TIMEOUT):
        _, writer = await dialled(proxy)
        proxy.blackhole()
        writer.write(resp("SET", "k", "held"))
        await writer.drain()
        writer.close()
        await nothing_landed_during_hold(direct)
        proxy.resume()

        async def landed() -> bool:
            return await direct.get("k") == b"held"

        await eventually(landed, "the held SET to reach Redis after the link healed")

        async def relay_closed() -> bool:
            return proxy.open_connections == 0

        await eventually(relay_closed, "the relayed connection to close after delivering")


async def nothing_landed_during_hold(direct: aioredis.Redis) -> None:
    await asyncio.sleep(HOLD)  # the blackhole's duration
    assert await direct.exists("k") == 0


async def test_blackhole_drop_abandoned_loses_what_a_leaving_client_sent(
    proxy: FaultProxy, direct: aioredis.Redis
) -> None:
    async with asyncio.timeout(TIMEOUT):
        _, writer = await dialled(proxy)
        proxy.blackhole(drop_abandoned=True)
        command = resp("SET", "k", "abandoned")
        writer.write(command)
        await writer.drain()
        # And a connection that never got dialled: it is never dialled now.
        _, fresh = await asyncio.open_connection("127.0.0.1", proxy.port)
        fresh.write(resp("SET", "fresh", "abandoned"))
        await fresh.drain()

        async def accepted_both() -> bool:
            return proxy.connections == 2 and proxy.abandoned_bytes == 0

        await eventually(accepted_both, "the second connection to be accepted")
        writer.close()
        fresh.close()

        async def relays_gone() -> bool:
            return proxy.open_connections == 0

        # Both relays end while the link is still down: nothing is left that could deliver.
        await eventually(relays_gone, "the abandoned connections to be dropped")
        assert proxy.mode is Mode.BLACKHOLE
        assert proxy.abandoned_bytes == len(command) + len(resp("SET", "fresh", "abandoned"))
        proxy.resume()
        # The link works again, for a new connection; the abandoned commands never ran.
        _, writer = await dialled(proxy)
        writer.close()
        assert await direct.exists("k", "fresh") == 0


async def test_drop_replies_runs_the_command_but_the_client_hears_nothing_until_closed(
    proxy: FaultProxy, direct: aioredis.Redis
) -> None:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await dialled(proxy)
        proxy.drop_replies()
        writer.write(resp("SET", "k", "ran"))
        await writer.drain()

        async def ran() -> bool:
            return await direct.get("k") == b"ran"

        await eventually(ran, "the SET to run in Redis")

        async def reply_dropped() -> bool:
            return proxy.dropped_reply_bytes == len(b"+OK\r\n")

        await eventually(reply_dropped, "its reply to be dropped")
        # The connection lost a reply: what its client sends next goes nowhere.
        writer.write(resp("SET", "after", "1"))
        await writer.drain()
        await nothing_arrives(reader)
        assert proxy.open_connections == 1
        proxy.resume()
        # Closed on resume, with not one reply byte delivered.
        assert await reader.read() == b""
        assert reader.at_eof()

        async def relay_closed() -> bool:
            return proxy.open_connections == 0

        await eventually(relay_closed, "the connection that lost a reply to close")
        assert await direct.exists("after") == 0
        # The link itself is fine again.
        reader, writer = await dialled(proxy)
        writer.close()
