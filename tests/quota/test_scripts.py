"""The quota scripts (ADMIT, REFUND, OVERRIDE) as a contract: every expectation runs through
both backends' `execute`, the Lua script on a real redis-server and its Python twin on the
memory store, with the same literal numbers.

The memory store's wall clock is stopped, so its numbers are exact; Redis' clock runs, so
a number that depends on elapsed time (a retry-after, a period's reset, a PTTL) is checked
within a small slack below its exact value. Counters no script would write are set behind
the scripts' back: a raw SET on Redis, the keyspace's set on memory."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from sidecar.config.model import StateConfig
from sidecar.policies.quota.scripts import (
    Admission,
    LimitArgs,
    LimitResult,
    admit_call,
    decode_admission,
    decode_overrides,
    override_delete_call,
    override_get_call,
    override_set_call,
    refund_call,
)
from sidecar.store import MemoryStore, ScriptCall, StateStore, StoreError, open_store
from sidecar.store.memory import Keyspace
from tests.redis_fixture import RedisServer

TEST_TIMEOUT = 10.0
PREFIX = "sidecar:"
OVERRIDES = "qo:{o:acme}"
HOUR_US = 3_600_000_000
SECOND_US = 1_000_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# How much Redis' running clock may have moved on during one test.
SLACK_MS = 1_000
FROZEN_WALL = 1_800_000_000.0  # the memory store's stopped wall clock (Unix s)


class WallClock:
    """The memory store's Unix clock, stopped unless a test moves it."""

    def __init__(self) -> None:
        self.now = FROZEN_WALL

    def __call__(self) -> float:
        return self.now


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rate(
    key: str,
    limit: int = 10,
    *,
    window: int = HOUR_US,
    burst: int = 0,
    cost: int = 1,
    field: str = "",
    shadow: bool = False,
) -> LimitArgs:
    return LimitArgs("rate", key, limit, field, window, burst, cost, shadow)


def quota(key: str, limit: int, end_ms: int, *, cost: int = 1, field: str = "") -> LimitArgs:
    return LimitArgs("quota", key, limit, field, end_ms, 0, cost, False)


@dataclass
class Scripts:
    """One backend under test, and how to look behind its back."""

    store: StateStore
    raw: aioredis.Redis | None = None
    wall: WallClock | None = None

    @property
    def memory(self) -> Keyspace | None:
        return self.store.keyspace if isinstance(self.store, MemoryStore) else None

    def now_ms(self) -> int:
        """The store's clock now, as this process reads it (exact on memory)."""
        if self.wall is not None:
            return int(self.wall.now * 1000)
        return int(time.time() * 1000)

    async def wait(self, seconds: float) -> None:
        """Let time pass: the memory store's wall clock moves; on Redis, sleep."""
        if self.wall is not None:
            self.wall.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def call(self, call: ScriptCall) -> object:
        [result] = await self.store.execute([call])
        return result

    async def admit(self, *limits: LimitArgs, peek: bool = False) -> Admission:
        reply = await self.call(admit_call(OVERRIDES, limits, peek=peek))
        admission = decode_admission(reply, len(limits))
        assert abs(admission.now_ms - self.now_ms()) <= SLACK_MS
        return admission

    async def one(self, limit: LimitArgs, *, peek: bool = False) -> LimitResult:
        admission = await self.admit(limit, peek=peek)
        [result] = admission.limits
        assert admission.allowed == (result.ok or limit.shadow)
        return result

    async def refund(self, refunds: Sequence[tuple[str, str, int]]) -> object:
        return await self.call(refund_call(refunds))

    async def get(self, key: str) -> bytes | None:
        if self.memory is not None:
            return self.memory.get(PREFIX + key)
        assert self.raw is not None
        value = await self.raw.get(PREFIX + key)
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes) -> None:
        if self.memory is not None:
            self.memory.set(PREFIX + key, value)
            return
        assert self.raw is not None
        await self.raw.set(PREFIX + key, value)

    async def hset(self, key: str, fields: dict[str, bytes]) -> None:
        if self.memory is not None:
            self.memory.hset(PREFIX + key, fields)
            return
        assert self.raw is not None
        await self.raw.hset(PREFIX + key, mapping=fields)  # type: ignore[arg-type]

    async def pttl(self, key: str) -> int:
        if self.memory is not None:
            return self.memory.pttl(PREFIX + key)
        assert self.raw is not None
        return int(await self.raw.pttl(PREFIX + key))


