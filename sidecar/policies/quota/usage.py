"""The quota side of the admin API: an organisation's usage, and overrides in the store.

Overrides live in the state store (the `qo:{o:ORG}` hash), so a limit set through any
replica applies on every replica at its next admission: the admission script reads the
hash in the same round trip that charges the limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from sidecar.config import SidecarConfig
from sidecar.policies.quota.periods import PeriodClock
from sidecar.policies.quota.plan import Caller, Plan, overrides_key
from sidecar.policies.quota.scripts import (
    admit_call,
    decode_admission,
    decode_overrides,
    override_delete_call,
    override_get_call,
    override_set_call,
)
from sidecar.store import ScriptCall, StateStore


class UnknownLimit(LookupError):
    """No route of the current config has a limit of this name."""


class QuotaAdmin:
    """Built per admin request from the config in force (compiling plans is cheap)."""

    def __init__(
        self, config: SidecarConfig, store: StateStore, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._clock = clock
        self._plans = [
            (route.name, Plan(route.quotas, route.quotas.namespace or route.name))
            for route in config.routes
            if route.quotas is not None
        ]

    @property
    def limit_names(self) -> frozenset[str]:
        return frozenset(name for _, plan in self._plans for name in plan.by_name)

    async def usage(self, org: str) -> dict[str, Any]:
        """Every limit of every route as it stands for `org`: limit, used, remaining, reset.

        Read with the admission script in peek mode (cost 0, nothing written), so the
        numbers are the ones the next request would be judged by. A per-user limit has no
        single figure for an organisation and is listed without usage.
        """
        now_ms = int(self._clock() * 1000)
        caller = Caller(org, "")
        periods = PeriodClock()
        calls: list[ScriptCall] = [override_get_call(overrides_key(org))]
        plan_charges = []
        for _, plan in self._plans:
            charges = plan.charges(caller, {name: 0 for name in plan.by_name}, now_ms, periods)
            plan_charges.append(charges)
            calls.append(admit_call(overrides_key(org), [c.args for c in charges], peek=True))
        replies = await self._store.execute(calls)
        overrides = decode_overrides(replies[0])
        routes = []
        for (route, _), charges, reply in zip(self._plans, plan_charges, replies[1:], strict=True):
            admission = decode_admission(reply, len(charges))
            limits = []
            for charge, result in zip(charges, admission.limits, strict=True):
                limit = charge.limit
                entry: dict[str, Any] = {
                    "name": limit.name,
                    "kind": limit.kind,
                    "scope": limit.scope,
                    "shadow": limit.shadow,
                    "limit": result.limit,
                    "overridden": limit.name in overrides and limit.scope != "route",
                }
                if charge.period is not None:
                    entry["period"] = {
                        "id": charge.period.id,
                        "start_ms": charge.period.start_ms,
                        "end_ms": charge.period.end_ms,
                    }
                else:
                    entry["window_seconds"] = limit.config.window
                if limit.scope == "org_user":
                    entry.update(used=None, remaining=None, reset_seconds=None)
                else:
                    entry.update(
                        used=max(0, result.limit - result.remaining),
                        remaining=result.remaining,
                        reset_seconds=math.ceil(result.reset_ms / 1000),
                    )
                limits.append(entry)
            routes.append({"route": route, "limits": limits})
        return {"org": org, "overrides": overrides, "routes": routes}

    async def set_override(self, org: str, limit: str, value: int) -> None:
        self._check_known(limit)
        await self._store.execute([override_set_call(overrides_key(org), limit, value)])

    async def delete_override(self, org: str, limit: str) -> bool:
        """True if there was an override to remove."""
        self._check_known(limit)
        replies = await self._store.execute([override_delete_call(overrides_key(org), limit)])
        return replies[0] == 1

    def _check_known(self, limit: str) -> None:
        if limit not in self.limit_names:
            raise UnknownLimit(limit)
