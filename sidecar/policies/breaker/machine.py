"""One circuit breaker as a replica sees it: its own rolling window, and a mirror of the
shared state that every request reads without waiting on the store.

States (docs/breakers.md has the diagram):
- CLOSED: requests pass; outcomes fill the window. It opens when, over at least
  `min_requests` calls in the window, the failure rate or the slow-call rate reaches its
  threshold, or after `consecutive_failures` in a row. During a ramp (just after a
  recovery) only a growing share of requests passes; the others get the fallback.
- OPEN: every request gets the fallback until `until`; then HALF_OPEN.
- HALF_OPEN: only requests holding a probe permit pass (permits are granted by the shared
  state, `probes` across all replicas); the others get the fallback.

The replica decides the fast transition itself (its own numbers open it at once) and tells
the shared state at its next sync (sync.py), which decides everything else: combined
numbers, the end of OPEN, the verdict on the probes, forced states. What the sync
answers is adopted as the new mirror.
"""

from __future__ import annotations

import enum
import math
import random
import time
from dataclasses import dataclass, field

from sidecar.config import BreakerConfig


class State(enum.IntEnum):
    """The values are those of the `sidecar_circuit_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Verdict(enum.Enum):
    """What admission decided for one request."""

    PASS = "pass"
    PROBE = "probe"  # passes holding a half-open permit
    REJECT = "reject"


class CallResult(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # neither: a client's hang-up, the sidecar's own answer


_BUCKETS = 10


class RollingWindow:
    """Calls, failures and slow calls over the last `window` seconds, in ten buckets, with
    running sums so a check costs no loop."""

    __slots__ = ("_counts", "_slots", "_width", "failures", "slow", "total")

    def __init__(self, window: float) -> None:
        self._width = window / _BUCKETS
        self._slots = [-1] * _BUCKETS  # the bucket number each slot holds
        self._counts = [[0, 0, 0] for _ in range(_BUCKETS)]
        self.total = 0
        self.failures = 0
        self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        number = int(now / self._width)
        index = number % _BUCKETS
        if self._slots[index] != number:
            self._advance(number)
        counts = self._counts[index]
        counts[0] += 1
        self.total += 1
        if failed:
            counts[1] += 1
            self.failures += 1
        if slow:
            counts[2] += 1
            self.slow += 1

    def refresh(self, now: float) -> None:
        """Drop the buckets that have left the window (before reading the sums)."""
        number = int(now / self._width)
        if self._slots[number % _BUCKETS] != number:
            self._advance(number)

    def _advance(self, number: int) -> None:
        # Runs once per bucket width at most: the slot of `number` and every slot older
        # than the window are emptied.
        for index, held in enumerate(self._slots):
            if held != -1 and held <= number - _BUCKETS:
                self._drop(index)
        self._slots[number % _BUCKETS] = number

    def _drop(self, index: int) -> None:
        counts = self._counts[index]
        self.total -= counts[0]
        self.failures -= counts[1]
        self.slow -= counts[2]
        counts[0] = counts[1] = counts[2] = 0
        self._slots[index] = -1

    def clear(self) -> None:
        for index in range(_BUCKETS):
            self._drop(index)


@dataclass(slots=True)
class Pending:
    """What this replica has to tell the shared state at its next sync."""

    total: int = 0
    failures: int = 0
    slow: int = 0
    trip: str = ""  # the reason, when this replica's own numbers opened it
    wanted: int = 0  # requests refused for want of a probe permit
    probe_ok: int = 0
    probe_failed: int = 0
    returned: int = 0  # permits given back unused

    def empty(self) -> bool:
        return not (self.total or self.trip or self.wanted or self.probe_ok or self.probe_failed)


@dataclass(slots=True)
class Shared:
    """The shared state as the last sync answered it (times on this replica's clock)."""

    state: State = State.CLOSED
    version: int = 0
    until: float = 0.0  # OPEN ends (Unix seconds)
    trips: int = 0
    ramp_start: float = 0.0
    ramp_end: float = 0.0
    forced: str = ""  # "open", "closed" or ""
    reason: str = ""
    total: int = 0  # the combined window, across replicas
    failures: int = 0
    slow: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state, with the numbers that caused it (for logs, spans and metrics)."""

    name: str  # the breaker's name: the route, or route/org
    before: State
    after: State
    reason: str
    total: int
    failures: int
    slow: int
    until: float  # for OPEN: when it ends (Unix seconds)


@dataclass(slots=True)
class Breaker:
    """One breaker's mirror, window and pending report. Not thread-safe: one event loop."""

    name: str
    config: BreakerConfig
    window: RollingWindow
    shared: Shared = field(default_factory=Shared)
    pending: Pending = field(default_factory=Pending)
    consecutive: int = 0
    permits: int = 0  # probe permits held, granted by the shared state
    permits_at: float = 0.0  # when the last were granted
    in_flight_probes: int = 0
    ramp_credit: float = 0.0
    last_used: float = 0.0
    # Set when something happened that other replicas should learn now, not at the next tick.
    urgent: bool = False

    @classmethod
    def create(cls, name: str, config: BreakerConfig) -> Breaker:
        return cls(name, config, RollingWindow(config.window))

    @property
    def state(self) -> State:
        return self.shared.state

    # -- the request path --------------------------------------------------------------

    def admit(self, now: float) -> Verdict:
        self.last_used = now
        shared = self.shared
        if shared.forced == "closed":
            return Verdict.PASS
        state = shared.state
        if state is State.CLOSED:
            if now < shared.ramp_end and not self._ramp_admits(now):
                return Verdict.REJECT
            return Verdict.PASS
        if (state is State.OPEN and now < shared.until) or shared.forced == "open":
            return Verdict.REJECT
        # HALF_OPEN, or OPEN past its time (the shared state turns it HALF_OPEN at the
        # next sync): only a permit holder passes.
        if self.permits > 0:
            self.permits -= 1
            self.in_flight_probes += 1
            return Verdict.PROBE
        if self.pending.wanted < self.config.half_open.probes:
            self.pending.wanted += 1
            self.urgent = True
        return Verdict.REJECT

    def _ramp_admits(self, now: float) -> bool:
        """The share `elapsed / ramp` of requests, spread evenly (a credit per request)."""
        shared = self.shared
        span = shared.ramp_end - shared.ramp_start
        share = (now - shared.ramp_start) / span if span > 0 else 1.0
        self.ramp_credit += share
        if self.ramp_credit >= 1.0:
            self.ramp_credit -= 1.0
            return True
        return False

    def retry_after(self, now: float) -> int:
        """Seconds until a request may pass again, at least 1 (for Retry-After)."""
        shared = self.shared
        if shared.forced == "open":
            return max(1, math.ceil(self.config.open_for))  # until an operator says
        if shared.state is State.OPEN:
            return max(1, math.ceil(shared.until - now))
        return max(1, math.ceil(self.config.flush_interval))

    def record(self, now: float, result: CallResult, slow: bool, probe: bool) -> Transition | None:
        """One call's outcome; returns the transition it caused, if any."""
        if probe:
            self.in_flight_probes -= 1
            if result is CallResult.SUCCESS:
                self.pending.probe_ok += 1
            elif result is CallResult.FAILURE:
                self.pending.probe_failed += 1
            else:
                self.pending.returned += 1
            self.urgent = True
            return None
        if result is CallResult.IGNORED or self.shared.forced == "closed":
            return None
        failed = result is CallResult.FAILURE
        self.window.add(now, failed, slow)
        pending = self.pending
        pending.total += 1
        pending.failures += failed
        pending.slow += slow
        if failed:
            self.consecutive += 1
        else:
            self.consecutive = 0
        if self.shared.state is not State.CLOSED:
            return None  # a call admitted before the breaker opened, answered after
        reason = self._trip_reason()
        if reason is None:
            return None
        return self._open_locally(now, reason)

    def _trip_reason(self) -> str | None:
        config = self.config
        if config.consecutive_failures and self.consecutive >= config.consecutive_failures:
            return "consecutive_failures"
        window = self.window
        if window.total < config.min_requests:
            return None
        if window.failures >= config.failure_rate * window.total:
            return "failure_rate"
        slow_call = config.slow_call
        if slow_call is not None and window.slow >= slow_call.rate * window.total:
            return "slow_call_rate"
        return None

    def _open_locally(self, now: float, reason: str) -> Transition:
        """Open now on this replica's numbers; the shared state learns it at once."""
        shared = self.shared
        window = self.window
        trips = 1 if now >= stable_after(self) else shared.trips + 1
        transition = Transition(
            self.name,
            shared.state,
            State.OPEN,
            reason,
            window.total,
            window.failures,
            window.slow,
            now + open_seconds(self.config, trips),
        )
        shared.state = State.OPEN
        shared.trips = trips
        shared.until = transition.until
        shared.reason = reason
        self.pending.trip = reason
        self.urgent = True
        self._forget_calls()
        return transition

    def _forget_calls(self) -> None:
        self.window.clear()
        self.consecutive = 0
        self.ramp_credit = 0.0

    # -- the sync ------------------------------------------------------------------------

    def take_report(self, now: float) -> Pending:
        """The report for a sync; permits unused for a while go back with it, for a
        replica that has traffic to probe with."""
        report = self.pending
        if self.permits and now - self.permits_at > permit_hold(self.config):
            report.returned += self.permits
            self.permits = 0
        self.pending = Pending()
        self.urgent = False
        return report

    def restore(self, report: Pending) -> None:
        """A sync failed: its report is told again with the next one."""
        pending = self.pending
        pending.total += report.total
        pending.failures += report.failures
        pending.slow += report.slow
        pending.trip = pending.trip or report.trip
        pending.wanted = max(pending.wanted, report.wanted)
        pending.probe_ok += report.probe_ok
        pending.probe_failed += report.probe_failed
        pending.returned += report.returned

    def adopt(self, shared: Shared, granted: int) -> Transition | None:
        """The shared state a sync answered; returns the transition this replica sees."""
        before = self.shared
        if self.pending.trip and shared.state is State.CLOSED:
            # Opened here after the sync was sent: keep it open until the next one says.
            return None
        self.shared = shared
        if shared.state is not State.HALF_OPEN:
            self.permits = 0  # the shared state has moved on: they are void
        if granted:
            self.permits += granted
            self.permits_at = unix_now()
        if shared.state is before.state:
            return None
        # Every change starts the window afresh, as the shared one does: calls answered
        # before a recovery must not reopen it after.
        self._forget_calls()
        return Transition(
            self.name,
            before.state,
            shared.state,
            shared.reason,
            shared.total,
            shared.failures,
            shared.slow,
            shared.until,
        )


def open_seconds(config: BreakerConfig, trips: int) -> float:
    """How long the `trips`-th trip in a row keeps it open: doubling, capped, jittered."""
    doubled: float = config.open_for * 2.0 ** max(trips - 1, 0)
    return min(doubled, config.max_open_for) * jitter_factor(config.jitter)


def jitter_factor(jitter: float) -> float:
    # Replicas must not reopen in lockstep: each open time is scaled by its own draw.
    return 1.0 + random.uniform(-jitter, jitter) if jitter else 1.0


def permit_hold(config: BreakerConfig) -> float:
    """How long a replica keeps probe permits it has not used."""
    return max(1.0, 4 * config.flush_interval)


def stable_after(breaker: Breaker) -> float:
    """Trips stop counting as repeated once a ramp has ended a window ago."""
    return breaker.shared.ramp_end + breaker.config.window


def unix_now() -> float:
    return time.time()
