"""The quota scripts (sidecar/store/lua/quota_*.lua), their memory twins, and the typed
arguments and replies the policy and the admin API use.

ADMIT checks every limit of a request and charges them all or none (docs/quotas.md has
the arithmetic); REFUND gives charges back; OVERRIDE reads and writes an organisation's
overrides hash. The twins mirror the Lua line for line, on the memory store's clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.store import MemoryKeyspace, Script, ScriptArg, ScriptCall

_UNSIGNED = re.compile(rb"\d+\Z")
_SIGNED = re.compile(rb"-?\d+\Z")
_BUCKET = re.compile(rb"(\d+):(\d+)\Z")
_MICRO = 1_000_000
_PER_LIMIT = 7
_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class LimitArgs:
    """One limit of one request, as the admission script reads it."""

    kind: str  # "rate" | "quota"
    key: str  # the counter (unprefixed)
    limit: int
    override_field: str  # "" for none
    window: int  # rate: µs; quota: the period's end, Unix ms
    burst: int  # rate: capacity, or 0 for the limit; quota: 0
    cost: int
    shadow: bool


@dataclass(frozen=True, slots=True)
class LimitResult:
    ok: bool
    limit: int  # effective (after overrides)
    remaining: int
    reset_ms: int
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    now_ms: int
    limits: tuple[LimitResult, ...]


def admit_call(
    overrides_key: str, limits: Sequence[LimitArgs], *, peek: bool = False
) -> ScriptCall:
    args: list[ScriptArg] = ["peek" if peek else "charge", len(limits)]
    for item in limits:
        args += (
            item.kind,
            item.limit,
            item.override_field,
            item.window,
            item.burst,
            item.cost,
            "s" if item.shadow else "e",
        )
    keys = (overrides_key, *(item.key for item in limits))
    return ScriptCall(ADMIT, keys, tuple(args))


def decode_admission(reply: object, count: int) -> Admission:
    """The admission script's reply; ValueError if it is not one."""
    if not isinstance(reply, list) or len(reply) != 2 + 5 * count:
        raise ValueError(f"not an admission reply for {count} limits: {reply!r:.200}")
    if not all(isinstance(value, int) for value in reply):
        raise ValueError(f"an admission reply holds a non-integer: {reply!r:.200}")
    limits = tuple(
        LimitResult(bool(reply[i]), reply[i + 1], reply[i + 2], reply[i + 3], reply[i + 4])
        for i in range(2, len(reply), 5)
    )
    return Admission(bool(reply[0]), reply[1], limits)


def refund_call(refunds: Sequence[tuple[str, str, int]]) -> ScriptCall:
    """(kind, counter key, cost charged) per counter."""
    args: list[ScriptArg] = [len(refunds)]
    for kind, _, amount in refunds:
        args += (kind, amount)
    return ScriptCall(REFUND, tuple(key for _, key, _ in refunds), tuple(args))


def override_set_call(overrides_key: str, limit_name: str, value: int) -> ScriptCall:
    return ScriptCall(OVERRIDE, (overrides_key,), ("set", limit_name, value))


def override_delete_call(overrides_key: str, limit_name: str) -> ScriptCall:
    return ScriptCall(OVERRIDE, (overrides_key,), ("delete", limit_name))


def override_get_call(overrides_key: str) -> ScriptCall:
    return ScriptCall(OVERRIDE, (overrides_key,), ("get",))


def decode_overrides(reply: object) -> dict[str, int]:
    """name -> limit; values that are not plain non-negative integers are skipped."""
    if not isinstance(reply, list):
        return {}
    overrides = {}
    for name, value in zip(reply[::2], reply[1::2], strict=False):
        if isinstance(name, bytes) and isinstance(value, bytes) and _UNSIGNED.match(value):
            overrides[name.decode("utf-8", "surrogateescape")] = int(value)
    return overrides


# -- the memory twins ------------------------------------------------------------------


def _text(value: ScriptArg) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: ScriptArg) -> int:
    return int(_text(value))


def _stored(keyspace: MemoryKeyspace, key: str) -> int | None:
    value = keyspace.get(key)
    if value is None:
        return None
    if not _SIGNED.match(value):
        raise ValueError(f"ERR quota counter {key} is not an integer")
    return int(value)


def _bucket(keyspace: MemoryKeyspace, key: str) -> tuple[int, int] | None:
    """A rate counter's (level in µunits, as of Unix µs), as ADMIT stores it."""
    value = keyspace.get(key)
    if value is None:
        return None
    match = _BUCKET.match(value)
    if match is None:
        raise ValueError(f"ERR quota counter {key} is not a bucket level")
    return int(match[1]), int(match[2])


