"""The in-process state store: a tiny Redis-alike keyspace and scripts run as Python twins.

It exists for single-replica deployments and tests. Its data lives in one process, so two
replicas (or two workers) using `memory://` each count on their own; see docs/state-store.md.

Atomicity comes from the event loop: `execute` runs every twin synchronously, with no await
in between, so no other coroutine can observe a half-applied call (or batch).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence

from sidecar.store.base import ScriptCall, ScriptResult, StoreError
from sidecar.store.observe import StoreObserver, batch_label, report

Value = bytes | dict[str, bytes]

# Redis integers are signed 64-bit; INCRBY/HINCRBY refuse to leave that range.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# What Redis' string2ll accepts: no sign on zero, no leading zeros, no spaces, no "+".
_REDIS_INT = re.compile(rb"(?:0|-?[1-9][0-9]*)\Z")

_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
_NOT_INTEGER = "ERR value is not an integer or out of range"
_HASH_NOT_INTEGER = "ERR hash value is not an integer"
_OVERFLOW = "ERR increment or decrement would overflow"


class KeyspaceError(Exception):
    """A Redis command error (WRONGTYPE, not an integer...), raised inside a twin."""


class Keyspace:
    """Strings and hashes with millisecond expiry, mirroring the Redis commands twins use.

    Expired keys are removed lazily when touched and by `sweep`, a bounded incremental pass
    the store runs every few calls, so keys nobody reads again do not accumulate forever.
    """

    # Sweep tuning, after Redis' active expiry: look at a few volatile keys per round and
    # keep going only while a good share of them turned out to be expired.
    SWEEP_SAMPLE = 20
    SWEEP_MAX_ROUNDS = 16
    SWEEP_CONTINUE_RATIO = 0.25

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._last_unix_us = 0
        self._data: dict[str, Value] = {}
        # Absolute deadlines in ms for keys that have one. Insertion order doubles as the
        # sweep's round-robin queue: live keys examined by a sweep move to the back.
        self._expires: dict[str, int] = {}

    # -- clock and expiry ---------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def unix_us(self) -> int:
        # Strictly increasing, so two stamps taken one after the other never tie or go
        # back (a wall clock may step); Redis' TIME, which the Lua twins use, may tie.
        self._last_unix_us = max(self._last_unix_us + 1, int(self._wall_clock() * 1_000_000))
        return self._last_unix_us

    def _expired(self, key: str, now: int) -> bool:
        deadline = self._expires.get(key)
        # Redis keeps a key alive while now <= deadline (PTTL 0 is still a live key).
        return deadline is not None and now > deadline

    def _lookup(self, key: str) -> Value | None:
        """The key's value, dropping it first if it has expired."""
        if key in self._expires and self._expired(key, self.now_ms()):
            self._remove(key)
            return None
        return self._data.get(key)

    def _remove(self, key: str) -> bool:
        self._expires.pop(key, None)
        return self._data.pop(key, None) is not None

    def sweep(self) -> int:
        """Evict expired keys nobody touched; bounded work. Returns how many were evicted."""
        now = self.now_ms()
        evicted = 0
        for _ in range(self.SWEEP_MAX_ROUNDS):
            sample = list(_take(self._expires, self.SWEEP_SAMPLE))
            if not sample:
                break
            expired = 0
            for key, deadline in sample:
                if now > deadline:
                    self._remove(key)
                    expired += 1
                else:
                    # Rotate to the back so the next round looks at other keys.
                    del self._expires[key]
                    self._expires[key] = deadline
            evicted += expired
            if expired < len(sample) * self.SWEEP_CONTINUE_RATIO:
                break
        return evicted

    # -- introspection (tests, debugging) -----------------------------------------------

    def live_keys(self) -> list[str]:
        """Live keys (already prefixed), in no particular order."""
        now = self.now_ms()
        return [key for key in self._data if not self._expired(key, now)]

    def __len__(self) -> int:
        """Stored keys, including expired ones not evicted yet (what memory holds)."""
        return len(self._data)

    # -- strings ------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        return self._string(key)

    def set(self, key: str, value: bytes, px: int | None = None) -> None:
        if px is not None and px <= 0:
            raise KeyspaceError("ERR invalid expire time in 'set' command")
        self._data[key] = bytes(value)
        # Like SET without KEEPTTL: a plain SET makes the key persistent again.
        if px is None:
            self._expires.pop(key, None)
        else:
            self._expires[key] = self.now_ms() + px

    def delete(self, key: str) -> bool:
        if self._lookup(key) is None:
            return False
        return self._remove(key)

    def incrby(self, key: str, amount: int) -> int:
        current = self._string(key)
        value = _add(0 if current is None else _parse_int(current, _NOT_INTEGER), amount)
        # Writing in place keeps any expiry, as INCRBY does.
        self._data[key] = str(value).encode()
        return value

    def _string(self, key: str) -> bytes | None:
        value = self._lookup(key)
        if value is None or isinstance(value, bytes):
            return value
        raise KeyspaceError(_WRONGTYPE)

    # -- expiry -------------------------------------------------------------------------

    def pexpire(self, key: str, px: int) -> bool:
        if self._lookup(key) is None:
            return False
        if px <= 0:
            # Redis deletes a key given a deadline in the past, and still answers 1.
            self._remove(key)
        else:
            self._expires[key] = self.now_ms() + px
        return True

    def pttl(self, key: str) -> int:
        if self._lookup(key) is None:
            return -2
        deadline = self._expires.get(key)
        return -1 if deadline is None else deadline - self.now_ms()

    # -- hashes -------------------------------------------------------------------------

    def hget(self, key: str, field: str) -> bytes | None:
        return self._hash(key).get(field)

    def hgetall(self, key: str) -> dict[str, bytes]:
        return dict(self._hash(key))

    def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        if not mapping:
            raise KeyspaceError("ERR wrong number of arguments for 'hset' command")
        hash_ = self._hash(key, create=True)
        hash_.update({field: bytes(value) for field, value in mapping.items()})

    def hdel(self, key: str, *fields: str) -> int:
        hash_ = self._hash(key)
        removed = sum(1 for field in set(fields) if hash_.pop(field, None) is not None)
        if not hash_:
            # Redis never keeps an empty hash: the key itself goes.
            self._remove(key)
        return removed

    def hincrby(self, key: str, field: str, amount: int) -> int:
        hash_ = self._hash(key, create=True)
        current = hash_.get(field)
        value = _add(0 if current is None else _parse_int(current, _HASH_NOT_INTEGER), amount)
        hash_[field] = str(value).encode()
        return value

    def _hash(self, key: str, create: bool = False) -> dict[str, bytes]:
        """The hash at `key`: a throwaway empty one when missing, unless `create`."""
        value = self._lookup(key)
        if isinstance(value, dict):
            return value
        if value is not None:
            raise KeyspaceError(_WRONGTYPE)
        hash_: dict[str, bytes] = {}
        if create:
            self._data[key] = hash_
        return hash_


