"""The breaker as one replica sees it (sidecar/policies/breaker/machine.py): the rolling
window, local trips, open times, half-open admission, the report and the adoption of the
shared state. Pure unit tests: every `now` is explicit."""

from __future__ import annotations

import itertools
import random

import pytest

from sidecar.config import BreakerConfig
from sidecar.config.model import HalfOpenConfig, SlowCallConfig
from sidecar.policies.breaker.machine import (
    Breaker,
    CallResult,
    RollingWindow,
    Shared,
    State,
    Verdict,
    open_seconds,
    permit_hold,
    unix_now,
)

T0 = 1_000_000.0  # an arbitrary Unix time, a whole number of buckets


def config(**overrides: object) -> BreakerConfig:
    base: dict[str, object] = {
        "window": 10.0,
        "min_requests": 10,
        "failure_rate": 0.5,
        "slow_call": SlowCallConfig(threshold=1.0, rate=0.8),
        "consecutive_failures": 0,
        "open_for": 5.0,
        "max_open_for": 120.0,
        "jitter": 0.0,
        "half_open": HalfOpenConfig(probes=3, ramp=10.0),
        "flush_interval": 0.25,
    }
    base.update(overrides)
    return BreakerConfig(**base)  # type: ignore[arg-type]


def breaker(**overrides: object) -> Breaker:
    return Breaker.create("r", config(**overrides))


def feed(b: Breaker, now: float, result: CallResult, n: int, slow: bool = False) -> list[object]:
    return [b.record(now, result, slow, probe=False) for _ in range(n)]


def half_open(b: Breaker, version: int = 3) -> None:
    b.adopt(Shared(state=State.HALF_OPEN, version=version, trips=1), 0)


# --- RollingWindow ---------------------------------------------------------------------


def test_window_counts_add_up() -> None:
    w = RollingWindow(10.0)
    w.add(T0, failed=False, slow=False)
    w.add(T0 + 0.5, failed=True, slow=False)
    w.add(T0 + 3.2, failed=True, slow=True)
    w.add(T0 + 9.9, failed=False, slow=True)
    assert (w.total, w.failures, w.slow) == (4, 2, 2)


def test_window_buckets_drop_out_exactly_when_they_leave_the_window() -> None:
    w = RollingWindow(10.0)  # ten buckets of 1 s
    w.add(T0 + 0.0, failed=True, slow=False)  # bucket T0 .. T0+1
    w.add(T0 + 0.9, failed=False, slow=True)  # same bucket
    w.add(T0 + 1.5, failed=True, slow=True)  # bucket T0+1 .. T0+2
    w.add(T0 + 5.0, failed=False, slow=False)  # bucket T0+5 .. T0+6
    w.refresh(T0 + 9.999)
    assert (w.total, w.failures, w.slow) == (4, 2, 2)
    w.refresh(T0 + 10.0)  # the first bucket leaves now, not before and not later
    assert (w.total, w.failures, w.slow) == (2, 1, 1)
    w.refresh(T0 + 10.999)
    assert (w.total, w.failures, w.slow) == (2, 1, 1)
    w.add(T0 + 11.0, failed=False, slow=False)  # the second leaves as this one enters
    assert (w.total, w.failures, w.slow) == (2, 0, 0)
    w.refresh(T0 + 15.0)
    assert (w.total, w.failures, w.slow) == (1, 0, 0)
    w.refresh(T0 + 21.0)
    assert (w.total, w.failures, w.slow) == (0, 0, 0)


def test_window_a_long_idle_gap_empties_it_and_reuses_the_slots() -> None:
    w = RollingWindow(10.0)
    for i in range(10):
        w.add(T0 + i, failed=True, slow=False)
    assert w.total == 10
    w.add(T0 + 100.0, failed=False, slow=False)  # slot of T0 again, ten windows later
    assert (w.total, w.failures) == (1, 0)


def test_window_clear() -> None:
    w = RollingWindow(10.0)
    for i in range(5):
        w.add(T0 + i, failed=True, slow=True)
    w.clear()
    assert (w.total, w.failures, w.slow) == (0, 0, 0)
    w.add(T0 + 5.0, failed=False, slow=False)
    w.refresh(T0 + 9.0)
    assert (w.total, w.failures, w.slow) == (1, 0, 0)


# --- trips on this replica's numbers ----------------------------------------------------


