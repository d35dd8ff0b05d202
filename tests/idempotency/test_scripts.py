"""The four record scripts (BEGIN, RENEW, FINISH, RELEASE) as a contract: run through both
backends' `execute`, every expectation is one literal shared by the Lua script on a real
Redis and its Python twin on the memory store.

Lease expiry moves the memory store's clock; on Redis the lease is a few milliseconds and
the test polls until Redis has expired it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from sidecar.config.model import StateConfig
from sidecar.policies.idempotency.records import (
    BEGIN,
    FINISH,
    RELEASE,
    RENEW,
    encode_headers,
)
from sidecar.store import MemoryStore, Script, ScriptArg, ScriptCall, StateStore, open_store
from tests.idempotency.conftest import TEST_TIMEOUT, eventually
from tests.redis_fixture import RedisServer

PREFIX = "sidecar:"
KEY = "idem:{o:acme}:" + "ab" * 32
FP = "f0" * 32
OTHER_FP = "e1" * 32
A, B = "a" * 32, "b" * 32
LEASE = 60_000
SHORT_LEASE = 30  # ms; lapses by itself on Redis, by moving the clock on memory
TTL = 3_600_000
EXPIRES = 1_900_000_000_123
HEADERS = encode_headers([("Content-Type", "application/json"), ("Location", "/orders/7")])
BODY = b'{"id": 7}\x00\xff\r\n'


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scripts:
    """One backend under test, and how to look behind its back."""

    store: StateStore
    clock: FakeClock | None = None
    raw: aioredis.Redis | None = None

    async def run(self, script: Script, *args: ScriptArg) -> object:
        [result] = await self.store.execute([ScriptCall(script, (KEY,), args)])
        return result

    async def begin(self, token: str, fingerprint: str = FP, lease: int = LEASE) -> object:
        return await self.run(BEGIN, token, fingerprint, lease)

    async def finish(self, token: str, state: str = "c", ttl: int = TTL) -> object:
        return await self.run(FINISH, token, state, 201, HEADERS, BODY, EXPIRES, ttl, FP)

    async def fields(self) -> dict[str, bytes]:
        if isinstance(self.store, MemoryStore):
            return self.store.keyspace.hgetall(PREFIX + KEY)
        assert self.raw is not None
        stored = await self.raw.hgetall(PREFIX + KEY)
        return {name.decode(): value for name, value in stored.items()}

    async def pttl(self) -> int:
        if isinstance(self.store, MemoryStore):
            return self.store.keyspace.pttl(PREFIX + KEY)
        assert self.raw is not None
        return int(await self.raw.pttl(PREFIX + KEY))

    async def lapse(self) -> None:
        """Let the record's lease (a short one) run out."""
        remaining = await self.pttl()
        if self.clock is not None:
            assert 0 <= remaining <= SHORT_LEASE
            self.clock.now += (remaining + 1) / 1000
        else:
            # Redis's clock runs: on a slow machine the lease may be over already (-2).
            assert remaining == -2 or 0 <= remaining <= SHORT_LEASE

            async def gone() -> bool:
                return await self.pttl() == -2

            await eventually(gone, "the lease to lapse", interval=0.002)
        assert await self.fields() == {}


@pytest.fixture(params=["memory", "redis"])
async def scripts(request: pytest.FixtureRequest) -> AsyncIterator[Scripts]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(PREFIX, clock=clock)
        yield Scripts(memory, clock=clock)
        await memory.close()
        return
    url: str = request.getfixturevalue("redis_url")
    server: RedisServer = request.getfixturevalue("redis_server")
    store = open_store(StateConfig(url=url, key_prefix=PREFIX, timeout=2.0))
    raw = aioredis.Redis(port=server.port)
    try:
        yield Scripts(store, raw=raw)
    finally:
        await store.close()
        await raw.aclose()


def bounded(test: Callable[[Scripts], Awaitable[None]]) -> Callable[[Scripts], Awaitable[None]]:
    """Run the test inside asyncio.timeout(TEST_TIMEOUT): a hang fails, never blocks."""

    @functools.wraps(test)
    async def run(scripts: Scripts) -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await test(scripts)

    return run


CLAIMED_BY_A = {"s": b"p", "t": A.encode(), "f": FP.encode()}
# Completed by A: the owner token stays (docs/idempotency.md), so A's repeated completion
# write is recognised as harmless.
COMPLETED = {
    "s": b"c",
    "c": b"201",
    "h": HEADERS,
    "b": BODY,
    "e": str(EXPIRES).encode(),
    "f": FP.encode(),
    "t": A.encode(),
}


# --- BEGIN ----------------------------------------------------------------------------------


@bounded
async def test_begin_claims_a_missing_record(scripts: Scripts) -> None:
    assert await scripts.begin(A) == [b"claimed"]
    assert await scripts.fields() == CLAIMED_BY_A
    assert 0 < await scripts.pttl() <= LEASE


@bounded
async def test_begin_on_a_claimed_record_reports_it_in_progress(scripts: Scripts) -> None:
    await scripts.begin(A)
    same = await scripts.begin(B, FP)
    other = await scripts.begin(B, OTHER_FP)
    assert isinstance(same, list) and isinstance(other, list)
    assert same[:2] == [b"in_progress", 1]
    assert other[:2] == [b"in_progress", 0]
    for reply in (same, other):
        assert type(reply[2]) is int and 0 < reply[2] <= LEASE
    # Looking never takes over: A still owns it.
    assert await scripts.fields() == CLAIMED_BY_A


