"""The four record scripts (BEGIN, RENEW, FINISH, RELEASE) as a contract: run through both
backends' `execute`, every expectation is one literal shared by the Lua script on a real
Redis and its Python twin on the memory store.

What depends on the store's clock (the claim token's time part, the expiry FINISH
computes) cannot be a literal: its structure is checked, and its value against bounds
taken from this process's wall clock (the same machine's clock as redis-server's TIME).

Lease expiry moves the memory store's clock; on Redis the lease is a few milliseconds and
the test polls until Redis has expired it. Records no script would write (garbled, foreign,
from an older release) are written behind the scripts' back: raw HSET on Redis, the
keyspace's hset on memory."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from sidecar.config.model import StateConfig
from sidecar.policies.idempotency.records import (
    BEGIN,
    FINISH,
    RECORD_VERSION,
    RELEASE,
    RENEW,
    BadRecord,
    Found,
    decode_begin,
    encode_headers,
)
from sidecar.store import MemoryStore, Script, ScriptArg, ScriptCall, StateStore, open_store
from sidecar.store.memory import Keyspace
from tests.idempotency.conftest import TEST_TIMEOUT, eventually
from tests.redis_fixture import RedisServer

PREFIX = "sidecar:"
KEY = "idem:{o:acme}:" + "ab" * 32
FP = "f0" * 32
OTHER_FP = "e1" * 32
# Owner ids as the policy makes them (128 random bits in hex); varied, so a prefix or a
# suffix of one is not also a suffix of the token by accident.
A, B = "0123456789abcdef" * 2, "fedcba9876543210" * 2
VERSION = str(RECORD_VERSION).encode()
LEASE = 60_000
SHORT_LEASE = 30  # ms; lapses by itself on Redis, by moving the clock on memory
TTL = 3_600_000
# How far the store's clock may be from this process's reading of the wall clock.
CLOCK_SLACK_MS = 5_000
# An expiry in a record written behind the scripts' back (FINISH computes its own).
EXPIRES = 1_900_000_000_123
HEADERS = encode_headers([("Content-Type", "application/json"), ("Location", "/orders/7")])
BODY = b'{"id": 7}\x00\xff\r\n'


def token_pattern(owner: str) -> re.Pattern[bytes]:
    """A claim token: 16 digits of the store's clock in microseconds, '-', the owner id."""
    return re.compile(rb"[0-9]{16}-" + re.escape(owner.encode()))