def test_failure_rate_trips_only_from_min_requests_on() -> None:
    b = breaker(min_requests=10, failure_rate=0.5)
    results = feed(b, T0, CallResult.FAILURE, 9)
    assert results == [None] * 9 and b.state is State.CLOSED  # 100 % failures, 9 calls
    transition = b.record(T0 + 0.1, CallResult.FAILURE, False, probe=False)
    assert transition is not None
    assert (transition.before, transition.after) == (State.CLOSED, State.OPEN)
    assert transition.reason == "failure_rate"
    assert (transition.total, transition.failures, transition.slow) == (10, 10, 0)
    assert transition.until == pytest.approx(T0 + 0.1 + 5.0)
    assert b.state is State.OPEN and b.shared.reason == "failure_rate"
    assert b.pending.trip == "failure_rate" and b.urgent


def test_failure_rate_at_the_threshold_trips_below_it_does_not() -> None:
    b = breaker(min_requests=10, failure_rate=0.5)
    feed(b, T0, CallResult.SUCCESS, 6)
    assert feed(b, T0, CallResult.FAILURE, 4) == [None] * 4  # 4 of 10 < 50 %
    feed(b, T0, CallResult.SUCCESS, 1)  # 4 of 11
    transition = b.record(T0, CallResult.FAILURE, False, probe=False)  # 5 of 12 < 50 %
    assert transition is None
    transition = b.record(T0, CallResult.FAILURE, False, probe=False)  # 6 of 13: not yet
    assert transition is None
    transition = b.record(T0, CallResult.FAILURE, False, probe=False)  # 7 of 14 = 50 %
    assert transition is not None and transition.reason == "failure_rate"
    assert (transition.total, transition.failures) == (14, 7)


def test_slow_call_rate_trips() -> None:
    b = breaker(min_requests=10, slow_call=SlowCallConfig(threshold=1.0, rate=0.8))
    feed(b, T0, CallResult.SUCCESS, 2)
    assert feed(b, T0, CallResult.SUCCESS, 7, slow=True) == [None] * 7  # 9 calls: too few
    transition = b.record(T0, CallResult.SUCCESS, True, probe=False)  # 8 of 10 slow
    assert transition is not None and transition.reason == "slow_call_rate"
    assert (transition.total, transition.failures, transition.slow) == (10, 0, 8)


def test_slow_calls_do_not_trip_without_slow_call_config() -> None:
    b = breaker(min_requests=10, slow_call=None)
    assert feed(b, T0, CallResult.SUCCESS, 50, slow=True) == [None] * 50
    assert b.state is State.CLOSED


def test_consecutive_failures_trip_and_a_success_resets_the_streak() -> None:
    b = breaker(min_requests=1000, consecutive_failures=5)
    assert feed(b, T0, CallResult.FAILURE, 4) == [None] * 4
    assert b.record(T0, CallResult.SUCCESS, False, probe=False) is None
    assert feed(b, T0, CallResult.FAILURE, 4) == [None] * 4  # streak restarted: 4
    assert b.state is State.CLOSED
    transition = b.record(T0, CallResult.FAILURE, False, probe=False)
    assert transition is not None and transition.reason == "consecutive_failures"
    assert (transition.total, transition.failures) == (10, 9)
    assert b.pending.trip == "consecutive_failures" and b.urgent


def test_ignored_results_neither_count_nor_break_the_streak() -> None:
    b = breaker(min_requests=1000, consecutive_failures=3)
    feed(b, T0, CallResult.FAILURE, 2)
    assert b.record(T0, CallResult.IGNORED, False, probe=False) is None
    assert b.window.total == 2 and b.pending.total == 2
    transition = b.record(T0, CallResult.FAILURE, False, probe=False)
    assert transition is not None and transition.reason == "consecutive_failures"


def test_a_flood_of_4xx_like_successes_never_trips() -> None:
    b = breaker(min_requests=5, consecutive_failures=3)
    for i in range(1000):
        assert b.record(T0 + i * 0.01, CallResult.SUCCESS, False, probe=False) is None
    assert b.state is State.CLOSED
    assert b.pending.trip == "" and not b.urgent
    assert (b.pending.total, b.pending.failures) == (1000, 0)