@bounded
async def test_begin_on_a_completed_record_returns_it(scripts: Scripts) -> None:
    await scripts.begin(A)
    assert await scripts.finish(A) == 1
    assert await scripts.begin(B, FP) == [b"completed", 1, 201, HEADERS, BODY, EXPIRES]
    assert await scripts.begin(B, OTHER_FP) == [b"completed", 0, 201, HEADERS, BODY, EXPIRES]


@bounded
async def test_begin_on_a_not_replayable_record(scripts: Scripts) -> None:
    await scripts.begin(A)
    assert await scripts.run(FINISH, A, "n", 201, b"[]", b"", EXPIRES, TTL, FP) == 1
    assert await scripts.begin(B, FP) == [b"not_replayable", 1, 201, EXPIRES]
    assert await scripts.begin(B, OTHER_FP) == [b"not_replayable", 0, 201, EXPIRES]


@bounded
async def test_begin_after_the_lease_lapsed_claims_anew(scripts: Scripts) -> None:
    assert await scripts.begin(A, lease=SHORT_LEASE) == [b"claimed"]
    await scripts.lapse()
    assert await scripts.begin(B) == [b"claimed"]
    assert (await scripts.fields())["t"] == B.encode()


# --- FINISH ---------------------------------------------------------------------------------


@bounded
async def test_finish_by_the_owner_stores_the_outcome_for_the_ttl(scripts: Scripts) -> None:
    await scripts.begin(A)
    assert await scripts.finish(A) == 1
    assert await scripts.fields() == COMPLETED
    assert LEASE < await scripts.pttl() <= TTL


@bounded
async def test_finish_by_another_token_writes_nothing(scripts: Scripts) -> None:
    await scripts.begin(A)
    assert await scripts.finish(B) == 0
    assert await scripts.fields() == CLAIMED_BY_A


@bounded
async def test_finish_repeated_by_the_owner_is_acknowledged_and_changes_nothing(
    scripts: Scripts,
) -> None:
    """A completion write retried after a timeout (that had landed) must not fail, nor
    overwrite what the first write stored."""
    await scripts.begin(A)
    assert await scripts.finish(A) == 1
    assert await scripts.finish(A, state="n", ttl=1000) == 1
    assert await scripts.fields() == COMPLETED
    assert LEASE < await scripts.pttl() <= TTL


@bounded
async def test_finish_of_a_completed_record_by_another_token_writes_nothing(
    scripts: Scripts,
) -> None:
    await scripts.begin(A)
    assert await scripts.finish(A) == 1
    assert await scripts.finish(B, state="n", ttl=1000) == 0
    assert await scripts.fields() == COMPLETED


@bounded
async def test_finish_after_the_lease_lapsed_with_nobody_else_still_stores(
    scripts: Scripts,
) -> None:
    assert await scripts.begin(A, lease=SHORT_LEASE) == [b"claimed"]
    await scripts.lapse()
    assert await scripts.finish(A) == 2
    assert await scripts.fields() == COMPLETED
    assert LEASE < await scripts.pttl() <= TTL
    assert await scripts.begin(B) == [b"completed", 1, 201, HEADERS, BODY, EXPIRES]


@bounded
async def test_finish_after_another_owner_claimed_writes_nothing(scripts: Scripts) -> None:
    assert await scripts.begin(A, lease=SHORT_LEASE) == [b"claimed"]
    await scripts.lapse()
    assert await scripts.begin(B) == [b"claimed"]
    assert await scripts.finish(A) == 0
    assert await scripts.fields() == {"s": b"p", "t": B.encode(), "f": FP.encode()}


# --- RENEW ----------------------------------------------------------------------------------


@bounded
async def test_renew_by_the_owner_extends_the_lease(scripts: Scripts) -> None:
    await scripts.begin(A, lease=1000)
    assert await scripts.run(RENEW, A, LEASE) == 1
    assert 1000 < await scripts.pttl() <= LEASE
    assert await scripts.fields() == CLAIMED_BY_A


@bounded
async def test_renew_by_another_token_changes_nothing(scripts: Scripts) -> None:
    await scripts.begin(A, lease=1000)
    assert await scripts.run(RENEW, B, LEASE) == 0
    assert 0 < await scripts.pttl() <= 1000


@bounded
async def test_renew_of_a_completed_or_missing_record_is_refused(scripts: Scripts) -> None:
    assert await scripts.run(RENEW, A, LEASE) == 0
    assert await scripts.fields() == {}
    await scripts.begin(A)
    await scripts.finish(A)
    assert await scripts.run(RENEW, A, 1000) == 0
    assert LEASE < await scripts.pttl() <= TTL


# --- RELEASE --------------------------------------------------------------------------------


@bounded
async def test_release_by_the_owner_deletes_the_claim(scripts: Scripts) -> None:
    await scripts.begin(A)
    assert await scripts.run(RELEASE, A) == 1
    assert await scripts.fields() == {}
    assert await scripts.pttl() == -2
    assert await scripts.begin(B) == [b"claimed"]


@bounded
async def test_release_by_another_token_keeps_the_claim(scripts: Scripts) -> None:
    await scripts.begin(A)
    assert await scripts.run(RELEASE, B) == 0
    assert await scripts.fields() == CLAIMED_BY_A


@bounded
async def test_release_never_deletes_a_completed_record(scripts: Scripts) -> None:
    assert await scripts.run(RELEASE, A) == 0
    await scripts.begin(A)
    await scripts.finish(A)
    assert await scripts.run(RELEASE, A) == 0
    assert await scripts.fields() == COMPLETED