@pytest.fixture(params=["memory", "redis"])
async def scripts(request: pytest.FixtureRequest) -> AsyncIterator[Scripts]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(PREFIX, clock=clock)
        wall = WallClock()
        memory.keyspace = Keyspace(clock, wall)
        yield Scripts(memory, wall=wall)
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


def near(value: int, exact: int) -> bool:
    """`exact` on memory; on Redis up to SLACK_MS less (its clock ran on)."""
    return exact - SLACK_MS <= value <= exact


# --- ADMIT: rate limits -------------------------------------------------------------------


@bounded
async def test_ten_an_hour_pass_with_remaining_9_to_0_then_the_11th_waits_6_minutes(
    scripts: Scripts,
) -> None:
    limit = rate("r:{o:acme}:calls")
    for expected in range(9, -1, -1):
        result = await scripts.one(limit)
        assert result.ok and result.limit == 10 and result.remaining == expected
        assert result.retry_after_ms == 0
        assert near(result.reset_ms, (10 - expected) * 360_000)
    stored = await scripts.get("r:{o:acme}:calls")
    refused = await scripts.one(limit)
    assert not refused.ok and refused.limit == 10 and refused.remaining == 0
    assert 359_000 <= refused.retry_after_ms <= 360_000
    assert near(refused.reset_ms, 3_600_000)
    # Nothing charged: the counter is as it was, a peek still sees 0, and again refused.
    assert await scripts.get("r:{o:acme}:calls") == stored
    peeked = await scripts.one(limit, peek=True)
    assert not peeked.ok and peeked.remaining == 0
    again = await scripts.one(limit)
    assert not again.ok and 359_000 <= again.retry_after_ms <= 360_000
    assert await scripts.get("r:{o:acme}:calls") == stored


@bounded
async def test_a_burst_of_3_at_ten_a_second_lets_only_3_pass_at_once(scripts: Scripts) -> None:
    limit = rate("r:{o:acme}:burst", 10, window=SECOND_US, burst=3)
    for expected in (2, 1, 0):
        result = await scripts.one(limit)
        assert result.ok and result.remaining == expected
    refused = await scripts.one(limit)
    assert not refused.ok and refused.remaining == 0
    # The next one may pass a tenth of a second after the first.
    assert 1 <= refused.retry_after_ms <= 100


@bounded
async def test_a_rate_limit_refills_one_unit_per_window_over_limit(scripts: Scripts) -> None:
    limit = rate("r:{o:acme}:burst", 10, window=SECOND_US, burst=3)
    for _ in range(3):
        assert (await scripts.one(limit)).ok
    refused = await scripts.one(limit)
    assert not refused.ok
    await scripts.wait((refused.retry_after_ms + 5) / 1000)
    refilled = await scripts.one(limit)
    assert refilled.ok and refilled.remaining == 0
    assert not (await scripts.one(limit)).ok


@bounded
async def test_a_cost_above_what_remains_is_refused_and_charges_nothing(scripts: Scripts) -> None:
    await scripts.one(rate("r:{o:acme}:calls", cost=7))
    stored = await scripts.get("r:{o:acme}:calls")
    refused = await scripts.one(rate("r:{o:acme}:calls", cost=4))
    assert not refused.ok and refused.remaining == 3
    assert await scripts.get("r:{o:acme}:calls") == stored
    assert (await scripts.one(rate("r:{o:acme}:calls", cost=1), peek=True)).remaining == 2
    fits = await scripts.one(rate("r:{o:acme}:calls", cost=3))
    assert fits.ok and fits.remaining == 0


