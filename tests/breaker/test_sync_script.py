"""The breaker sync script (sidecar/store/lua/breaker_sync.lua) and its memory twin
(sidecar/policies/breaker/sync.py `_sync`) as one contract: every test runs through both
backends' `execute` with the same assertions, the Lua script on a real redis-server.

The memory store's clock is a fake one a test moves; Redis' clock runs, so waiting for an
open time to pass is a bounded poll there (each poll is a sync, as a replica would do)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from sidecar.config import BreakerConfig
from sidecar.config.model import HalfOpenConfig, SlowCallConfig, StateConfig
from sidecar.policies.breaker.machine import Breaker, Pending, Shared, State, unix_now
from sidecar.policies.breaker.sync import (
    SYNC,
    Syncer,
    decode_reply,
    force_call,
    state_keys,
    sync_call,
)
from sidecar.store import MemoryStore, ScriptCall, StateStore, open_store

PREFIX = "sidecar:"
TEST_TIMEOUT = 15.0
POLL_DEADLINE = 5.0
# Reply fields.
ST, V, UNTIL, TRIPS, GRANTED, RS, RE, TOTAL, FAILURES, SLOW, NOW, FORCED, WHY = range(13)
REASON = {
    "consecutive_failures": 1, "failure_rate": 2, "slow_call_rate": 3, "probes_failed": 4,
    "probes_passed": 5, "forced_open": 6, "forced_closed": 7, "reset": 8, "open_elapsed": 9,
}  # fmt: skip


def config(**overrides: object) -> BreakerConfig:
    base: dict[str, object] = {
        "window": 10.0,
        "min_requests": 10,
        "failure_rate": 0.5,
        "slow_call": SlowCallConfig(threshold=1.0, rate=0.8),
        "consecutive_failures": 5,
        "open_for": 5.0,
        "max_open_for": 120.0,
        "jitter": 0.0,  # the jitter factor sent is exactly 1.0
        "half_open": HalfOpenConfig(probes=3, ramp=2.0),
        "flush_interval": 0.05,
    }
    base.update(overrides)
    return BreakerConfig(**base)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    store: StateStore
    clock: FakeClock | None = None  # memory only

    async def wait(self, seconds: float) -> None:
        """Let store time pass: the fake clock moves; on Redis real time must pass (a
        short sleep, only ever to get past an open time, never to synchronise)."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def raw(self, call: ScriptCall) -> list[int]:
        [reply] = await self.store.execute([call])
        assert isinstance(reply, list)
        return reply  # type: ignore[return-value]

    async def sync(self, b: Breaker, report: Pending | None = None) -> list[int]:
        return await self.raw(sync_call(b, report or Pending()))

    async def force(self, name: str, action: str) -> list[int]:
        return await self.raw(force_call(name, action))

    async def poll(self, b: Breaker, state: State, step: float = 0.02) -> list[int]:
        """Sync with empty reports until the reply says `state` (bounded)."""
        deadline = time.monotonic() + POLL_DEADLINE
        while True:
            reply = await self.sync(b)
            if reply[ST] == state:
                return reply
            assert time.monotonic() < deadline, f"still {reply} after {POLL_DEADLINE}s"
            await self.wait(step)