def test_after_a_local_trip_admit_rejects_until_until() -> None:
    b = breaker(min_requests=4, open_for=5.0)
    assert b.admit(T0) is Verdict.PASS
    feed(b, T0, CallResult.FAILURE, 4)
    assert b.state is State.OPEN
    until = b.shared.until
    assert until == pytest.approx(T0 + 5.0)
    assert b.admit(T0 + 0.01) is Verdict.REJECT
    assert b.admit(until - 0.001) is Verdict.REJECT
    assert b.pending.wanted == 0  # refused while open: no permit wanted yet
    # Past its time, still OPEN until the shared state says HALF_OPEN: only permit holders.
    assert b.admit(until) is Verdict.REJECT
    assert b.pending.wanted == 1
    # The window and the streak were forgotten with the trip; the report keeps the calls.
    assert b.window.total == 0 and b.consecutive == 0
    assert (b.pending.total, b.pending.failures) == (4, 4)


def test_calls_answered_after_the_trip_do_not_trip_again() -> None:
    b = breaker(min_requests=4)
    feed(b, T0, CallResult.FAILURE, 4)
    assert feed(b, T0 + 1, CallResult.FAILURE, 10) == [None] * 10
    assert b.shared.trips == 1


# --- open_seconds -------------------------------------------------------------------------


def test_open_seconds_doubles_per_trip_and_is_capped() -> None:
    c = config(open_for=5.0, max_open_for=60.0, jitter=0.0)
    assert [open_seconds(c, trips) for trips in range(0, 7)] == [
        5.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0,
    ]  # fmt: skip


def test_open_seconds_jitter_stays_within_its_bounds_and_varies() -> None:
    c = config(open_for=10.0, max_open_for=120.0, jitter=0.15)
    random.seed(1234)
    draws = [open_seconds(c, 1) for _ in range(2000)]
    assert all(8.5 <= d <= 11.5 for d in draws)
    assert min(draws) < 9.0 and max(draws) > 11.0  # it really spreads
    capped = [open_seconds(c, 10) for _ in range(2000)]
    assert all(102.0 <= d <= 138.0 for d in capped)


def test_repeated_local_trips_double_the_open_time() -> None:
    b = breaker(min_requests=2, open_for=5.0, window=10.0)
    # A recovery just ended (a ramp ended at T0), so a trip soon after counts as repeated.
    b.adopt(Shared(state=State.CLOSED, version=5, trips=2, ramp_start=T0 - 10, ramp_end=T0), 0)
    transition = feed(b, T0 + 1, CallResult.FAILURE, 2)[-1]
    assert transition is not None
    assert b.shared.trips == 3
    assert transition.until == pytest.approx(T0 + 1 + 20.0)


def test_a_trip_a_window_after_the_ramp_starts_afresh() -> None:
    b = breaker(min_requests=2, open_for=5.0, window=10.0)
    b.adopt(Shared(state=State.CLOSED, version=5, trips=2, ramp_start=T0 - 10, ramp_end=T0), 0)
    transition = feed(b, T0 + 10.0, CallResult.FAILURE, 2)[-1]
    assert transition is not None
    assert b.shared.trips == 1
    assert transition.until == pytest.approx(T0 + 10.0 + 5.0)


# --- half-open admission -----------------------------------------------------------------


def test_half_open_without_permits_rejects_and_counts_wanted_up_to_probes() -> None:
    b = breaker(half_open=HalfOpenConfig(probes=3, ramp=0.0))
    half_open(b)
    b.take_report(T0)  # start from an empty report
    verdicts = [b.admit(T0 + i * 0.01) for i in range(10)]
    assert verdicts == [Verdict.REJECT] * 10
    assert b.pending.wanted == 3
    assert b.urgent


def test_half_open_with_permits_passes_exactly_that_many_probes() -> None:
    b = breaker(half_open=HalfOpenConfig(probes=3, ramp=0.0))
    half_open(b)
    b.adopt(Shared(state=State.HALF_OPEN, version=3, trips=1), 2)
    assert b.permits == 2
    b.take_report(T0)
    verdicts = [b.admit(T0) for _ in range(5)]
    assert verdicts == [Verdict.PROBE, Verdict.PROBE] + [Verdict.REJECT] * 3
    assert b.permits == 0 and b.in_flight_probes == 2
    assert b.pending.wanted == 3