@bounded
async def test_a_refund_of_one_request_restores_one_unit(scripts: Scripts) -> None:
    limit = rate("r:{o:acme}:calls")
    await scripts.one(limit)
    assert (await scripts.one(limit)).remaining == 8
    amount = limit.cost
    assert await scripts.refund([("rate", limit.key, amount)]) == 1
    assert (await scripts.one(limit, peek=True)).remaining == 8  # 9 now, 8 after a peek's 1
    assert (await scripts.one(rate(limit.key, cost=0), peek=True)).remaining == 9
    # A counter that does not exist is not changed.
    assert await scripts.refund([("rate", "r:{o:acme}:none", amount)]) == 0
    assert await scripts.get("r:{o:acme}:none") is None


@bounded
async def test_refunding_more_than_was_charged_deletes_the_rate_counter(scripts: Scripts) -> None:
    limit = rate("r:{o:acme}:calls")
    await scripts.one(limit)
    assert await scripts.refund([("rate", limit.key, 5 * 360_000_000)]) == 1
    assert await scripts.get(limit.key) is None
    assert (await scripts.one(limit)).remaining == 9


@bounded
async def test_a_peek_writes_nothing(scripts: Scripts) -> None:
    limit = rate("r:{o:acme}:calls")
    for _ in range(3):
        peeked = await scripts.one(limit, peek=True)
        assert peeked.ok and peeked.remaining == 9
    assert await scripts.get(limit.key) is None
    assert (await scripts.one(limit)).remaining == 9
    stored = await scripts.get(limit.key)
    assert (await scripts.one(limit, peek=True)).remaining == 8
    assert await scripts.get(limit.key) == stored
    assert (await scripts.one(limit)).remaining == 8


@bounded
async def test_an_override_replaces_the_limit(scripts: Scripts) -> None:
    assert await scripts.call(override_set_call(OVERRIDES, "calls", 2)) == 1
    limit = rate("r:{o:acme}:calls", 10, field="calls")
    first = await scripts.one(limit)
    assert first.ok and first.limit == 2 and first.remaining == 1
    assert near(first.reset_ms, 1_800_000)
    assert (await scripts.one(limit)).remaining == 0
    refused = await scripts.one(limit)
    assert not refused.ok and refused.limit == 2
    assert 1_799_000 <= refused.retry_after_ms <= 1_800_000
    # Without the field, the override does not apply.
    other = await scripts.one(rate("r:{o:acme}:other", 10))
    assert other.limit == 10 and other.remaining == 9


@bounded
async def test_a_raised_override_keeps_what_was_used_in_units(scripts: Scripts) -> None:
    """4 of 4 used, then the limit becomes 100: 96 are left, not the 4 already spent
    reinterpreted as 900 s of debt each (a whole hour at the new rate)."""
    await scripts.call(override_set_call(OVERRIDES, "calls", 4))
    limit = rate("r:{o:acme}:calls", 100, field="calls")
    assert [(await scripts.one(limit)).remaining for _ in range(4)] == [3, 2, 1, 0]
    assert not (await scripts.one(limit)).ok
    await scripts.call(override_delete_call(OVERRIDES, "calls"))
    raised = await scripts.one(limit)
    assert raised.ok and raised.limit == 100 and raised.remaining == 95
    # Five units drain at the new rate, 36 s each.
    assert near(raised.reset_ms, 180_000)


@bounded
async def test_a_lowered_override_refuses_what_was_already_used(scripts: Scripts) -> None:
    limit = rate("r:{o:acme}:calls", 100, field="calls")
    for _ in range(50):
        assert (await scripts.one(limit)).ok
    await scripts.call(override_set_call(OVERRIDES, "calls", 10))
    refused = await scripts.one(limit)
    assert not refused.ok and refused.limit == 10 and refused.remaining == 0
    # 50 used of a new capacity of 10: 41 must drain, at 360 s each, before one more fits.
    assert 41 * 360_000 - SLACK_MS <= refused.retry_after_ms <= 41 * 360_000


