"""The StateStore contract, run against both backends with the same expectations.

Every expected value is a literal shared by both parametrizations, so passing on both
means the memory twins and the Lua scripts agree, types included.
"""

from __future__ import annotations

import pytest

from sidecar.store import ScriptCall, StateStore, StoreError
from tests.store.conftest import PREFIX, Harness, expect_error
from tests.store.twins import CAS, EXISTS, FAIL, GET_MANY, INCR_TTL, OP, SHAPES

# -- results and their types -----------------------------------------------------------


async def test_backend_name(harness: Harness) -> None:
    assert harness.store.backend == harness.backend


async def test_counter_returns_ints(harness: Harness) -> None:
    assert await harness.run(INCR_TTL, "c", args=(1, 60_000)) == 1
    result = await harness.run(INCR_TTL, "c", args=(41, 60_000))
    assert result == 42
    assert type(result) is int


async def test_reply_shapes_convert_like_lua(harness: Harness) -> None:
    result = await harness.run(SHAPES, args=("echo",))
    assert result == [7, b"two", None, [3, b"four", -2], 1, b"echo"]
    assert isinstance(result, list)
    assert [type(item) for item in result] == [int, bytes, type(None), list, int, bytes]


async def test_bare_booleans_are_one_and_none(harness: Harness) -> None:
    await harness.run(OP, "k", args=("SET", "v"))
    assert await harness.store.execute(
        [ScriptCall(EXISTS, ("k",)), ScriptCall(EXISTS, ("missing",))]
    ) == [1, None]
    result = await harness.run(EXISTS, "k")
    assert type(result) is int


async def test_table_with_nil_holes_keeps_positions(harness: Harness) -> None:
    await harness.run(OP, "a", args=("SET", "1"))
    await harness.run(OP, "c", args=("SET", b"\xff\x00binary"))
    result = await harness.run(GET_MANY, "a", "b", "c", "d")
    assert result == [b"1", None, b"\xff\x00binary", None]


async def test_compare_and_set_on_hash_field(harness: Harness) -> None:
    assert await harness.run(CAS, "h", args=("owner", "", "alice")) == [1, b"alice"]
    assert await harness.run(CAS, "h", args=("owner", "", "bob")) == [0, b"alice"]
    assert await harness.run(CAS, "h", args=("owner", "alice", "bob")) == [1, b"bob"]
    assert await harness.run(CAS, "h", args=("other", "x", "y")) == [0, None]
    assert await harness.run(OP, "h", args=("HGETALL",)) == [b"owner", b"bob"]


async def test_missing_values_are_none(harness: Harness) -> None:
    assert await harness.run(OP, "nothing", args=("GET",)) is None
    assert await harness.run(OP, "nothing", args=("HGET", "f")) is None
    assert await harness.run(OP, "nothing", args=("HGETALL",)) == []


# -- keys --------------------------------------------------------------------------------


async def test_keys_are_prefixed(harness: Harness) -> None:
    await harness.run(INCR_TTL, "quota:{o:acme}:u:bob", args=(1, 60_000))
    await harness.run(OP, "idem:{o:acme}:k1", args=("SET", "v"))
    assert harness.stored_keys() == {
        f"{PREFIX}quota:{{o:acme}}:u:bob",
        f"{PREFIX}idem:{{o:acme}}:k1",
    }


# -- batches -----------------------------------------------------------------------------


async def test_batch_returns_results_in_call_order(store: StateStore) -> None:
    calls = [ScriptCall(INCR_TTL, (f"k{i % 3}",), (i, 60_000)) for i in range(10)]
    results = await store.execute(calls)
    # k0 gets 0,3,6,9; k1 gets 1,4,7; k2 gets 2,5,8: running sums, interleaved.
    assert results == [0, 1, 2, 3, 5, 7, 9, 12, 15, 18]