def test_probe_outcomes_go_to_the_report_and_ignored_returns_the_permit() -> None:
    b = breaker(min_requests=1, consecutive_failures=1, half_open=HalfOpenConfig(3, 0.0))
    half_open(b)
    b.adopt(Shared(state=State.HALF_OPEN, version=3, trips=1), 3)
    b.take_report(T0)
    assert [b.admit(T0) for _ in range(3)] == [Verdict.PROBE] * 3
    assert b.record(T0, CallResult.SUCCESS, False, probe=True) is None
    assert b.record(T0, CallResult.FAILURE, False, probe=True) is None  # no local trip
    assert b.record(T0, CallResult.IGNORED, False, probe=True) is None
    p = b.pending
    assert (p.probe_ok, p.probe_failed, p.returned) == (1, 1, 1)
    assert p.total == 0 and b.window.total == 0  # probes are not window calls
    assert b.in_flight_probes == 0 and b.urgent and b.state is State.HALF_OPEN


def test_permits_are_void_when_the_shared_state_moves_on() -> None:
    b = breaker()
    half_open(b)
    b.adopt(Shared(state=State.HALF_OPEN, version=3, trips=1), 2)
    b.adopt(Shared(state=State.OPEN, version=4, trips=2, until=T0 + 10), 0)
    assert b.permits == 0


# --- the report -----------------------------------------------------------------------------


def test_take_report_then_restore_round_trip() -> None:
    b = breaker(min_requests=1000)
    feed(b, T0, CallResult.FAILURE, 3)
    feed(b, T0, CallResult.SUCCESS, 2, slow=True)
    b.pending.trip = "failure_rate"
    b.pending.wanted, b.pending.probe_ok, b.pending.probe_failed = 2, 1, 1
    b.pending.returned = 1
    b.urgent = True
    report = b.take_report(T0)
    assert (report.total, report.failures, report.slow) == (5, 3, 2)
    assert b.pending.empty() and b.pending.returned == 0 and not b.urgent
    # Meanwhile more happened; then the sync failed and the report is told again.
    feed(b, T0 + 1, CallResult.FAILURE, 1)
    b.pending.wanted = 1
    b.restore(report)
    p = b.pending
    assert (p.total, p.failures, p.slow) == (6, 4, 2)
    assert p.trip == "failure_rate"
    assert p.wanted == 2  # wanted is a level, not a sum
    assert (p.probe_ok, p.probe_failed, p.returned) == (1, 1, 1)


def test_restore_keeps_a_newer_trip_reason() -> None:
    b = breaker()
    b.pending.trip = "slow_call_rate"
    report = b.take_report(T0)
    b.pending.trip = "consecutive_failures"
    b.restore(report)
    assert b.pending.trip == "consecutive_failures"


def test_unused_permits_go_back_with_the_report_after_permit_hold() -> None:
    b = breaker(flush_interval=0.25)
    hold = permit_hold(b.config)
    assert hold == 1.0  # max(1 s, 4 flush intervals)
    assert permit_hold(config(flush_interval=0.5)) == 2.0
    half_open(b)
    b.adopt(Shared(state=State.HALF_OPEN, version=3, trips=1), 2)  # permits_at: real time
    granted_at = b.permits_at
    assert abs(granted_at - unix_now()) < 5.0
    fresh = b.take_report(granted_at + hold / 2)
    assert fresh.returned == 0 and b.permits == 2
    stale = b.take_report(granted_at + hold + 0.01)
    assert stale.returned == 2 and b.permits == 0
    assert b.take_report(granted_at + 10 * hold).returned == 0


# --- adopt -----------------------------------------------------------------------------------


def test_a_shared_open_clears_the_window_and_returns_the_transition() -> None:
    b = breaker(min_requests=1000, consecutive_failures=10)
    feed(b, T0, CallResult.FAILURE, 5)
    shared = Shared(
        state=State.OPEN, version=1, until=T0 + 7, trips=1, reason="failure_rate",
        total=40, failures=30, slow=2,
    )  # fmt: skip
    transition = b.adopt(shared, 0)
    assert transition is not None
    assert (transition.before, transition.after, transition.reason) == (
        State.CLOSED, State.OPEN, "failure_rate",
    )  # fmt: skip
    assert (transition.total, transition.failures, transition.slow) == (40, 30, 2)
    assert transition.until == T0 + 7
    assert b.window.total == 0 and b.consecutive == 0
    assert b.admit(T0 + 1) is Verdict.REJECT