class MemoryStore:
    """A `StateStore` kept in this process; scripts run as their Python twins."""

    # Run a bounded expiry sweep once every this many executed calls.
    SWEEP_EVERY = 16

    def __init__(
        self,
        key_prefix: str = "",
        observe: StoreObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keyspace = Keyspace(clock)
        self._prefix = key_prefix
        self._observe = observe
        self._until_sweep = self.SWEEP_EVERY
        self._closed = False

    @property
    def backend(self) -> str:
        return "memory"

    async def execute(self, calls: Sequence[ScriptCall]) -> list[ScriptResult]:
        if not calls:
            return []
        started = time.perf_counter()
        try:
            results = self._run(calls)
        except StoreError as exc:
            report(self._observe, batch_label(calls), started, exc)
            raise
        report(self._observe, batch_label(calls), started, None)
        return results

    def _run(self, calls: Sequence[ScriptCall]) -> list[ScriptResult]:
        """Run every call (no awaits: atomic on the loop), then fail if any call failed.

        Like a Redis pipeline, a failing call does not stop the ones after it, so both
        backends leave the same effects behind when a batch reports a script error.
        """
        if self._closed:
            raise StoreError("unavailable", "the store is closed")
        results: list[ScriptResult] = []
        first_error: StoreError | None = None
        for call in calls:
            try:
                results.append(self._call(call))
            except Exception as exc:
                first_error = first_error or StoreError(
                    "script", f"{call.script.name}: {type(exc).__name__}: {exc}"
                )
        self._maybe_sweep(len(calls))
        if first_error is not None:
            raise first_error
        return results

    def _call(self, call: ScriptCall) -> ScriptResult:
        keys = [self._prefix + key for key in call.keys]
        return to_reply(call.script.memory(self.keyspace, keys, call.args))

    def _maybe_sweep(self, calls: int) -> None:
        self._until_sweep -= calls
        if self._until_sweep <= 0:
            self._until_sweep = self.SWEEP_EVERY
            self.keyspace.sweep()

    async def ping(self) -> float:
        started = time.perf_counter()
        if self._closed:
            error = StoreError("unavailable", "the store is closed")
            report(self._observe, "ping", started, error)
            raise error
        report(self._observe, "ping", started, None)
        # Nothing to reach, but keep the contract of a positive round-trip time: callers
        # may treat 0 as "not measured".
        return max(time.perf_counter() - started, 1e-9)

    async def close(self) -> None:
        self._closed = True


def to_reply(value: object) -> ScriptResult:
    """Convert a twin's return value the way Redis converts a Lua value into a reply.

    So a twin can return natural Python and the caller still sees what Redis would send:
    int -> int, float -> int (truncated, as Lua numbers are), True -> 1, False/None ->
    None (Lua false is a nil reply), str/bytes -> bytes, list/tuple -> list.
    """
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [to_reply(item) for item in value]
    raise TypeError(f"a script cannot return {type(value).__name__} (Redis has no such reply)")


def _take(mapping: dict[str, int], count: int) -> Iterator[tuple[str, int]]:
    """The first `count` items of a dict, without copying the rest."""
    for index, item in enumerate(mapping.items()):
        if index >= count:
            return
        yield item


def _parse_int(value: bytes, message: str) -> int:
    if not _REDIS_INT.match(value):
        raise KeyspaceError(message)
    number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise KeyspaceError(message)
    return number


def _add(current: int, amount: int) -> int:
    total = current + amount
    if not _INT64_MIN <= total <= _INT64_MAX:
        raise KeyspaceError(_OVERFLOW)
    return total
