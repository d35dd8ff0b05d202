"""What the admin API shows of the breakers and how an operator forces one
(docs/admin-api.md#breakers): `GET /breakers`, `POST /breakers/{route}/open|close|reset`.

A forced state is written to the shared state, so every replica adopts it at its next
sync; this replica adopts it at once.
"""

from __future__ import annotations

from sidecar.policies.base import PolicyState
from sidecar.policies.breaker.machine import Breaker, State, unix_now
from sidecar.policies.breaker.policy import BreakerGroup
from sidecar.policies.breaker.sync import Syncer

# The URL's verbs and the sync script's actions.
ACTIONS = {"open": "open", "close": "closed", "reset": "reset"}


class UnknownBreaker(Exception):
    """No route of the current config has a breaker of that name."""


class BreakerAdmin:
    def __init__(self, state: PolicyState) -> None:
        self._groups = [
            value for value in state.values("breaker") if isinstance(value, BreakerGroup)
        ]

    def report(self) -> dict[str, object]:
        now = unix_now()
        breakers = [
            _describe(breaker, group.syncer, now)
            for group in self._groups
            for breaker in sorted(group.breakers.values(), key=lambda b: b.name)
        ]
        return {"breakers": breakers}

    async def force(self, route: str, verb: str, org: str | None = None) -> dict[str, object]:
        """Force the breaker of `route` (of `route` and `org` with scope: route_org)."""
        action = ACTIONS[verb]
        name = route if org is None else f"{route}/{org}"
        for group in self._groups:
            if group.route == route:
                if group.config.scope == "route_org" and org is None:
                    raise UnknownBreaker(f"route {route!r} has one breaker per organisation:"
                                         " name it with ?org=")  # fmt: skip
                group.syncer.start()
                if name not in group.breakers:
                    group.breakers[name] = Breaker.create(name, group.config)
                await group.syncer.force(name, action)
                return _describe(group.breakers[name], group.syncer, unix_now())
        raise UnknownBreaker(f"no route named {route!r} has a circuit breaker")


def _describe(breaker: Breaker, syncer: Syncer, now: float) -> dict[str, object]:
    shared = breaker.shared
    breaker.window.refresh(now)
    next_transition: dict[str, object] | None = None  # a forced state never ends by itself
    if shared.forced == "" and shared.state is State.OPEN:
        next_transition = {"to": "half_open", "in_seconds": round(max(0.0, shared.until - now), 3)}
    elif shared.forced == "" and shared.state is State.CLOSED and now < shared.ramp_end:
        next_transition = {"ramp_ends_in_seconds": round(shared.ramp_end - now, 3)}
    return {
        "name": breaker.name,
        "state": shared.state.name.lower(),
        "forced": shared.forced or None,
        "reason": shared.reason or None,
        "trips": shared.trips,
        "next": next_transition,
        "window": {
            "calls": breaker.window.total,
            "failures": breaker.window.failures,
            "slow": breaker.window.slow,
        },
        "shared_window": {
            "calls": shared.total,
            "failures": shared.failures,
            "slow": shared.slow,
        },
        "consecutive_failures": breaker.consecutive,
        "probe_permits": breaker.permits,
        "degraded": syncer.degraded,
        "version": shared.version,
    }