@pytest.fixture(params=["memory", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(PREFIX, clock=clock)
        yield Env(memory, clock)
        await memory.close()
        return
    url: str = request.getfixturevalue("redis_url")
    store = open_store(StateConfig(url=url, key_prefix=PREFIX, timeout=2.0))
    try:
        yield Env(store)
    finally:
        await store.close()


def bounded(test: Callable[[Env], Awaitable[None]]) -> Callable[[Env], Awaitable[None]]:
    @functools.wraps(test)
    async def run(env: Env) -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await test(env)

    return run


def counts(reply: list[int]) -> list[int]:
    """The combined window the reply reports: total, failures, slow."""
    return reply[TOTAL : SLOW + 1]


def report(**counts: object) -> Pending:
    return Pending(**counts)  # type: ignore[arg-type]


async def open_it(env: Env, b: Breaker) -> list[int]:
    reply = await env.sync(b, report(total=1, failures=1, trip="consecutive_failures"))
    assert reply[ST] == State.OPEN
    return reply


async def half_open_it(env: Env, b: Breaker) -> list[int]:
    opened = await open_it(env, b)
    await env.wait((opened[UNTIL] - opened[NOW]) / 1000)  # past the open time
    reply = await env.poll(b, State.HALF_OPEN)
    assert reply[WHY] == REASON["open_elapsed"] and reply[V] == opened[V] + 1
    return reply


# --- the shared window ------------------------------------------------------------------


@bounded
async def test_two_replicas_counts_add_up_and_the_combined_rate_opens_it(env: Env) -> None:
    c = config(min_requests=10, failure_rate=0.5)
    a, b = Breaker.create("r", c), Breaker.create("r", c)
    first = await env.sync(a, report(total=4, failures=3))
    assert first[ST] == State.CLOSED and counts(first) == [4, 3, 0]
    second = await env.sync(b, report(total=4, failures=1, slow=1))
    assert second[ST] == State.CLOSED and counts(second) == [8, 4, 1]  # < min_requests
    third = await env.sync(a, report(total=2, failures=1))  # 10 calls, 5 failures: 50 %
    assert third[ST] == State.OPEN and third[WHY] == REASON["failure_rate"]
    assert third[TRIPS] == 1 and third[V] == second[V] + 1
    assert third[UNTIL] - third[NOW] == 5000
    assert counts(third) == [0, 0, 0]  # the window starts afresh
    # The other replica learns it at its next sync.
    reply = await env.sync(b)
    assert reply[ST] == State.OPEN and reply[V] == third[V] and reply[UNTIL] == third[UNTIL]
    shared, granted = decode_reply(reply)
    assert granted == 0
    transition = b.adopt(shared, granted)
    assert transition is not None and transition.after is State.OPEN
    assert transition.reason == "failure_rate"


@bounded
async def test_combined_counts_below_the_rate_keep_it_closed(env: Env) -> None:
    c = config(min_requests=10, failure_rate=0.5, slow_call=None)
    a, b = Breaker.create("r", c), Breaker.create("r", c)
    await env.sync(a, report(total=10, failures=2, slow=10))
    reply = await env.sync(b, report(total=10, failures=7))  # 9 of 20 < 50 %
    assert reply[ST] == State.CLOSED and counts(reply) == [20, 9, 10]


@bounded
async def test_the_combined_slow_call_rate_opens_it(env: Env) -> None:
    c = config(min_requests=10, slow_call=SlowCallConfig(threshold=1.0, rate=0.8))
    a, b = Breaker.create("r", c), Breaker.create("r", c)
    assert (await env.sync(a, report(total=5, slow=4)))[ST] == State.CLOSED
    reply = await env.sync(b, report(total=5, slow=4))  # 8 of 10 slow
    assert reply[ST] == State.OPEN and reply[WHY] == REASON["slow_call_rate"]


@bounded
async def test_calls_older_than_the_window_leave_the_shared_window(env: Env) -> None:
    c = config(window=1.0, min_requests=1000)  # buckets of 100 ms
    a = Breaker.create("r", c)
    assert (await env.sync(a, report(total=6, failures=2)))[TOTAL] == 6
    await env.wait(1.2)  # a window and more
    reply = await env.sync(a, report(total=1))
    assert counts(reply) == [1, 0, 0]


@bounded
async def test_a_trip_proposal_opens_a_closed_breaker(env: Env) -> None:
    a = Breaker.create("r", config(min_requests=1000))
    reply = await env.sync(a, report(total=5, failures=5, trip="consecutive_failures"))
    assert reply[ST] == State.OPEN and reply[WHY] == REASON["consecutive_failures"]
    assert reply[TRIPS] == 1 and reply[V] == 1
    assert reply[UNTIL] - reply[NOW] == 5000


# --- OPEN -> HALF_OPEN -> CLOSED / OPEN ----------------------------------------------------


@bounded
async def test_open_turns_half_open_once_until_passed(env: Env) -> None:
    a = Breaker.create("r", config(open_for=0.3))
    opened = await open_it(env, a)
    before = await env.sync(a, report(wanted=2))
    assert before[ST] == State.OPEN and before[GRANTED] == 0
    if env.clock is not None:  # exact on the fake clock: at `until`, not a ms before
        await env.wait((opened[UNTIL] - opened[NOW] - 1) / 1000)
        assert (await env.sync(a))[ST] == State.OPEN
        await env.wait(0.001)
    reply = await env.poll(a, State.HALF_OPEN)
    assert reply[NOW] >= opened[UNTIL]
    assert reply[WHY] == REASON["open_elapsed"] and reply[V] == opened[V] + 1
    assert reply[TRIPS] == 1


@bounded
async def test_half_open_grants_at_most_probes_permits_across_callers(env: Env) -> None:
    c = config(open_for=0.05, half_open=HalfOpenConfig(probes=3, ramp=2.0))
    replicas = [Breaker.create("r", c) for _ in range(4)]
    await half_open_it(env, replicas[0])
    # Four replicas ask at once, two permits each: one batch, and concurrent batches.
    batch = [sync_call(r, report(wanted=2)) for r in replicas[:2]]
    replies = await env.store.execute(batch)
    concurrent = await asyncio.gather(*(env.sync(r, report(wanted=2)) for r in replicas[2:]))
    granted = [decode_reply(reply)[1] for reply in [*replies, *concurrent]]
    assert sum(granted) == 3 and granted[0] == 2 and max(granted) <= 2
    assert (await env.sync(replicas[3], report(wanted=3)))[GRANTED] == 0
    # A permit given back unused can be granted again, once.
    back = await env.sync(replicas[0], report(returned=1))
    assert back[ST] == State.HALF_OPEN
    again = [(await env.sync(r, report(wanted=2)))[GRANTED] for r in replicas[2:]]
    assert sorted(again) == [0, 1]


@bounded
async def test_all_probes_passing_closes_it_with_a_ramp(env: Env) -> None:
    c = config(open_for=0.05, half_open=HalfOpenConfig(probes=3, ramp=2.0))
    a, b = Breaker.create("r", c), Breaker.create("r", c)
    half = await half_open_it(env, a)
    assert (await env.sync(a, report(wanted=2)))[GRANTED] == 2
    assert (await env.sync(b, report(wanted=2)))[GRANTED] == 1
    partial = await env.sync(a, report(probe_ok=2))
    assert partial[ST] == State.HALF_OPEN and partial[RS] == partial[RE] == 0
    closed = await env.sync(b, report(probe_ok=1))
    assert closed[ST] == State.CLOSED and closed[WHY] == REASON["probes_passed"]
    assert closed[V] == half[V] + 1
    assert closed[RS] == closed[NOW] and closed[RE] - closed[RS] == 2000
    assert counts(closed) == [0, 0, 0]
    shared, _ = decode_reply(closed)
    assert shared.ramp_end - shared.ramp_start == pytest.approx(2.0)
    assert shared.ramp_start == pytest.approx(unix_now(), abs=1.0)
    # The other replica learns it, ramp included.
    reply = await env.sync(a)
    assert reply[ST] == State.CLOSED and (reply[RS], reply[RE]) == (closed[RS], closed[RE])


@bounded
async def test_failed_probes_reopen_it_with_trips_2_and_a_doubled_open_time(env: Env) -> None:
    c = config(open_for=0.05, failure_rate=0.5, half_open=HalfOpenConfig(probes=3, ramp=2.0))
    a = Breaker.create("r", c)
    half = await half_open_it(env, a)
    assert (await env.sync(a, report(wanted=3)))[GRANTED] == 3
    one = await env.sync(a, report(probe_failed=1))  # 1 < 0.5 x 3
    assert one[ST] == State.HALF_OPEN
    reopened = await env.sync(a, report(probe_failed=1))  # 2 >= 1.5
    assert reopened[ST] == State.OPEN and reopened[WHY] == REASON["probes_failed"]
    assert reopened[TRIPS] == 2 and reopened[V] == half[V] + 1
    assert reopened[UNTIL] - reopened[NOW] == 100  # 2 x 50 ms, jitter factor 1.0
    # The third probe's late report changes nothing, and no permit is left to grant.
    late = await env.sync(a, report(probe_ok=1, wanted=3))
    assert late[ST] == State.OPEN and late[GRANTED] == 0 and late[V] == reopened[V]


@bounded
async def test_a_success_and_a_failure_below_the_rate_still_close_it(env: Env) -> None:
    c = config(open_for=0.05, failure_rate=0.5, half_open=HalfOpenConfig(probes=3, ramp=0.0))
    a = Breaker.create("r", c)
    await half_open_it(env, a)
    await env.sync(a, report(wanted=3))
    reply = await env.sync(a, report(probe_ok=2, probe_failed=1))  # 1 < 1.5
    assert reply[ST] == State.CLOSED and reply[WHY] == REASON["probes_passed"]
    assert reply[RE] == reply[RS]  # ramp 0: everything at once


def with_probe_timeout(call: ScriptCall, ms: int) -> ScriptCall:
    args = list(call.args)
    args[10] = ms  # ARGV[11], the probe timeout
    return ScriptCall(call.script, call.keys, tuple(args))


@bounded
async def test_probes_never_reported_are_granted_again_after_the_probe_timeout(
    env: Env,
) -> None:
    c = config(open_for=0.05, half_open=HalfOpenConfig(probes=3, ramp=2.0))
    a, b = Breaker.create("r", c), Breaker.create("r", c)

    async def sync(replica: Breaker, rep: Pending) -> list[int]:
        return await env.raw(with_probe_timeout(sync_call(replica, rep), 200))

    await half_open_it(env, a)
    assert (await sync(a, report(wanted=3)))[GRANTED] == 3  # a takes them all...
    assert (await sync(a, report(probe_ok=1)))[ST] == State.HALF_OPEN  # ...reports one...
    assert (await sync(b, report(wanted=3)))[GRANTED] == 0  # ...and is never heard again
    await env.wait(0.25)  # past the probe timeout (real time on Redis)
    deadline = time.monotonic() + POLL_DEADLINE
    while (reply := await sync(b, report(wanted=3)))[GRANTED] == 0:
        assert time.monotonic() < deadline, reply
        await env.wait(0.02)
    assert reply[ST] == State.HALF_OPEN and reply[GRANTED] == 2  # probes - ok - fail
    assert (await sync(b, report(wanted=3)))[GRANTED] == 0


# --- forced states ---------------------------------------------------------------------------


@bounded
async def test_force_open_holds_it_open_past_until(env: Env) -> None:
    a = Breaker.create("r", config(open_for=0.05))
    first = await env.sync(a, report(total=1))
    forced = await env.force("r", "open")
    assert forced[ST] == State.OPEN and forced[FORCED] == 1
    assert forced[WHY] == REASON["forced_open"] and forced[V] == first[V] + 1
    shared, _ = decode_reply(forced)
    assert shared.forced == "open" and shared.reason == "forced_open"
    await env.wait(0.2)  # well past any open time
    reply = await env.sync(a, report(wanted=3))
    assert reply[ST] == State.OPEN and reply[GRANTED] == 0 and reply[V] == forced[V]


@bounded
async def test_a_forced_closed_breaker_does_not_trip(env: Env) -> None:
    a = Breaker.create("r", config(min_requests=10))
    await open_it(env, a)
    forced = await env.force("r", "closed")
    assert forced[ST] == State.CLOSED and forced[FORCED] == 2
    assert forced[WHY] == REASON["forced_closed"] and forced[V] == 2
    assert (forced[RS], forced[RE]) == (0, 0)
    reply = await env.sync(a, report(total=100, failures=100, trip="consecutive_failures"))
    assert reply[ST] == State.CLOSED and reply[FORCED] == 2 and reply[V] == forced[V]
    assert decode_reply(reply)[0].forced == "closed"


@bounded
async def test_reset_clears_the_forced_state_and_the_trips(env: Env) -> None:
    c = config(open_for=0.05, half_open=HalfOpenConfig(probes=3, ramp=2.0))
    a = Breaker.create("r", c)
    await half_open_it(env, a)
    await env.sync(a, report(wanted=3))
    assert (await env.sync(a, report(probe_failed=3)))[TRIPS] == 2
    await env.force("r", "closed")
    reset = await env.force("r", "reset")
    assert reset[ST] == State.CLOSED and reset[FORCED] == 0 and reset[TRIPS] == 0
    assert reset[WHY] == REASON["reset"] and (reset[RS], reset[RE]) == (0, 0)
    assert decode_reply(reset)[0].forced == ""
    # No longer forced: it trips again, as a first trip.
    reply = await env.sync(a, report(total=1, failures=1, trip="consecutive_failures"))
    assert reply[ST] == State.OPEN and reply[TRIPS] == 1 and reply[UNTIL] - reply[NOW] == 50


@bounded
async def test_force_increments_the_version_every_time(env: Env) -> None:
    versions = [(await env.force("r", action))[V] for action in ("open", "open", "reset")]
    assert versions == [1, 2, 3]


# --- clocks ------------------------------------------------------------------------------


@bounded
async def test_decode_reply_keeps_distances_not_dates(env: Env) -> None:
    a = Breaker.create("r", config(open_for=7.0))
    reply = await open_it(env, a)
    shared, _ = decode_reply(reply)
    # The memory store's clock is not the Unix clock at all; Redis' is: both give 7 s.
    assert shared.until - unix_now() == pytest.approx(7.0, abs=0.5)
    # A store clock an hour ahead (or behind) of this replica's: the same distances.
    for offset_ms in (3_600_000, -3_600_000):
        shifted = list(reply)
        for index in (UNTIL, NOW):
            shifted[index] += offset_ms
        moved, _ = decode_reply(shifted)
        assert moved.until - unix_now() == pytest.approx(7.0, abs=0.5)
    ramp = [0, 4, 0, 0, 0, 10_000, 12_500, 0, 0, 0, 11_000, 0, 5]
    decoded, _ = decode_reply(ramp)
    assert decoded.ramp_start - unix_now() == pytest.approx(-1.0, abs=0.5)
    assert decoded.ramp_end - unix_now() == pytest.approx(1.5, abs=0.5)
    assert decoded.until == 0.0  # zero stays "unset", not "now minus the offset"


@bounded
async def test_a_hand_built_call_is_the_same_script(env: Env) -> None:
    keys = state_keys("orders")
    assert keys == ("cb:{cb:orders}", "cb:{cb:orders}:w")
    args = ("sync", 1000, 2, "0.5", "-1", 500, 10000, "1.0", 3, 0, 30500,
            2, 2, 0, 0, 0, 0, 0, 0)  # fmt: skip
    reply = await env.raw(ScriptCall(SYNC, keys, args))
    assert reply[ST] == State.OPEN and reply[WHY] == REASON["failure_rate"]
    assert reply[UNTIL] - reply[NOW] == 500
    shared, granted = decode_reply(reply)
    assert isinstance(shared, Shared) and shared.state is State.OPEN and granted == 0


async def test_idle_per_organisation_breakers_are_dropped_and_the_route_breaker_kept() -> None:
    """Organisation names come from a request header: an idle closed one is forgotten."""
    per_org = config(scope="route_org", window=1.0)
    syncer = Syncer(0.05, MemoryStore(), MemoryStore(), lambda b, t: None, lambda d: None, True)
    now = unix_now()
    idle, busy, opened = (Breaker.create(f"r/{org}", per_org) for org in ("idle", "busy", "open"))
    idle.last_used = now - 2.5  # more than two windows ago, closed, nothing to report
    busy.last_used = now
    opened.last_used = now - 2.5
    opened.shared.state = State.OPEN
    route = Breaker.create("q", config(window=1.0))
    route.last_used = now - 60.0
    syncer.breakers.update({b.name: b for b in (idle, busy, opened, route)})
    await syncer.sync_once()
    assert sorted(syncer.breakers) == ["q", "r/busy", "r/open"]
    await syncer.aclose()
