"""The quota policy's in-process state: the store's health with back-off and a single
probe, and the cache of known refusals."""

from __future__ import annotations

from sidecar.policies.quota.state import DenialCache, InFlight, StoreHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_skips_the_store_with_back_off_then_one_request_probes() -> None:
    clock, changes = Clock(), []
    health = StoreHealth(changes.append, clock)
    assert health.should_try() and not health.degraded
    health.failed()
    assert changes == [True] and health.degraded
    assert not health.should_try()  # skipped for 0.5 s
    clock.now += 0.5
    assert health.should_try()  # the probe
    assert not health.should_try()  # only one at a time
    health.failed()  # the probe failed: 1 s now
    clock.now += 0.9
    assert not health.should_try()
    clock.now += 0.1
    assert health.should_try()
    health.answered()
    assert changes == [True, False] and not health.degraded
    assert health.should_try() and health.should_try()


def test_a_probe_abandoned_by_its_client_lets_the_next_request_probe() -> None:
    clock = Clock()
    health = StoreHealth(lambda degraded: None, clock)
    health.failed()
    clock.now += 1
    assert health.should_try()
    health.abandoned()
    assert health.should_try()


def test_the_back_off_is_capped_at_five_seconds() -> None:
    clock = Clock()
    health = StoreHealth(lambda degraded: None, clock)
    for _ in range(10):
        health.failed()
    clock.now += 5.0
    assert health.should_try()


def test_a_remembered_refusal_holds_for_larger_costs_until_its_time() -> None:
    cache = DenialCache(capacity=2)
    cache.remember("k", 3, until=10.0, now=8.0)
    assert cache.refused("k", 3, now=9.0) == 1.0
    assert cache.refused("k", 5, now=9.5) == 0.5
    assert cache.refused("k", 2, now=9.0) is None  # a smaller cost may still fit
    assert cache.refused("k", 3, now=10.0) is None  # over: forgotten
    assert len(cache) == 0
    for key in ("a", "b", "c"):
        cache.remember(key, 1, until=3.0, now=0.0)
    assert len(cache) == 2 and cache.refused("a", 1, now=1.0) is None  # oldest evicted
    assert cache.refused("c", 1, now=1.0) == 2.0


def test_a_long_refusal_is_trusted_only_briefly_so_a_raised_limit_reaches_every_replica() -> None:
    cache = DenialCache(trust=5.0)
    cache.remember("k", 1, until=3600.0, now=0.0)
    # Answered from memory with the store's wait for a while...
    assert cache.refused("k", 1, now=4.9) == 3595.1
    # ...then asked of the store again, which may know of a refund or a raised limit.
    assert cache.refused("k", 1, now=5.0) is None
    assert len(cache) == 0


def test_in_flight_counts_per_organisation() -> None:
    counts = InFlight()
    assert counts.enter("a", 2) and counts.enter("a", 2) and not counts.enter("a", 2)
    assert counts.enter("b", 2)
    counts.leave("a")
    assert counts["a"] == 1 and counts.enter("a", 2)
    counts.leave("b")
    assert counts["b"] == 0