@pytest.mark.parametrize("garbage", [b"abc", b"-1", b"", b"2.5", b" 3"])
async def test_a_garbage_override_is_ignored(scripts: Scripts, garbage: bytes) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        await scripts.hset(OVERRIDES, {"calls": garbage})
        result = await scripts.one(rate("r:{o:acme}:calls", 10, field="calls"))
        assert result.ok and result.limit == 10 and result.remaining == 9


@bounded
async def test_an_override_of_zero_blocks(scripts: Scripts) -> None:
    await scripts.call(override_set_call(OVERRIDES, "calls", 0))
    refused = await scripts.one(rate("r:{o:acme}:calls", 10, field="calls"))
    assert not refused.ok and refused.limit == 0 and refused.remaining == 0
    assert refused.retry_after_ms == 3_600_000 and refused.reset_ms == 3_600_000
    assert await scripts.get("r:{o:acme}:calls") is None
    free = await scripts.one(rate("r:{o:acme}:calls", 10, field="calls", cost=0))
    assert free.ok and free.retry_after_ms == 0
    await scripts.call(override_set_call(OVERRIDES, "quota", 0))
    blocked = await scripts.one(quota("q:{o:acme}:d", 5, scripts.now_ms() + HOUR_MS, field="quota"))
    assert not blocked.ok and blocked.limit == 0 and blocked.remaining == 0


@bounded
async def test_an_exhausted_shadow_limit_neither_refuses_nor_is_charged(scripts: Scripts) -> None:
    enforced = rate("r:{o:acme}:calls")
    shadow = rate("r:{o:acme}:shadow", 1, shadow=True)
    first = await scripts.admit(enforced, shadow)
    assert first.allowed and [r.ok for r in first.limits] == [True, True]
    shadow_counter = await scripts.get(shadow.key)
    second = await scripts.admit(enforced, shadow)
    assert second.allowed
    assert [(r.ok, r.remaining) for r in second.limits] == [(True, 8), (False, 0)]
    assert second.limits[1].retry_after_ms > 0
    assert await scripts.get(shadow.key) == shadow_counter
    assert (await scripts.one(enforced, peek=True)).remaining == 7


@bounded
async def test_one_refusing_limit_charges_none_of_the_others(scripts: Scripts) -> None:
    end_ms = scripts.now_ms() + HOUR_MS
    exhausted = rate("r:{o:acme}:tight", 1)
    assert (await scripts.one(exhausted)).ok
    tight_counter = await scripts.get(exhausted.key)
    calls, orders = rate("r:{o:acme}:calls"), quota("q:{o:acme}:d", 5, end_ms)
    admission = await scripts.admit(calls, orders, exhausted)
    assert not admission.allowed
    assert [(r.ok, r.remaining) for r in admission.limits] == [(True, 9), (True, 4), (False, 0)]
    assert await scripts.get(calls.key) is None
    assert await scripts.get(orders.key) is None
    assert await scripts.get(exhausted.key) == tight_counter
    peeked = await scripts.admit(calls, orders, peek=True)
    assert peeked.allowed and [r.remaining for r in peeked.limits] == [9, 4]
    # Without the refusing limit, both are charged.
    charged = await scripts.admit(calls, orders)
    assert charged.allowed and [r.remaining for r in charged.limits] == [9, 4]
    assert await scripts.get(orders.key) == b"1"


# --- ADMIT: quotas --------------------------------------------------------------------------


@bounded
async def test_a_quota_of_3_passes_3_then_waits_for_the_period_end(scripts: Scripts) -> None:
    end_ms = scripts.now_ms() + HOUR_MS
    limit = quota("q:{o:acme}:d2026-12-02", 3, end_ms)
    for expected in (2, 1, 0):
        result = await scripts.one(limit)
        assert result.ok and result.limit == 3 and result.remaining == expected
        assert result.retry_after_ms == 0 and near(result.reset_ms, HOUR_MS)
    assert await scripts.get(limit.key) == b"3"
    refused = await scripts.one(limit)
    assert not refused.ok and refused.remaining == 0
    assert near(refused.retry_after_ms, HOUR_MS) and near(refused.reset_ms, HOUR_MS)
    assert await scripts.get(limit.key) == b"3"
    # The counter outlives its period by a day.
    assert near(await scripts.pttl(limit.key), HOUR_MS + DAY_MS)


