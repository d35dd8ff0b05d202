"""How replicas share a breaker: the sync script (sidecar/store/lua/breaker_sync.lua), its
memory twin, and the loop that runs it off the request path.

Every `flush_interval`, and at once when something urgent happened here (this replica
opened it, a probe finished, a request wanted a probe permit), each replica sends every
breaker it used its counts since the last sync, in one store round trip for all of them,
and adopts the state the script answers. So the combined numbers open a breaker on every
replica within about two flush intervals, and no request ever waits on the store.

With the store down (or `shared: false`), the same script runs on an in-process memory
store: the breaker keeps working on this replica's numbers alone, and says so in
`sidecar_circuit_degraded`; the store is tried again with back-off, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence

from sidecar.config import BreakerConfig
from sidecar.policies.breaker.machine import (
    Breaker,
    Pending,
    Shared,
    State,
    Transition,
    jitter_factor,
    unix_now,
)
from sidecar.store import MemoryKeyspace, Script, ScriptArg, ScriptCall, StateStore, StoreError

REASONS = (
    "",
    "consecutive_failures",
    "failure_rate",
    "slow_call_rate",
    "probes_failed",
    "probes_passed",
    "forced_open",
    "forced_closed",
    "reset",
    "open_elapsed",
)
_REASON_CODES = {reason: code for code, reason in enumerate(REASONS)}
_FORCED = ("", "open", "closed")
FORCE_ACTIONS = ("open", "closed", "reset")
_BUCKETS = 10
_STATE_TTL_MS = 86_400_000
_BUCKET = re.compile(r"(\d+) (\d+) (\d+) (\d+)\Z")
_REPLY_LENGTH = 13


def state_keys(name: str) -> tuple[str, str]:
    """The breaker's state and window hashes; one hash tag, so Redis Cluster runs it."""
    tag = "{cb:" + name + "}"
    return f"cb:{tag}", f"cb:{tag}:w"


def sync_call(breaker: Breaker, report: Pending) -> ScriptCall:
    config = breaker.config
    slow = config.slow_call
    args: tuple[ScriptArg, ...] = (
        "sync",
        max(1, int(config.window * 1000 / _BUCKETS)),
        config.min_requests,
        repr(config.failure_rate),
        repr(slow.rate) if slow is not None else "-1",
        int(config.open_for * 1000),
        int(config.max_open_for * 1000),
        repr(jitter_factor(config.jitter)),
        config.half_open.probes,
        int(config.half_open.ramp * 1000),
        int(probe_timeout(config) * 1000),
        report.total,
        report.failures,
        report.slow,
        _REASON_CODES[report.trip],
        report.wanted,
        report.returned,
        report.probe_ok,
        report.probe_failed,
    )
    return ScriptCall(SYNC, state_keys(breaker.name), args)


def seed_call(breaker: Breaker) -> ScriptCall:
    """The state this replica last saw, for the in-process store it falls back to."""
    shared = breaker.shared
    now = unix_now()

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    args: tuple[ScriptArg, ...] = (
        "seed",
        int(shared.state),
        max(0, ms(shared.until - now)),
        shared.trips,
        _FORCED.index(shared.forced),
        _REASON_CODES[shared.reason],
        max(0, ms(now - shared.ramp_start)) if shared.ramp_start else ms(now),
        ms(shared.ramp_end - now) if shared.ramp_end else -ms(now),
    )
    return ScriptCall(SYNC, state_keys(breaker.name), args)


def force_call(name: str, action: str) -> ScriptCall:
    return ScriptCall(SYNC, state_keys(name), ("force", action))


def probe_timeout(config: BreakerConfig) -> float:
    # A probe that has not reported by then is presumed lost with its replica.
    return config.open_for + 30.0


def decode_reply(reply: object) -> tuple[Shared, int]:
    """The shared state (times turned to this replica's clock) and the permits granted."""
    if (
        not isinstance(reply, list)
        or len(reply) != _REPLY_LENGTH
        or not all(isinstance(value, int) for value in reply)
    ):
        raise ValueError(f"not a breaker sync reply: {reply!r:.200}")
    st, version, until, trips, granted, rs, re_, total, failures, slow, now, forced, why = reply
    if st not in (0, 1, 2) or forced not in (0, 1, 2) or not 0 <= why < len(REASONS):
        raise ValueError(f"not a breaker sync reply: {reply!r:.200}")
    # The store's clock may differ from this replica's: keep the distances, not the dates.
    offset = unix_now() - now / 1000

    def local(ms: int) -> float:
        return ms / 1000 + offset if ms else 0.0

    shared = Shared(
        state=State(st),
        version=version,
        until=local(until),
        trips=trips,
        ramp_start=local(rs),
        ramp_end=local(re_),
        forced=_FORCED[forced],
        reason=REASONS[why],
        total=total,
        failures=failures,
        slow=slow,
    )
    return shared, granted


# -- the memory twin ------------------------------------------------------------------------