async def test_batch_mixes_scripts(store: StateStore) -> None:
    results = await store.execute(
        [
            ScriptCall(OP, ("s",), ("SET", "v")),
            ScriptCall(INCR_TTL, ("n",), (5, 60_000)),
            ScriptCall(GET_MANY, ("s", "n", "x")),
            ScriptCall(CAS, ("h",), ("f", "", "1")),
        ]
    )
    assert results == [b"OK", 5, [b"v", b"5", None], [1, b"1"]]


async def test_empty_batch_is_a_no_op(harness: Harness) -> None:
    assert await harness.store.execute([]) == []
    assert harness.observed == []


async def test_failing_call_fails_the_batch_but_the_others_ran(harness: Harness) -> None:
    error = await expect_error(
        harness.store.execute(
            [
                ScriptCall(INCR_TTL, ("before",), (1, 60_000)),
                ScriptCall(FAIL, (), ("no",)),
                ScriptCall(INCR_TTL, ("after",), (1, 60_000)),
            ]
        )
    )
    assert error.kind == "script"
    assert "refused: no" in str(error)
    # As in a Redis pipeline, the calls around the failing one each ran exactly once.
    assert await harness.run(GET_MANY, "before", "after") == [b"1", b"1"]


# -- errors ------------------------------------------------------------------------------


async def test_script_error_is_kind_script(harness: Harness) -> None:
    error = await expect_error(harness.run(FAIL, args=("because",)))
    assert error.kind == "script"
    assert "refused: because" in str(error)
    assert harness.observed[-1][0] == "fail"
    assert harness.observed[-1][2] == "script"


@pytest.mark.parametrize(
    "setup, command",
    [
        (("HSET", "f", "v"), ("GET",)),
        (("HSET", "f", "v"), ("INCRBY", "1")),
        (("SET", "v"), ("HGET", "f")),
        (("SET", "v"), ("HSET", "f", "v")),
        (("SET", "v"), ("HINCRBY", "f", "1")),
        (("SET", "v"), ("HGETALL",)),
        (("SET", "v"), ("HDEL", "f")),
    ],
)
async def test_wrongtype_is_a_script_error(
    harness: Harness, setup: tuple[str, ...], command: tuple[str, ...]
) -> None:
    await harness.run(OP, "k", args=setup)
    error = await expect_error(harness.run(OP, "k", args=command))
    assert error.kind == "script"
    assert "WRONGTYPE" in str(error)


@pytest.mark.parametrize(
    "setup, command, message",
    [
        (("SET", "abc"), ("INCRBY", "1"), "not an integer"),
        (("SET", "01"), ("INCRBY", "1"), "not an integer"),
        (("SET", " 1"), ("INCRBY", "1"), "not an integer"),
        (("SET", str(2**63 - 1)), ("INCRBY", "1"), "overflow"),
        (("HSET", "f", "x"), ("HINCRBY", "f", "1"), "not an integer"),
    ],
)
async def test_integer_errors_match_redis(
    harness: Harness, setup: tuple[str, ...], command: tuple[str, ...], message: str
) -> None:
    await harness.run(OP, "k", args=setup)
    error = await expect_error(harness.run(OP, "k", args=command))
    assert error.kind == "script"
    assert message in str(error)


# -- TTL semantics -----------------------------------------------------------------------


async def test_pttl_missing_and_persistent(harness: Harness) -> None:
    assert await harness.pttl("missing") == -2
    await harness.run(OP, "k", args=("SET", "v"))
    assert await harness.pttl("k") == -1


async def test_set_with_px_then_plain_set_clears_expiry(harness: Harness) -> None:
    await harness.run(OP, "k", args=("SET", "v", "PX", "10000"))
    assert 0 < await harness.pttl("k") <= 10_000
    await harness.run(OP, "k", args=("SET", "w"))
    assert await harness.pttl("k") == -1


async def test_incrby_starts_at_zero_and_keeps_expiry(harness: Harness) -> None:
    assert await harness.run(OP, "n", args=("INCRBY", "-3")) == -3
    await harness.run(OP, "n", args=("PEXPIRE", "10000"))
    assert await harness.run(OP, "n", args=("INCRBY", "5")) == 2
    assert 0 < await harness.pttl("n") <= 10_000