@bounded
async def test_the_next_period_is_a_new_key_starting_at_zero(scripts: Scripts) -> None:
    end_ms = scripts.now_ms() + HOUR_MS
    for _ in range(3):
        await scripts.one(quota("q:{o:acme}:d2026-12-02", 3, end_ms))
    following = await scripts.one(quota("q:{o:acme}:d2026-12-03", 3, end_ms + DAY_MS))
    assert following.ok and following.remaining == 2
    assert near(following.reset_ms, HOUR_MS + DAY_MS)
    assert await scripts.get("q:{o:acme}:d2026-12-03") == b"1"


@bounded
async def test_a_quota_refund_never_goes_below_zero(scripts: Scripts) -> None:
    limit = quota("q:{o:acme}:d", 3, scripts.now_ms() + HOUR_MS, cost=2)
    assert (await scripts.one(limit)).remaining == 1
    assert await scripts.refund([("quota", limit.key, 1)]) == 1
    assert await scripts.get(limit.key) == b"1"
    assert await scripts.refund([("quota", limit.key, 5)]) == 1
    assert await scripts.get(limit.key) == b"0"
    assert (await scripts.one(limit, peek=True)).remaining == 1  # 3 left, 1 after cost 2
    assert await scripts.refund([("quota", "q:{o:acme}:none", 1)]) == 0
    assert await scripts.get("q:{o:acme}:none") is None


@bounded
async def test_a_cost_of_zero_always_passes_and_writes_nothing(scripts: Scripts) -> None:
    end_ms = scripts.now_ms() + HOUR_MS
    free = quota("q:{o:acme}:d", 1, end_ms, cost=0)
    result = await scripts.one(free)
    assert result.ok and result.remaining == 1
    assert await scripts.get(free.key) is None
    await scripts.one(quota(free.key, 1, end_ms))
    result = await scripts.one(free)
    assert result.ok and result.remaining == 0 and result.retry_after_ms == 0
    assert await scripts.get(free.key) == b"1"
    exhausted = rate("r:{o:acme}:one", 1)
    await scripts.one(exhausted)
    assert (await scripts.one(rate(exhausted.key, 1, cost=0))).ok


@bounded
async def test_rate_and_quota_limits_in_one_call(scripts: Scripts) -> None:
    end_ms = scripts.now_ms() + HOUR_MS
    admission = await scripts.admit(rate("r:{o:acme}:calls"), quota("q:{o:acme}:d", 3, end_ms))
    assert admission.allowed
    assert [(r.ok, r.limit, r.remaining) for r in admission.limits] == [(True, 10, 9), (True, 3, 2)]


# --- OVERRIDE ---------------------------------------------------------------------------------


@bounded
async def test_overrides_set_get_delete_round_trip(scripts: Scripts) -> None:
    assert decode_overrides(await scripts.call(override_get_call(OVERRIDES))) == {}
    assert await scripts.call(override_set_call(OVERRIDES, "orders_per_day", 500)) == 1
    assert await scripts.call(override_set_call(OVERRIDES, "burst", 20)) == 1
    assert await scripts.call(override_set_call(OVERRIDES, "burst", 30)) == 1
    reply = await scripts.call(override_get_call(OVERRIDES))
    assert reply == [b"burst", b"30", b"orders_per_day", b"500"]  # sorted by name
    assert decode_overrides(reply) == {"burst": 30, "orders_per_day": 500}
    assert await scripts.call(override_delete_call(OVERRIDES, "burst")) == 1
    assert await scripts.call(override_delete_call(OVERRIDES, "burst")) == 0
    reply = await scripts.call(override_get_call(OVERRIDES))
    assert decode_overrides(reply) == {"orders_per_day": 500}
    assert await scripts.call(override_delete_call(OVERRIDES, "orders_per_day")) == 1
    assert decode_overrides(await scripts.call(override_get_call(OVERRIDES))) == {}