def test_a_pending_local_trip_is_not_overwritten_by_a_closed_reply() -> None:
    b = breaker(min_requests=2)
    feed(b, T0, CallResult.FAILURE, 2)
    assert b.state is State.OPEN
    assert b.adopt(Shared(state=State.CLOSED, version=9), 0) is None
    assert b.state is State.OPEN and b.admit(T0 + 1) is Verdict.REJECT
    # Once the trip was reported, a CLOSED answer would be adopted.
    b.take_report(T0 + 1)
    transition = b.adopt(Shared(state=State.CLOSED, version=10, reason="reset"), 0)
    assert transition is not None and transition.after is State.CLOSED
    assert b.admit(T0 + 2) is Verdict.PASS


def test_the_same_state_again_is_no_transition() -> None:
    b = breaker()
    assert b.adopt(Shared(state=State.CLOSED, version=2), 0) is None
    b.adopt(Shared(state=State.OPEN, version=3, until=T0 + 5), 0)
    assert b.adopt(Shared(state=State.OPEN, version=3, until=T0 + 5), 0) is None


@pytest.mark.parametrize(("fraction", "passed"), [(0.25, 25), (0.5, 50), (0.75, 75)])
def test_the_ramp_passes_elapsed_over_ramp_of_requests(fraction: float, passed: int) -> None:
    b = breaker()
    b.adopt(Shared(state=State.HALF_OPEN, version=1, trips=1), 0)
    ramp_start, ramp_end = T0, T0 + 8.0
    b.adopt(Shared(state=State.CLOSED, version=2, ramp_start=ramp_start, ramp_end=ramp_end), 0)
    now = ramp_start + fraction * 8.0
    verdicts = [b.admit(now) for _ in range(100)]
    assert verdicts.count(Verdict.PASS) == passed
    assert set(verdicts) <= {Verdict.PASS, Verdict.REJECT}
    # Spread evenly: never two refusals in a row at 75 %, never two passes in a row at 25 %.
    if fraction == 0.75:
        assert all(not (a is b_ is Verdict.REJECT) for a, b_ in itertools.pairwise(verdicts))
    if fraction == 0.25:
        assert all(not (a is b_ is Verdict.PASS) for a, b_ in itertools.pairwise(verdicts))


def test_the_ramp_starts_near_zero_and_ends_with_everything() -> None:
    b = breaker()
    b.adopt(Shared(state=State.CLOSED, version=2, ramp_start=T0, ramp_end=T0 + 10.0), 0)
    assert [b.admit(T0) for _ in range(50)].count(Verdict.PASS) == 0
    assert [b.admit(T0 + 10.0) for _ in range(50)] == [Verdict.PASS] * 50


def test_forced_closed_always_passes() -> None:
    b = breaker(min_requests=2, consecutive_failures=2)
    b.adopt(
        Shared(state=State.CLOSED, version=1, forced="closed", ramp_start=T0, ramp_end=T0 + 10),
        0,
    )
    assert [b.admit(T0 + 0.1) for _ in range(20)] == [Verdict.PASS] * 20  # no ramp either
    assert feed(b, T0, CallResult.FAILURE, 20) == [None] * 20  # and never trips
    assert b.state is State.CLOSED and b.window.total == 0
    assert b.pending.total == 0 and b.pending.trip == ""


def test_forced_open_always_rejects_even_past_until() -> None:
    b = breaker()
    b.adopt(Shared(state=State.OPEN, version=1, forced="open", until=T0), 0)
    assert [b.admit(T0 + i * 100) for i in range(20)] == [Verdict.REJECT] * 20
    assert b.pending.wanted == 0


def test_the_recovery_starts_from_an_empty_local_window() -> None:
    b = breaker(min_requests=4, consecutive_failures=0)
    feed(b, T0, CallResult.FAILURE, 4)  # a local trip
    b.take_report(T0)
    b.adopt(Shared(state=State.OPEN, version=1, trips=1, until=T0 + 5), 0)
    b.adopt(Shared(state=State.HALF_OPEN, version=2, trips=1), 0)
    # Stragglers admitted before the trip, answered (failing) while half-open.
    feed(b, T0 + 6, CallResult.FAILURE, 6)
    closed = Shared(state=State.CLOSED, version=3, reason="probes_passed", trips=1)
    assert b.adopt(closed, 0) is not None
    assert b.window.total == 0 and b.consecutive == 0
    assert b.record(T0 + 7, CallResult.SUCCESS, False, probe=False) is None
    assert b.state is State.CLOSED