def _admit(keyspace: MemoryKeyspace, keys: Sequence[str], argv: Sequence[ScriptArg]) -> object:
    now_us = keyspace.unix_us()
    now_ms = now_us // 1000
    charge = _text(argv[0]) == "charge"
    allowed = True
    reply: list[int] = []
    writes: list[tuple[str, int | str, int]] = []
    for i in range(_number(argv[1])):
        base = 2 + i * _PER_LIMIT
        kind, limit, field = _text(argv[base]), _number(argv[base + 1]), _text(argv[base + 2])
        window, burst = _number(argv[base + 3]), _number(argv[base + 4])
        cost, enforced = _number(argv[base + 5]), _text(argv[base + 6]) == "e"
        key = keys[i + 1]
        if field:
            override = keyspace.hget(keys[0], field)
            if override is not None and _UNSIGNED.match(override):
                limit = int(override)
        write: tuple[int | str, int] | None
        if kind == "rate":
            bucket = _bucket(keyspace, key)
            ok, result, write = _rate(limit, window, burst, cost, bucket, now_us)
        else:
            ok, result, write = _quota(limit, window, cost, _stored(keyspace, key), now_ms)
        if not ok and enforced:
            allowed = False
        if ok and write is not None:
            writes.append((key, *write))
        reply += (1 if ok else 0, limit, *result)
    if charge and allowed:
        for key, value, px in writes:
            if isinstance(value, str):
                keyspace.set(key, value.encode(), px=px)
            else:
                keyspace.incrby(key, value)
                keyspace.pexpire(key, max(1, px))
    return [1 if allowed else 0, now_ms, *reply]


def _rate(
    limit: int, window: int, burst: int, cost: int, bucket: tuple[int, int] | None, now_us: int
) -> tuple[bool, tuple[int, int, int], tuple[str, int] | None]:
    capacity = burst or limit
    if limit <= 0:
        wait = math.ceil(window / 1000)
        return cost == 0, (0, wait, 0 if cost == 0 else wait), None
    level, at = bucket if bucket is not None else (0, now_us)
    drain = limit * _MICRO / window  # µunits per µs
    now_level = max(0.0, level - max(0, now_us - at) * drain)
    new_level = now_level + cost * _MICRO
    if cost == 0 or new_level <= capacity * _MICRO + 1:
        remaining = math.floor((capacity * _MICRO - new_level) / _MICRO)
        reset = math.ceil(new_level / drain / 1000)
        write = (f"{math.ceil(new_level)}:{now_us}", reset + 1000) if cost > 0 else None
        return True, (max(0, min(capacity, remaining)), reset, 0), write
    remaining = math.floor((capacity * _MICRO - now_level) / _MICRO)
    reset = math.ceil(now_level / drain / 1000)
    retry = max(1, math.ceil((new_level - capacity * _MICRO) / drain / 1000))
    return False, (max(0, min(capacity, remaining)), reset, retry), None


def _quota(
    limit: int, end_ms: int, cost: int, stored: int | None, now_ms: int
) -> tuple[bool, tuple[int, int, int], tuple[int, int] | None]:
    used = stored or 0
    reset = max(0, end_ms - now_ms)
    if used + cost <= limit:
        write = (cost, end_ms - now_ms + _DAY_MS) if cost > 0 else None
        return True, (max(0, limit - used - cost), reset, 0), write
    return False, (max(0, limit - used), reset, max(1, reset)), None


def _refund(keyspace: MemoryKeyspace, keys: Sequence[str], argv: Sequence[ScriptArg]) -> object:
    changed = 0
    for i in range(_number(argv[0])):
        key, kind, amount = keys[i], _text(argv[1 + 2 * i]), _number(argv[2 + 2 * i])
        if kind == "rate":
            bucket = _bucket(keyspace, key)
            if bucket is None:
                continue
            changed += 1
            level, ttl = bucket[0] - amount * _MICRO, keyspace.pttl(key)
            if level <= 0 or ttl <= 0:
                keyspace.delete(key)
            else:
                keyspace.set(key, f"{level}:{bucket[1]}".encode(), px=ttl)
        elif _stored(keyspace, key) is not None:
            changed += 1
            left = keyspace.incrby(key, -amount)
            if left < 0:
                keyspace.incrby(key, -left)
    return changed


def _override(keyspace: MemoryKeyspace, keys: Sequence[str], argv: Sequence[ScriptArg]) -> object:
    operation = _text(argv[0])
    if operation == "set":
        keyspace.hset(keys[0], {_text(argv[1]): _text(argv[2]).encode()})
        return 1
    if operation == "delete":
        return keyspace.hdel(keys[0], _text(argv[1]))
    stored = keyspace.hgetall(keys[0])
    reply: list[object] = []
    for name in sorted(stored):
        reply += (name, stored[name])
    return reply


ADMIT = Script.from_package("quota_admit", _admit)
REFUND = Script.from_package("quota_refund", _refund)
OVERRIDE = Script.from_package("quota_override", _override)