@bounded
async def test_decode_overrides_skips_values_that_are_not_limits(scripts: Scripts) -> None:
    await scripts.hset(OVERRIDES, {"a": b"abc", "b": b"-1", "c": b"7", "d": b""})
    reply = await scripts.call(override_get_call(OVERRIDES))
    assert reply == [b"a", b"abc", b"b", b"-1", b"c", b"7", b"d", b""]
    assert decode_overrides(reply) == {"c": 7}


def test_decode_overrides_of_something_else_is_empty() -> None:
    assert decode_overrides(None) == {}
    assert decode_overrides(b"x") == {}
    assert decode_overrides([b"a", 1, b"b"]) == {}


# --- a counter no script wrote ------------------------------------------------------------------


# A rate counter holds "LEVEL:AT"; a quota's an integer. Each refuses the other's shape.
@pytest.mark.parametrize(
    ("kind", "garbage"),
    [("rate", b"abc"), ("rate", b"1800000000000000"), ("rate", b"-5:1"), ("quota", b"abc")],
)
async def test_a_counter_that_is_not_an_integer_fails_the_script(
    scripts: Scripts, kind: str, garbage: bytes
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        key = "r:{o:acme}:bad"
        await scripts.set(key, garbage)
        limit = rate(key) if kind == "rate" else quota(key, 3, scripts.now_ms() + HOUR_MS)
        with pytest.raises(StoreError) as raised:
            await scripts.admit(limit)
        assert raised.value.kind == "script"
        with pytest.raises(StoreError) as raised:
            await scripts.admit(limit, peek=True)
        assert raised.value.kind == "script"
        assert await scripts.get(key) == garbage


@bounded
async def test_refunding_a_counter_that_is_not_an_integer_fails_the_script(
    scripts: Scripts,
) -> None:
    await scripts.set("r:{o:acme}:bad", b"abc")
    with pytest.raises(StoreError) as raised:
        await scripts.refund([("rate", "r:{o:acme}:bad", 1000)])
    assert raised.value.kind == "script"
    assert await scripts.get("r:{o:acme}:bad") == b"abc"


# --- decode_admission -----------------------------------------------------------------------------


def test_decode_admission_reads_a_reply() -> None:
    reply = [0, 1_800_000_000_000, 1, 10, 9, 360_000, 0, 0, 3, 0, 3_600_000, 3_600_000]
    assert decode_admission(reply, 2) == Admission(
        False,
        1_800_000_000_000,
        (LimitResult(True, 10, 9, 360_000, 0), LimitResult(False, 3, 0, 3_600_000, 3_600_000)),
    )
    assert decode_admission([1, 5], 0) == Admission(True, 5, ())


@pytest.mark.parametrize(
    ("reply", "count"),
    [
        ([1, 5, 1, 10, 9, 0], 1),  # too short
        ([1, 5, 1, 10, 9, 0, 0, 0], 1),  # too long
        ([1, 5, 1, 10, 9, 0, 0], 2),  # for another count
        ([], 0),
        ([1, 5, 1, b"10", 9, 0, 0], 1),  # bytes, not an integer
        ([1, 5, 1, 10, 9.5, 0, 0], 1),  # a float
        ([1, 5, 1, 10, None, 0, 0], 1),  # nil
        ([1, 5, 1, 10, [9], 0, 0], 1),  # nested
        (None, 0),
        (b"1", 0),
        ((1, 5), 0),  # a tuple is not a reply list
        ({1: 5}, 0),
        (7, 0),
    ],
)
def test_decode_admission_raises_value_error_on_a_malformed_reply(
    reply: object, count: int
) -> None:
    with pytest.raises(ValueError):
        decode_admission(reply, count)