def _text(value: ScriptArg | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: ScriptArg | bytes | None) -> float:
    text = _text(value)
    return float(text) if text else 0.0


_STATE_FIELDS = (
    "st", "v", "until", "trips", "permits", "ok", "fail", "hs", "rs", "re", "forced", "why",
)  # fmt: skip


def _sync(keyspace: MemoryKeyspace, keys: Sequence[str], argv: Sequence[ScriptArg]) -> object:
    state_key, window_key = keys
    now = keyspace.now_ms()
    stored = keyspace.hgetall(state_key)
    s = {name: int(_num(stored.get(name))) for name in _STATE_FIELDS}

    def save(granted: int, total: int, failures: int, slow: int) -> list[int]:
        keyspace.hset(state_key, {name: str(value).encode() for name, value in s.items()})
        keyspace.pexpire(state_key, _STATE_TTL_MS)
        return [
            s["st"], s["v"], s["until"], s["trips"], granted, s["rs"], s["re"],
            total, failures, slow, now, s["forced"], s["why"],
        ]  # fmt: skip

    if _text(argv[0]) == "force":
        action = _text(argv[1])
        s["v"] += 1
        s["permits"] = s["ok"] = s["fail"] = 0
        if action == "open":
            s.update(st=2, forced=1, why=6, until=now)
        elif action == "closed":
            s.update(st=0, forced=2, why=7, rs=0, re=0)
            keyspace.delete(window_key)
        else:
            s.update(st=0, forced=0, why=8, trips=0, rs=0, re=0)
            keyspace.delete(window_key)
        return save(0, 0, 0, 0)

    if _text(argv[0]) == "seed":
        st, until, trips, forced, why, since, until_ramp = (int(_num(v)) for v in argv[1:8])
        s.update(st=st, until=now + until, trips=trips, forced=forced, why=why)
        s.update(rs=now - since, re=now + until_ramp, permits=0, ok=0, fail=0, hs=now)
        s["v"] += 1
        if s["st"] == 1:
            s.update(st=2, until=now)  # half-open again at the next sync, with fresh permits
        return save(0, 0, 0, 0)

    width = int(_num(argv[1]))
    min_requests = int(_num(argv[2]))
    failure_rate = _num(argv[3])
    slow_rate = _num(argv[4])
    open_for, max_open_for = _num(argv[5]), _num(argv[6])
    jitter = _num(argv[7])
    probes, ramp, probe_wait = int(_num(argv[8])), int(_num(argv[9])), int(_num(argv[10]))
    add_total, add_failures, add_slow = (int(_num(value)) for value in argv[11:14])
    trip = int(_num(argv[14]))
    wanted, returned = int(_num(argv[15])), int(_num(argv[16]))
    passed, failed = int(_num(argv[17])), int(_num(argv[18]))

    number = now // width
    slot = f"b{number % _BUCKETS}"
    if add_total > 0:
        held = _BUCKET.match(_text(keyspace.hget(window_key, slot)))
        counts = [0, 0, 0]
        if held is not None and int(held.group(1)) == number:
            counts = [int(held.group(i)) for i in (2, 3, 4)]
        counts = [counts[0] + add_total, counts[1] + add_failures, counts[2] + add_slow]
        keyspace.hset(window_key, {slot: f"{number} {counts[0]} {counts[1]} {counts[2]}".encode()})
        keyspace.pexpire(window_key, width * _BUCKETS * 2)
    sums = [0, 0, 0]
    for value in keyspace.hgetall(window_key).values():
        held = _BUCKET.match(_text(value))
        if held is not None and int(held.group(1)) > number - _BUCKETS:
            for i in range(3):
                sums[i] += int(held.group(i + 2))
    total, failures, slow = sums

    def open_it(reason: int) -> None:
        if s["st"] == 0 and now >= s["re"] + width * _BUCKETS:
            s["trips"] = 0
        s["trips"] += 1
        base = min(open_for * 2 ** (s["trips"] - 1), max_open_for)
        s.update(st=2, until=now + int(base * jitter), why=reason, v=s["v"] + 1)
        s["permits"] = s["ok"] = s["fail"] = 0
        keyspace.delete(window_key)

    if s["forced"] == 0:
        if s["st"] == 0:
            reason = trip
            if reason == 0 and total >= min_requests:
                if failures >= failure_rate * total:
                    reason = 2
                elif slow_rate >= 0 and slow >= slow_rate * total:
                    reason = 3
            if reason != 0:
                open_it(reason)
                total = failures = slow = 0
        elif s["st"] == 2 and now >= s["until"]:
            s.update(st=1, v=s["v"] + 1, why=9, hs=now, permits=probes, ok=0, fail=0)
        elif s["st"] == 1:
            s["permits"] += returned
            s["ok"] += passed
            s["fail"] += failed
            if s["fail"] > 0 and s["fail"] >= failure_rate * probes:
                open_it(4)
                total = failures = slow = 0
            elif s["ok"] + s["fail"] >= probes:
                s.update(st=0, v=s["v"] + 1, why=5, rs=now, re=now + ramp, permits=0, ok=0, fail=0)
                keyspace.delete(window_key)
                total = failures = slow = 0
            elif s["permits"] == 0 and now - s["hs"] > probe_wait:
                s.update(permits=probes - s["ok"] - s["fail"], hs=now)

    granted = 0
    if s["st"] == 1 and wanted > 0:
        granted = min(wanted, s["permits"])
        s["permits"] -= granted
    return save(granted, total, failures, slow)