async def test_hash_writes_keep_expiry(harness: Harness) -> None:
    assert await harness.run(OP, "h", args=("HSET", "a", "1", "b", "2")) == 2
    assert await harness.run(OP, "h", args=("PEXPIRE", "10000")) == 1
    assert await harness.run(OP, "h", args=("HSET", "a", "3", "c", "4")) == 1
    assert await harness.run(OP, "h", args=("HINCRBY", "a", "10")) == 13
    assert 0 < await harness.pttl("h") <= 10_000
    assert await harness.run(OP, "h", args=("HGETALL",)) == [b"a", b"13", b"b", b"2", b"c", b"4"]


async def test_deleting_last_field_deletes_the_hash(harness: Harness) -> None:
    await harness.run(OP, "h", args=("HSET", "a", "1", "b", "2"))
    assert await harness.run(OP, "h", args=("HDEL", "a", "zzz")) == 1
    assert await harness.pttl("h") == -1
    assert await harness.run(OP, "h", args=("HDEL", "b")) == 1
    assert await harness.pttl("h") == -2


async def test_pexpire_and_del_on_missing_key(harness: Harness) -> None:
    assert await harness.run(OP, "missing", args=("PEXPIRE", "1000")) == 0
    assert await harness.run(OP, "missing", args=("DEL",)) == 0
    await harness.run(OP, "k", args=("SET", "v"))
    assert await harness.run(OP, "k", args=("DEL",)) == 1
    assert await harness.pttl("k") == -2


async def test_pexpire_in_the_past_deletes(harness: Harness) -> None:
    await harness.run(OP, "k", args=("SET", "v"))
    assert await harness.run(OP, "k", args=("PEXPIRE", "0")) == 1
    assert await harness.run(OP, "k", args=("GET",)) is None


async def test_key_expires(harness: Harness) -> None:
    await harness.run(OP, "k", args=("SET", "v", "PX", "50"))
    assert await harness.run(OP, "k", args=("GET",)) == b"v"
    await harness.until_expired("k")
    assert await harness.run(OP, "k", args=("GET",)) is None
    assert await harness.pttl("k") == -2
    assert "test:k" not in harness.stored_keys()


async def test_counter_window_restarts_after_expiry(harness: Harness) -> None:
    assert await harness.run(INCR_TTL, "w", args=(1, 50)) == 1
    assert await harness.run(INCR_TTL, "w", args=(1, 50)) == 2
    await harness.until_expired("w")
    assert await harness.run(INCR_TTL, "w", args=(1, 50)) == 1


# -- observer and ping -----------------------------------------------------------------


async def test_observer_labels(harness: Harness) -> None:
    await harness.run(INCR_TTL, "a", args=(1, 1000))
    await harness.store.execute(
        [ScriptCall(INCR_TTL, ("a",), (1, 1000)), ScriptCall(GET_MANY, ("a",))]
    )
    await harness.store.ping()
    labels = [(label, kind) for label, _, kind in harness.observed]
    assert labels == [("incr_ttl", None), ("incr_ttl+get_many", None), ("ping", None)]
    assert all(seconds >= 0 for _, seconds, _ in harness.observed)


async def test_ping_returns_positive_seconds(store: StateStore) -> None:
    rtt = await store.ping()
    assert isinstance(rtt, float)
    assert 0 < rtt < 1


async def test_closed_store_is_unavailable(harness: Harness) -> None:
    await harness.store.close()
    error = await expect_error(harness.run(INCR_TTL, "k", args=(1, 1000)))
    assert error.kind == "unavailable"
    with pytest.raises(StoreError):
        await harness.store.ping()
    assert [kind for _, _, kind in harness.observed] == ["unavailable", "unavailable"]
    await harness.store.close()  # idempotent
