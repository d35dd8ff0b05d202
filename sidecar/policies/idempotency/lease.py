"""A claim's life after `begin`: the owner's lease, and giving claims back.

The owner's hold on an in-progress claim is renewed in the background and known at every
moment.

A claim lives on the store for `lease` seconds from the moment its last claim or renewal
*landed*; the owner counts from the moment it *sent* that call, which is never later, so
its local deadline never outlives the store's. Renewals go out every third of the lease;
a renewal that fails is retried at once with a short back-off (not at the next third, so
two blips in a row cannot lose a live owner's claim), until the local deadline. The moment
that deadline passes with no renewal confirmed, or the store says another owner holds the
key, the claim is lost: `on_lost` is told then, not when the request ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from sidecar.store import ScriptCall, ScriptResult, StateStore, StoreError

_FIRST_PAUSE = 0.05
_LONGEST_PAUSE = 1.0


async def until_answered(
    store: StateStore, call: ScriptCall, until: float, longest_pause: float = _LONGEST_PAUSE
) -> ScriptResult:
    """Run one call, retrying a failed attempt with back-off until the loop time `until`
    (one last attempt at `until` itself). For calls that are safe to repeat: the record
    scripts are, since each is a compare-and-set on the claim token.

    Raises the last StoreError once `until` has passed, or at once for a script error,
    which no retry would change.
    """
    loop = asyncio.get_running_loop()
    pause = _FIRST_PAUSE
    while True:
        try:
            [result] = await store.execute([call])
            return result
        except StoreError as error:
            left = until - loop.time()
            if error.kind == "script" or left <= 0:
                raise
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, longest_pause)


class Lease:
    __slots__ = (
        "_expiry",
        "_lease",
        "_loop",
        "_on_lost",
        "_pause",
        "_renew",
        "_renewed_at",
        "_store",
        "_task",
        "deadline",
        "held",
    )

    def __init__(
        self,
        store: StateStore,
        renew: ScriptCall,
        lease: float,
        claimed_at: float,
        on_lost: Callable[[str], None],
    ) -> None:
        """`renew` is the RENEW call for this claim; `claimed_at` the loop time the claim
        was sent; `on_lost(reason)` is called once, "expired" or "taken"."""
        self._loop = asyncio.get_running_loop()
        self._store = store
        self._renew = renew
        self._lease = lease
        self._pause = min(_LONGEST_PAUSE, lease / 10)
        self._on_lost = on_lost
        self._renewed_at = claimed_at
        self._task: asyncio.Task[None] | None = None
        self.held = True
        # Loop time until which the owner can prove it holds the claim.
        self.deadline = claimed_at + lease
        self._expiry = self._loop.call_at(self.deadline, self.lose, "expired")

    def start(self) -> None:
        if self._task is None and self.held:
            self._task = self._loop.create_task(self._keep())

    def stop(self) -> None:
        """No more renewals (the claim is settled, or left to expire on the store)."""
        self._expiry.cancel()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def lose(self, reason: str) -> None:
        """The claim is no longer ours (a renewal or the completion was refused, or the
        deadline passed); reported once."""
        if not self.held:
            return
        self.held = False
        self.stop()
        self._on_lost(reason)

    async def _keep(self) -> None:
        while self.held:
            await asyncio.sleep(self._renewed_at + self._lease / 3 - self._loop.time())
            sent_at = self._loop.time()
            try:
                renewed = await until_answered(self._store, self._renew, self.deadline, self._pause)
            except StoreError:
                return  # the deadline passed unrenewed: the expiry timer reports the loss
            if renewed != 1:
                self.lose("taken")
                return
            self._extend(sent_at)

    def _extend(self, sent_at: float) -> None:
        if not self.held:
            return
        self._renewed_at = sent_at
        self.deadline = sent_at + self._lease
        self._expiry.cancel()
        self._expiry = self._loop.call_at(self.deadline, self.lose, "expired")


class ReleaseQueue:
    """Claims to give back, released in batches by one task until the store answers.

    A release must outlast a store outage (else a retry meets a claim nobody owns for a
    whole lease), but one retrying task per request would hammer a recovering store with
    as many calls as requests failed meanwhile. So releases wait here, one per claim, and
    one task sends them together (one round trip per batch), backing off while the store
    fails and dropping each once its claim would have expired anyway.
    """

    BATCH = 256

    def __init__(self, store: StateStore, spawn: Callable[[Coroutine[Any, Any, None]], object]):
        self._store = store
        self._spawn = spawn
        # (record, token) -> (RELEASE call, loop time after which the claim has expired
        # anyway). Several claims of one record may wait at once (a client's retries).
        self._pending: dict[tuple[str, str], tuple[ScriptCall, float]] = {}
        self._running = False

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, record: str, token: str, call: ScriptCall, until: float) -> None:
        self._pending[(record, token)] = (call, until)
        if not self._running:
            self._running = True
            self._spawn(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        pause = _FIRST_PAUSE
        try:
            while self._pending:
                now = loop.time()
                for claim in [c for c, (_, until) in self._pending.items() if until < now]:
                    del self._pending[claim]
                batch = list(self._pending.items())[: self.BATCH]
                if not batch:
                    return
                try:
                    await self._store.execute([call for _, (call, _) in batch])
                except StoreError:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _LONGEST_PAUSE)
                    continue
                pause = _FIRST_PAUSE
                for claim, entry in batch:
                    if self._pending.get(claim) is entry:  # not re-queued meanwhile
                        del self._pending[claim]
        finally:
            self._running = False