SYNC = Script.from_package("breaker_sync", _sync)


def _idle(breaker: Breaker, now: float) -> bool:
    return (
        breaker.config.scope == "route_org"
        and breaker.state is State.CLOSED
        and not breaker.shared.forced
        and breaker.pending.empty()
        and breaker.permits == 0
        and breaker.in_flight_probes == 0
        and now - breaker.last_used >= 2 * breaker.config.window
        and now >= breaker.shared.ramp_end
    )


# -- the loop -------------------------------------------------------------------------------

OnTransition = Callable[[Breaker, Transition], None]
OnDegraded = Callable[[bool], None]
_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0


class Syncer:
    """Syncs a route's breakers with the store, off the request path (one task per route,
    kept across reloads with the breakers)."""

    def __init__(
        self,
        interval: float,
        store: StateStore,
        local: StateStore,
        on_transition: OnTransition,
        on_degraded: OnDegraded,
        shared: bool,
        on_error: Callable[[Exception], None] = lambda error: None,
    ) -> None:
        self.interval = interval
        self._store = store
        self._local = local
        self.on_transition = on_transition
        self._on_degraded = on_degraded
        self._shared = shared
        self._on_error = on_error
        self.breakers: dict[str, Breaker] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.degraded = False
        self._retry_at = 0.0
        self._retry_wait = _RETRY_FIRST

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync_once()
            except Exception as error:  # a bug must not end the loop every breaker needs
                self._on_error(error)

    def _due(self, now: float) -> list[Breaker]:
        """Breakers to sync: every one but the idle per-organisation ones, which are
        dropped (their names come from a request header: keeping every one would grow
        without bound, and an idle closed one has nothing to tell or learn)."""
        due = []
        for name, breaker in list(self.breakers.items()):
            if _idle(breaker, now):
                del self.breakers[name]
            else:
                due.append(breaker)
        return due

    async def sync_once(self) -> None:
        now = unix_now()
        breakers = self._due(now)
        if not breakers:
            return
        reports = [breaker.take_report(now) for breaker in breakers]
        calls = [
            sync_call(breaker, report) for breaker, report in zip(breakers, reports, strict=True)
        ]
        replies = await self._execute(calls, breakers)
        if replies is None:
            for breaker, report in zip(breakers, reports, strict=True):
                breaker.restore(report)
            return
        for breaker, reply in zip(breakers, replies, strict=True):
            try:
                shared, granted = decode_reply(reply)
            except ValueError:
                continue
            transition = breaker.adopt(shared, granted)
            if transition is not None:
                self.on_transition(breaker, transition)

    async def _execute(
        self, calls: list[ScriptCall], breakers: Sequence[Breaker]
    ) -> list[object] | None:
        """Replies from the store, or from the local one while the store is down (which
        starts from the state this replica last saw, not from its own stale copy)."""
        loop = asyncio.get_running_loop()
        if self._shared and (not self.degraded or loop.time() >= self._retry_at):
            try:
                replies = await self._store.execute(calls)
            except StoreError:
                if not self.degraded:
                    with contextlib.suppress(StoreError):
                        await self._local.execute([seed_call(b) for b in breakers])
                self._set_degraded(True)
                self._retry_at = loop.time() + self._retry_wait
                self._retry_wait = min(self._retry_wait * 2, _RETRY_MAX)
            else:
                self._set_degraded(False)
                self._retry_wait = _RETRY_FIRST
                return list(replies)
        try:
            return list(await self._local.execute(calls))
        except StoreError:
            return None

    def _set_degraded(self, degraded: bool) -> None:
        if degraded != self.degraded:
            self.degraded = degraded
            self._on_degraded(degraded)

    async def force(self, name: str, action: str) -> Transition | None:
        """An operator's open / closed / reset: written to the shared state (every replica
        adopts it at its next sync) and adopted here at once."""
        breaker = self.breakers.get(name)
        call = force_call(name, action)
        replies = None
        if self._shared:
            replies = list(await self._store.execute([call]))  # StoreError: the caller's
        local = list(await self._local.execute([call]))
        reply = replies[0] if replies is not None else local[0]
        if breaker is None:
            return None
        shared, _ = decode_reply(reply)
        breaker.pending = Pending()
        transition = breaker.adopt(shared, 0)
        if transition is not None:
            self.on_transition(breaker, transition)
        return transition
