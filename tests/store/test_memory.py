"""Memory-backend details the contract cannot see: exact expiry edges, the sweep, twins."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from sidecar.config.model import StateConfig
from sidecar.store import MemoryStore, Script, ScriptCall, open_store
from sidecar.store.memory import Keyspace, KeyspaceError, to_reply
from tests.store.conftest import FakeClock, expect_error
from tests.store.twins import INCR_TTL


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keyspace(clock: FakeClock) -> Keyspace:
    return Keyspace(clock)


def test_key_lives_until_its_deadline_inclusive(keyspace: Keyspace, clock: FakeClock) -> None:
    keyspace.set("k", b"v", px=100)
    clock.advance_ms(100)
    # Redis expires a key once now > deadline: at the deadline itself PTTL is 0.
    assert keyspace.pttl("k") == 0
    assert keyspace.get("k") == b"v"
    clock.advance_ms(1)
    assert keyspace.pttl("k") == -2
    assert keyspace.get("k") is None


def test_pttl_counts_down_exactly(keyspace: Keyspace, clock: FakeClock) -> None:
    keyspace.set("k", b"v", px=1000)
    clock.advance_ms(250)
    assert keyspace.pttl("k") == 750
    assert keyspace.pexpire("k", 50)
    assert keyspace.pttl("k") == 50


def test_expired_key_is_gone_for_every_command(keyspace: Keyspace, clock: FakeClock) -> None:
    keyspace.hset("h", {"f": b"1"})
    keyspace.pexpire("h", 10)
    clock.advance_ms(11)
    assert keyspace.hgetall("h") == {}
    # A new hash starts fresh: persistent, not inheriting the old deadline.
    assert keyspace.hincrby("h", "f", 5) == 5
    assert keyspace.pttl("h") == -1
    assert not keyspace.delete("gone")


@pytest.mark.parametrize("px", [0, -5])
def test_set_rejects_non_positive_px(keyspace: Keyspace, px: int) -> None:
    with pytest.raises(KeyspaceError, match="invalid expire time"):
        keyspace.set("k", b"v", px=px)


def test_hset_rejects_empty_mapping(keyspace: Keyspace) -> None:
    with pytest.raises(KeyspaceError, match="wrong number of arguments"):
        keyspace.hset("h", {})
    assert keyspace.pttl("h") == -2


def test_hgetall_returns_a_copy(keyspace: Keyspace) -> None:
    keyspace.hset("h", {"f": b"1"})
    keyspace.hgetall("h")["f"] = b"changed"
    assert keyspace.hget("h", "f") == b"1"


def test_sweep_evicts_keys_nobody_reads(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    for i in range(1000):
        store.keyspace.set(f"short:{i}", b"x", px=10)
    for i in range(10):
        store.keyspace.set(f"forever:{i}", b"x")
    clock.advance_ms(11)
    assert len(store.keyspace) == 1010  # expired but still held

    rounds = 0
    while len(store.keyspace) > 10:
        rounds += 1
        assert rounds < 100, "sweep does not converge"
        evicted = store.keyspace.sweep()
        # Bounded work per sweep, whatever the backlog.
        assert evicted <= Keyspace.SWEEP_SAMPLE * Keyspace.SWEEP_MAX_ROUNDS
    assert sorted(store.keyspace.live_keys()) == sorted(f"forever:{i}" for i in range(10))


def test_sweep_gets_past_live_keys(keyspace: Keyspace, clock: FakeClock) -> None:
    """Long-lived keys at the head of the queue must not shield expired ones behind them."""
    for i in range(200):
        keyspace.set(f"long:{i}", b"x", px=60_000)
    for i in range(200):
        keyspace.set(f"short:{i}", b"x", px=10)
    clock.advance_ms(11)
    for _ in range(50):
        keyspace.sweep()
    assert len(keyspace) == 200
    assert all(key.startswith("long:") for key in keyspace.live_keys())


async def test_execute_runs_the_sweep(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    for i in range(100):
        store.keyspace.set(f"old:{i}", b"x", px=10)
    clock.advance_ms(11)
    call = ScriptCall(INCR_TTL, ("counter",), (1, 60_000))
    for _ in range(MemoryStore.SWEEP_EVERY * 10):
        await store.execute([call])
    assert store.keyspace.live_keys() == ["counter"]
    assert len(store.keyspace) == 1


async def test_twin_exception_is_a_script_error() -> None:
    def broken(ks: object, keys: object, args: object) -> object:
        raise ZeroDivisionError("oops")

    observed: list[tuple[str, float, str | None]] = []
    store = MemoryStore(observe=lambda *event: observed.append(event))
    error = await expect_error(store.execute([ScriptCall(Script("broken", "", broken), ())]))
    assert error.kind == "script"
    assert "broken" in str(error) and "ZeroDivisionError: oops" in str(error)
    assert observed[0][0] == "broken" and observed[0][2] == "script"


async def test_twin_returning_what_redis_cannot_is_a_script_error() -> None:
    store = MemoryStore()
    script = Script("mapping", "", lambda ks, keys, args: {"a": 1})
    error = await expect_error(store.execute([ScriptCall(script, ())]))
    assert error.kind == "script"
    assert "cannot return dict" in str(error)


async def test_keys_reach_the_twin_prefixed() -> None:
    seen: list[list[str]] = []
    script = Script("spy", "", lambda ks, keys, args: seen.append(list(keys)))
    store = MemoryStore("p:")
    await store.execute([ScriptCall(script, ("a", "{o:x}:b"))])
    assert seen == [["p:a", "p:{o:x}:b"]]


@pytest.mark.parametrize(
    "value, reply",
    [
        (None, None),
        (False, None),
        (True, 1),
        (0, 0),
        (-7, -7),
        (2.9, 2),
        (-2.9, -2),
        ("é", "é".encode()),
        (bytearray(b"ab"), b"ab"),
        ((1, [None, "x"]), [1, [None, b"x"]]),
    ],
)
def test_to_reply_mirrors_lua_conversion(value: object, reply: object) -> None:
    assert to_reply(value) == reply
    assert type(to_reply(value)) is type(reply)


def reads_the_monotonic_clock(now_ms: Callable[[], int]) -> bool:
    """Whether `now_ms()` lies between two readings of time.monotonic taken around it."""
    before = int(time.monotonic() * 1000)
    now = now_ms()
    after = int(time.monotonic() * 1000)
    return before <= now <= after


def test_default_clock_is_monotonic() -> None:
    """Expiry runs on time.monotonic unless a clock is passed: a wall-clock step (NTP, a
    resumed VM) must not expire keys early or keep them for ever.

    Behavioural, not a look at the signature: `now_ms()` is read between two monotonic
    readings, which a wall clock (time.time, decades away) cannot fall between. Checked
    wherever the clock is chosen: the keyspace, the store, and what `memory://` opens.
    """
    # Not vacuous: here the two clocks are far apart (the monotonic one counts from boot).
    assert abs(time.time() - time.monotonic()) > 24 * 3600
    opened = open_store(StateConfig(url="memory://"))
    assert isinstance(opened, MemoryStore)
    for keyspace in (Keyspace(), MemoryStore().keyspace, opened.keyspace):
        assert reads_the_monotonic_clock(keyspace.now_ms)
        # And expiry is measured on that same clock.
        keyspace.set("k", b"v", px=60_000)
        assert 59_000 < keyspace.pttl("k") <= 60_000