def wall_ms() -> int:
    return int(time.time() * 1000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WallClock:
    """The memory store's Unix clock: the real one, unless a test stops it (`fixed`)."""

    def __init__(self) -> None:
        self.fixed: float | None = None

    def __call__(self) -> float:
        return time.time() if self.fixed is None else self.fixed


@dataclass
class Scripts:
    """One backend under test, and how to look behind its back."""

    store: StateStore
    clock: FakeClock | None = None
    wall: WallClock | None = None
    raw: aioredis.Redis | None = None

    async def run(self, script: Script, *args: ScriptArg) -> object:
        [result] = await self.store.execute([ScriptCall(script, (KEY,), args)])
        return result

    async def begin(
        self,
        owner: str,
        fingerprint: str = FP,
        lease: int = LEASE,
        version: ScriptArg = RECORD_VERSION,
    ) -> object:
        return await self.run(BEGIN, owner, fingerprint, lease, version)

    async def claim(
        self, owner: str, lease: int = LEASE, version: ScriptArg = RECORD_VERSION
    ) -> bytes:
        """BEGIN on a key nobody holds: the claim's token."""
        reply = await self.begin(owner, lease=lease, version=version)
        assert isinstance(reply, list) and len(reply) == 2 and reply[0] == b"claimed", reply
        token = reply[1]
        assert isinstance(token, bytes) and token_pattern(owner).fullmatch(token), token
        return token

    async def finish(self, token: str | bytes, state: str = "c", ttl: int = TTL) -> object:
        return await self.run(FINISH, token, state, 201, HEADERS, BODY, ttl, FP, RECORD_VERSION)

    async def fields(self) -> dict[str, bytes]:
        if isinstance(self.store, MemoryStore):
            return self.store.keyspace.hgetall(PREFIX + KEY)
        assert self.raw is not None
        stored = await self.raw.hgetall(PREFIX + KEY)
        return {name.decode(): value for name, value in stored.items()}

    async def write(self, fields: dict[str, bytes]) -> None:
        """Store a record as given (no expiry), behind the scripts' back."""
        if isinstance(self.store, MemoryStore):
            self.store.keyspace.hset(PREFIX + KEY, fields)
            return
        assert self.raw is not None
        await self.raw.hset(PREFIX + KEY, mapping=fields)  # type: ignore[arg-type]

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

    async def finished(self, token: bytes, state: str = "c", ttl: int = TTL) -> int:
        """FINISH by `token` over a claim it holds; the expiry it stored (checked against
        the wall clock around the call)."""
        before = wall_ms()
        assert await self.finish(token, state, ttl) == 1
        after = wall_ms()
        return expiry_of(await self.fields(), before, after, ttl)


def expiry_of(fields: dict[str, bytes], before: int, after: int, ttl: int) -> int:
    """The record's `e`: a plain integer, the store's clock (Unix ms) plus `ttl`."""
    assert re.fullmatch(rb"[0-9]+", fields["e"]), fields["e"]
    expires = int(fields["e"])
    assert before + ttl - CLOCK_SLACK_MS <= expires <= after + ttl + CLOCK_SLACK_MS
    return expires


@pytest.fixture(params=["memory", "redis"])
async def scripts(request: pytest.FixtureRequest) -> AsyncIterator[Scripts]:
    if request.param == "memory":
        clock, wall = FakeClock(), WallClock()
        memory = MemoryStore(PREFIX, clock=clock)
        memory.keyspace = Keyspace(clock, wall)
        yield Scripts(memory, clock=clock, wall=wall)
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


def claimed(token: bytes, fingerprint: str = FP, version: bytes = VERSION) -> dict[str, bytes]:
    return {"s": b"p", "t": token, "f": fingerprint.encode(), "v": version}


def completed(token: bytes, expires: int, state: bytes = b"c") -> dict[str, bytes]:
    """Completed by `token`'s owner: the token stays (docs/idempotency.md), so the owner's
    repeated completion write is recognised as harmless."""
    return {
        "s": state,
        "c": b"201",
        "h": HEADERS,
        "b": BODY,
        "e": str(expires).encode(),
        "f": FP.encode(),
        "t": token,
        "v": VERSION,
    }


def malformed(reply: object) -> BadRecord:
    with pytest.raises(BadRecord) as raised:
        decode_begin(reply)
    assert raised.value.kind == "malformed_record"
    return raised.value


# --- BEGIN ----------------------------------------------------------------------------------


@bounded
async def test_begin_claims_a_missing_record(scripts: Scripts) -> None:
    reply = await scripts.begin(A)
    assert isinstance(reply, list) and len(reply) == 2 and reply[0] == b"claimed"
    token = reply[1]
    assert isinstance(token, bytes) and token_pattern(A).fullmatch(token)
    assert decode_begin(reply) == Found("claimed", token=token.decode())
    assert await scripts.fields() == claimed(token)
    assert 0 < await scripts.pttl() <= LEASE


@bounded
async def test_claim_token_time_is_the_store_clock_in_microseconds(scripts: Scripts) -> None:
    before = time.time()
    token = await scripts.claim(A)
    after = time.time()
    claimed_at = int(token[:16]) / 1_000_000
    assert before - CLOCK_SLACK_MS / 1000 <= claimed_at <= after + CLOCK_SLACK_MS / 1000


@bounded
async def test_later_claims_of_a_key_have_tokens_that_sort_after(scripts: Scripts) -> None:
    first = await scripts.claim(A)
    assert await scripts.run(RELEASE, first) == 1
    second = await scripts.claim(B)
    assert await scripts.run(RELEASE, second) == 1
    # The same owner id again: the time part alone orders them.
    third = await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    fourth = await scripts.claim(A)
    assert first.decode() < second.decode() < third.decode() < fourth.decode()
    assert await scripts.fields() == claimed(fourth)


@bounded
async def test_claim_tokens_sort_in_claim_order_even_when_the_wall_clock_stands_still_or_steps_back(
    scripts: Scripts,
) -> None:
    """Memory only: its `unix_us` is strictly increasing. (Redis' TIME may tie, or step
    back with the host clock, and this test cannot move it.)"""
    if scripts.wall is None:
        pytest.skip("Redis' clock cannot be stopped or stepped from a test")
    scripts.wall.fixed = time.time()
    first = await scripts.claim(A)
    assert await scripts.run(RELEASE, first) == 1
    second = await scripts.claim(B)
    assert await scripts.run(RELEASE, second) == 1
    scripts.wall.fixed -= 3600
    third = await scripts.claim(A)
    assert first.decode() < second.decode() < third.decode()


@bounded
async def test_begin_on_a_claimed_record_reports_it_in_progress(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    same = await scripts.begin(B, FP)
    other = await scripts.begin(B, OTHER_FP)
    assert isinstance(same, list) and isinstance(other, list)
    assert same[:2] == [b"in_progress", 1]
    assert other[:2] == [b"in_progress", 0]
    for reply in (same, other):
        assert len(reply) == 3 and type(reply[2]) is int and 0 < reply[2] <= LEASE
    assert decode_begin(same) == Found("in_progress", True, lease_left_ms=same[2])
    assert decode_begin(other) == Found("in_progress", False, lease_left_ms=other[2])
    # Looking never takes over: A still owns it.
    assert await scripts.fields() == claimed(token)


@bounded
async def test_begin_on_a_completed_record_returns_it(scripts: Scripts) -> None:
    expires = await scripts.finished(await scripts.claim(A))
    same = await scripts.begin(B, FP)
    assert same == [b"completed", 1, 201, HEADERS, BODY, expires]
    assert await scripts.begin(B, OTHER_FP) == [b"completed", 0, 201, HEADERS, BODY, expires]
    assert decode_begin(same) == Found("completed", True, 201, HEADERS, BODY, expires)


@bounded
async def test_begin_on_a_not_replayable_record(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    before = wall_ms()
    assert await scripts.run(FINISH, token, "n", 201, b"[]", b"", TTL, FP, RECORD_VERSION) == 1
    expires = expiry_of(await scripts.fields(), before, wall_ms(), TTL)
    same = await scripts.begin(B, FP)
    assert same == [b"not_replayable", 1, 201, expires]
    assert await scripts.begin(B, OTHER_FP) == [b"not_replayable", 0, 201, expires]
    assert decode_begin(same) == Found("not_replayable", True, 201, expires_ms=expires)


@bounded
async def test_begin_after_the_lease_lapsed_claims_anew(scripts: Scripts) -> None:
    await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    token = await scripts.claim(B)
    assert await scripts.fields() == claimed(token)


# --- BEGIN: record layout versions ----------------------------------------------------------


@bounded
async def test_a_claim_records_the_callers_layout_version(scripts: Scripts) -> None:
    token = await scripts.claim(A, version=7)
    assert await scripts.fields() == claimed(token, version=b"7")


@bounded
async def test_begin_on_a_record_of_another_layout_reports_it_foreign(scripts: Scripts) -> None:
    record = completed(b"1700000000000000-" + B.encode(), EXPIRES) | {"v": b"2"}
    await scripts.write(record)
    reply = await scripts.begin(A)
    assert reply == [b"foreign", b"2"]
    with pytest.raises(BadRecord) as raised:
        decode_begin(reply)
    assert raised.value.kind == "foreign_record"
    # Reported, never taken over nor rewritten.
    assert await scripts.fields() == record


@bounded
async def test_a_foreign_claim_is_foreign_too(scripts: Scripts) -> None:
    """Even in progress: a caller of another layout never reads its lease."""
    token = await scripts.claim(B, version=2)
    assert await scripts.begin(A) == [b"foreign", b"2"]
    # A caller of that layout sees it in progress as usual.
    reply = await scripts.begin(A, version=2)
    assert isinstance(reply, list) and reply[:2] == [b"in_progress", 1]
    assert len(reply) == 3 and type(reply[2]) is int and 0 < reply[2] <= LEASE
    assert await scripts.fields() == claimed(token, version=b"2")


@bounded
async def test_a_record_without_a_version_is_read_as_the_current_layout(
    scripts: Scripts,
) -> None:
    """Written by an older release (no `v`, the owner id as its token)."""
    old = completed(B.encode(), EXPIRES)
    del old["v"]
    await scripts.write(old)
    reply = await scripts.begin(A)
    assert reply == [b"completed", 1, 201, HEADERS, BODY, EXPIRES]
    assert decode_begin(reply) == Found("completed", True, 201, HEADERS, BODY, EXPIRES)
    assert await scripts.fields() == old


@bounded
async def test_an_old_claim_without_a_version_is_in_progress(scripts: Scripts) -> None:
    await scripts.write({"s": b"p", "t": B.encode(), "f": FP.encode()})
    # Written without an expiry: PTTL is -1 on both.
    assert await scripts.begin(A) == [b"in_progress", 1, -1]
    assert await scripts.begin(A, OTHER_FP) == [b"in_progress", 0, -1]


# --- BEGIN: records this release cannot read ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("c", None),
        ("c", b""),
        ("c", b"abc"),
        ("c", b"201x"),
        ("e", None),
        ("e", b""),
        ("e", b"soon"),
        ("e", b"12abc"),
    ],
)
@pytest.mark.parametrize("state", [b"c", b"n"])
async def test_a_missing_or_garbled_number_comes_back_as_none(
    scripts: Scripts, state: bytes, field: str, value: bytes | None
) -> None:
    """Not a shorter reply (a Lua nil would cut the array there): every later field still
    comes back, and decode_begin calls the record malformed."""
    async with asyncio.timeout(TEST_TIMEOUT):
        record = completed(b"1700000000000000-" + B.encode(), EXPIRES, state)
        if value is None:
            del record[field]
        else:
            record[field] = value
        await scripts.write(record)
        status = None if field == "c" else 201
        expires = None if field == "e" else EXPIRES
        reply = await scripts.begin(A)
        if state == b"c":
            assert reply == [b"completed", 1, status, HEADERS, BODY, expires]
        else:
            assert reply == [b"not_replayable", 1, status, expires]
        malformed(reply)
        assert await scripts.fields() == record


@pytest.mark.parametrize(
    ("headers", "reason"),
    [(None, "missing"), (b"", "empty"), (b'[["Content-Type", ', "truncated"), (b"{}x", "not JSON")],
)
async def test_unreadable_stored_headers_make_the_record_malformed(
    scripts: Scripts, headers: bytes | None, reason: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        record = completed(b"1700000000000000-" + B.encode(), EXPIRES)
        if headers is None:
            del record["h"]
        else:
            record["h"] = headers
        await scripts.write(record)
        reply = await scripts.begin(A)
        assert reply == [b"completed", 1, 201, headers, BODY, EXPIRES], reason
        malformed(reply)


@bounded
async def test_a_missing_body_makes_a_completed_record_malformed(scripts: Scripts) -> None:
    record = completed(b"1700000000000000-" + B.encode(), EXPIRES)
    del record["b"]
    await scripts.write(record)
    reply = await scripts.begin(A)
    assert reply == [b"completed", 1, 201, HEADERS, None, EXPIRES]
    malformed(reply)


def test_decode_begin_calls_an_unknown_state_or_a_short_reply_malformed() -> None:
    for reply in (
        [b"archived", 1, 201, EXPIRES],
        [b"completed", 1, 201, HEADERS],
        [b"not_replayable", 1],
        [b"in_progress", 1],
        [b"claimed"],
        [],
        None,
        b"claimed",
    ):
        assert "unreadable idempotency record" in str(malformed(reply))


@bounded
async def test_a_record_in_an_unknown_state_is_malformed(scripts: Scripts) -> None:
    await scripts.write(completed(b"1700000000000000-" + B.encode(), EXPIRES, b"x"))
    assert await scripts.begin(A) == [b"malformed", b"x"]
    malformed(await scripts.begin(A))


@pytest.mark.parametrize(
    "garbled", [b"1.5", b"0x10", b"1e3", b"1_000", b"inf", b"nan", b" 201", b"+201", b""]
)
async def test_only_plain_integers_are_read_as_numbers(scripts: Scripts, garbled: bytes) -> None:
    """Lua's tonumber and Python's int() accept different strings; both sides read a field
    as a number only when it is a plain integer, so they agree on every garbled value."""
    record = completed(b"1700000000000000-" + B.encode(), EXPIRES)
    record["c"] = garbled
    async with asyncio.timeout(TEST_TIMEOUT):
        await scripts.write(record)
        reply = await scripts.begin(A)
    assert isinstance(reply, list) and reply[2] is None, reply
    malformed(reply)


# --- FINISH ---------------------------------------------------------------------------------


@bounded
async def test_finish_by_the_owner_stores_the_outcome_for_the_ttl(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    expires = await scripts.finished(token)
    assert await scripts.fields() == completed(token, expires)
    assert LEASE < await scripts.pttl() <= TTL


@bounded
async def test_finish_computes_the_expiry_from_the_store_clock_and_the_ttl(
    scripts: Scripts,
) -> None:
    token = await scripts.claim(A)
    await scripts.finished(token, ttl=1_000)  # the bounds are checked inside
    assert 0 < await scripts.pttl() <= 1_000


@bounded
async def test_finish_stores_the_callers_layout_version(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    assert await scripts.run(FINISH, token, "c", 201, HEADERS, BODY, TTL, FP, 9) == 1
    assert (await scripts.fields())["v"] == b"9"


@bounded
async def test_finish_by_another_token_writes_nothing(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    other = b"9" * 16 + b"-" + B.encode()
    for wrong in (other, A, token[:-1], token + b"0", token[1:], b"-" + A.encode()):
        assert await scripts.finish(wrong) == 0, wrong
    assert await scripts.fields() == claimed(token)


@bounded
async def test_finish_by_a_stale_token_of_the_same_owner_writes_nothing(
    scripts: Scripts,
) -> None:
    stale = await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    token = await scripts.claim(A)
    assert await scripts.finish(stale) == 0
    assert await scripts.fields() == claimed(token)


@bounded
async def test_finish_repeated_by_the_owner_is_acknowledged_and_changes_nothing(
    scripts: Scripts,
) -> None:
    """A completion write retried after a timeout (that had landed) must not fail, nor
    overwrite what the first write stored (its expiry included)."""
    token = await scripts.claim(A)
    expires = await scripts.finished(token)
    assert await scripts.finish(token, state="n", ttl=1000) == 1
    assert await scripts.fields() == completed(token, expires)
    assert LEASE < await scripts.pttl() <= TTL


@bounded
async def test_finish_of_a_completed_record_by_another_token_writes_nothing(
    scripts: Scripts,
) -> None:
    token = await scripts.claim(A)
    expires = await scripts.finished(token)
    assert await scripts.finish(b"9" * 16 + b"-" + B.encode(), state="n", ttl=1000) == 0
    assert await scripts.finish(A, state="n", ttl=1000) == 0
    assert await scripts.fields() == completed(token, expires)


@bounded
async def test_finish_after_the_lease_lapsed_with_nobody_else_still_stores(
    scripts: Scripts,
) -> None:
    token = await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    before = wall_ms()
    assert await scripts.finish(token) == 2
    expires = expiry_of(await scripts.fields(), before, wall_ms(), TTL)
    assert await scripts.fields() == completed(token, expires)
    assert LEASE < await scripts.pttl() <= TTL
    assert await scripts.begin(B) == [b"completed", 1, 201, HEADERS, BODY, expires]


@bounded
async def test_finish_after_another_owner_claimed_writes_nothing(scripts: Scripts) -> None:
    stale = await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    token = await scripts.claim(B)
    assert await scripts.finish(stale) == 0
    assert await scripts.finish(A) == 0
    assert await scripts.fields() == claimed(token)


# --- RENEW ----------------------------------------------------------------------------------


@bounded
async def test_renew_by_the_owner_extends_the_lease(scripts: Scripts) -> None:
    token = await scripts.claim(A, lease=1000)
    assert await scripts.run(RENEW, token, LEASE) == 1
    assert 1000 < await scripts.pttl() <= LEASE
    assert await scripts.fields() == claimed(token)


@bounded
async def test_renew_by_another_token_changes_nothing(scripts: Scripts) -> None:
    """The full token, compared exactly: not the owner id, nor a piece of the token."""
    token = await scripts.claim(A, lease=1000)
    other = b"9" * 16 + b"-" + B.encode()
    for wrong in (other, B, A, token[:-1], token + b"0", token[1:], b"-" + A.encode()):
        assert await scripts.run(RENEW, wrong, LEASE) == 0, wrong
    assert 0 < await scripts.pttl() <= 1000
    assert await scripts.fields() == claimed(token)


@bounded
async def test_renew_by_a_stale_token_of_the_same_owner_changes_nothing(
    scripts: Scripts,
) -> None:
    stale = await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    await scripts.claim(A, lease=1000)
    assert await scripts.run(RENEW, stale, LEASE) == 0
    assert 0 < await scripts.pttl() <= 1000


@bounded
async def test_renew_of_a_completed_or_missing_record_is_refused(scripts: Scripts) -> None:
    assert await scripts.run(RENEW, b"1700000000000000-" + A.encode(), LEASE) == 0
    assert await scripts.fields() == {}
    token = await scripts.claim(A)
    await scripts.finished(token)
    assert await scripts.run(RENEW, token, 1000) == 0
    assert LEASE < await scripts.pttl() <= TTL


# --- RELEASE --------------------------------------------------------------------------------


@bounded
async def test_release_by_the_owner_deletes_the_claim(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    assert await scripts.run(RELEASE, token) == 1
    assert await scripts.fields() == {}
    assert await scripts.pttl() == -2
    await scripts.claim(B)


@bounded
async def test_release_by_the_owner_id_alone_deletes_the_claim(scripts: Scripts) -> None:
    """The caller whose claim landed but whose reply was lost knows only its owner id."""
    await scripts.claim(A)
    assert await scripts.run(RELEASE, A) == 1
    assert await scripts.fields() == {}
    assert await scripts.pttl() == -2
    await scripts.claim(B)


@bounded
async def test_release_by_anyone_else_keeps_the_claim(scripts: Scripts) -> None:
    token = await scripts.claim(A)
    tail = token[16:]  # b"-" + the owner id
    assert tail == b"-" + A.encode()
    for wrong in (
        B,  # another owner id
        b"9" * 16 + b"-" + B.encode(),  # another owner's token
        b"9" * 16 + b"-" + A.encode(),  # the owner id under another time
        A[:16],  # a prefix of the owner id
        A[:-1],  # all of the owner id but its last digit
        A[1:],  # a suffix of the owner id, not all of it
        tail,  # "-" + owner id: a suffix of the token, but not the owner id
        token[1:],  # the token but its first digit
        token[10:],  # a suffix of the token from inside its time part
        token[:-1],  # the token but its last digit
        token + b"0",
        b"",
    ):
        assert await scripts.run(RELEASE, wrong) == 0, wrong
    assert await scripts.fields() == claimed(token)


@bounded
async def test_release_by_a_stale_token_keeps_the_newer_claim_of_the_same_owner(
    scripts: Scripts,
) -> None:
    stale = await scripts.claim(A, lease=SHORT_LEASE)
    await scripts.lapse()
    token = await scripts.claim(A)
    assert await scripts.run(RELEASE, stale) == 0
    assert await scripts.fields() == claimed(token)


@bounded
async def test_release_never_deletes_a_completed_record(scripts: Scripts) -> None:
    assert await scripts.run(RELEASE, A) == 0
    token = await scripts.claim(A)
    expires = await scripts.finished(token)
    assert await scripts.run(RELEASE, token) == 0
    assert await scripts.run(RELEASE, A) == 0
    assert await scripts.fields() == completed(token, expires)
