"""What a route's quota policy keeps in process, across requests and config reloads.

- StoreHealth: whether the store is being skipped after a failure (and when to try it
  again), so a dead Redis costs one timeout per back-off interval, not one per request;
- DenialCache: refusals remembered until their Retry-After, so a client hammering past
  its limit is answered without a store round trip;
- InFlight: requests of each organisation under way (max_in_flight);
- RefundQueue: charges to give back, summed per counter and sent in batches off the
  request path.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from sidecar.store import ScriptCall, StateStore, StoreError

# Back-off after a store failure: the first retry soon, then ever later, capped.
_FIRST_BACKOFF = 0.5
_LONGEST_BACKOFF = 5.0


class StoreHealth:
    """The store's state as this route's quota policy last saw it.

    After a failure the store is skipped (requests take the on_store_error path at once)
    for a back-off interval; then one request at a time probes it, and the first answer
    ends the degradation. `on_change(degraded)` is called on every transition.
    """

    def __init__(
        self, on_change: Callable[[bool], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._on_change = on_change
        self._clock = clock
        self._failures = 0
        self._skip_until = 0.0
        self._probing = False

    @property
    def degraded(self) -> bool:
        return self._failures > 0

    def should_try(self) -> bool:
        """Whether this request should ask the store (claims the probe while degraded)."""
        if self._failures == 0:
            return True
        if self._probing or self._clock() < self._skip_until:
            return False
        self._probing = True
        return True

    def answered(self) -> None:
        self._probing = False
        if self._failures:
            self._failures = 0
            self._on_change(False)

    def abandoned(self) -> None:
        """The request asking the store went away before its answer: no verdict."""
        self._probing = False

    def failed(self) -> None:
        self._probing = False
        self._failures += 1
        backoff = min(_FIRST_BACKOFF * 2 ** (self._failures - 1), _LONGEST_BACKOFF)
        self._skip_until = self._clock() + backoff
        if self._failures == 1:
            self._on_change(True)


class DenialCache:
    """Counters known to refuse a cost until a moment (loop time), bounded in size.

    A refusal of cost c at a GCRA counter or a quota holds for every cost >= c until its
    Retry-After (capacity only grows with time), so answering those from here refuses
    nothing the store would have let through, except after a refund or a raised override.
    So that those reach every replica soon, a refusal is trusted for `trust` seconds at
    most, then asked of the store again: one store call per key per `trust` per replica.
    """

    def __init__(self, capacity: int = 10_000, trust: float = 5.0) -> None:
        self._capacity = capacity
        self._trust = trust
        # key -> (refused until, trusted until, cost refused)
        self._entries: OrderedDict[str, tuple[float, float, int]] = OrderedDict()

    def refused(self, key: str, cost: int, now: float) -> float | None:
        """Seconds until `key` could take `cost`, if it is known to refuse it now."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, trusted_until, refused_cost = entry
        if now >= trusted_until:
            del self._entries[key]
            return None
        if cost < refused_cost:
            return None
        return until - now

    def remember(self, key: str, cost: int, until: float, now: float) -> None:
        self._entries[key] = (until, min(until, now + self._trust), cost)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class InFlight:
    """Requests of each organisation under way on one route, in this process."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def enter(self, org: str, limit: int) -> bool:
        count = self._counts.get(org, 0)
        if count >= limit:
            return False
        self._counts[org] = count + 1
        return True

    def leave(self, org: str) -> None:
        count = self._counts.get(org, 0) - 1
        if count <= 0:
            self._counts.pop(org, None)
        else:
            self._counts[org] = count

    def __getitem__(self, org: str) -> int:
        return self._counts.get(org, 0)


Refund = tuple[str, str, int]  # (kind, counter key, amount)
_BATCH = 256
# How long a refund is retried while the store fails: a charge older than this has mostly
# been refilled by the window anyway (rate), or is one request of a day's quota.
_REFUND_PATIENCE = 10.0


class RefundQueue:
    """Charges to give back, summed per counter, sent in batches by one task at a time.

    `make_call` turns a batch into one script call; a batch the store refuses is retried
    with back-off until `_REFUND_PATIENCE` has passed since it was queued, then dropped
    (`on_dropped` counts it): a refund is a courtesy to the client, never a reason to
    pile work onto a failing store.
    """

    def __init__(
        self,
        store: StateStore,
        make_call: Callable[[list[Refund]], ScriptCall],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        on_dropped: Callable[[int], None],
    ) -> None:
        self._store = store
        self._make_call = make_call
        self._spawn = spawn
        self._on_dropped = on_dropped
        self._pending: dict[tuple[str, str], int] = {}
        self._since = 0.0
        self._task: asyncio.Task[None] | None = None

    def add(self, refunds: list[Refund]) -> None:
        if not self._pending:
            self._since = asyncio.get_running_loop().time()
        for kind, key, amount in refunds:
            if amount > 0:
                self._pending[(kind, key)] = self._pending.get((kind, key), 0) + amount
        if self._pending and (self._task is None or self._task.done()):
            self._task = self._spawn(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while self._pending:
            batch = list(self._pending.items())[:_BATCH]
            refunds = [(kind, key, amount) for (kind, key), amount in batch]
            try:
                await self._store.execute([self._make_call(refunds)])
            except StoreError:
                if loop.time() - self._since > _REFUND_PATIENCE:
                    self._on_dropped(len(self._pending))
                    self._pending.clear()
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            for item, amount in batch:
                left = self._pending.get(item, 0) - amount
                if left > 0:
                    self._pending[item] = left  # more was added while the batch was out
                else:
                    self._pending.pop(item, None)
            self._since = loop.time()

    def __len__(self) -> int:
        return len(self._pending)
