"""A route's limits, compiled once at config load: keys, windows, zones and header parts.

Per request the policy only fills in the caller, the cost and the calendar period; every
string that does not depend on those is built here.

Store keys (docs/quotas.md has the layout). One organisation's keys share the hash tag
`{o:ORG}`, so the one admission script per request touches a single Redis Cluster slot;
a `scope: route` limit is everybody's and lives under `{r:NAMESPACE}` instead:

    rl:{o:ORG}:NAMESPACE:LIMIT[:u:USER]           a rate limit's bucket (level:µs)
    qt:{o:ORG}:NAMESPACE:LIMIT[:u:USER]:PERIOD    a quota's count in one calendar period
    qo:{o:ORG}                                    the admin API's overrides (limit -> N)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sidecar.config import LimitConfig, QuotaConfig
from sidecar.policies.quota.periods import Period, PeriodClock, zone
from sidecar.policies.quota.scripts import LimitArgs
from sidecar.store.keys import org_tag

_SAFE_USER = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
# The organisation of a caller without one, on routes with `anonymous: limit`.
ANONYMOUS = "anonymous"


def overrides_key(org: str) -> str:
    """The hash holding the admin API's per-limit overrides of one organisation."""
    return f"qo:{{o:{org_tag(org)}}}"


def _user_part(user: str) -> str:
    if _SAFE_USER.fullmatch(user):
        return user
    return "h" + hashlib.sha256(user.encode("utf-8", "surrogateescape")).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Caller:
    """Whose counters a request spends: the organisation (and user, for org_user limits)."""

    org: str
    user: str
    anonymous: bool = False


class CompiledLimit:
    """One limit of a route, with everything that does not depend on the caller prepared."""

    __slots__ = (
        "_route_prefix",
        "_suffix",
        "burst",
        "config",
        "kind",
        "name",
        "period",
        "policy_window",
        "refund_statuses",
        "refunds_failures",
        "scope",
        "shadow",
        "token",
        "window_us",
        "zone",
    )

    def __init__(self, config: LimitConfig, namespace: str) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.scope = config.scope
        self.shadow = config.shadow
        self.period = config.period
        self.zone: ZoneInfo = zone(config.timezone)
        self.window_us = round(config.window * 1_000_000)
        self.burst = config.burst or 0
        # The draft's `w` is whole seconds; a sub-second window shows as 1.
        self.policy_window = max(1, round(config.window))
        # Names are [A-Za-z0-9_.-]: a valid sf-string as they are.
        self.token = f'"{config.name}"'
        # count: success refunds requests that failed: a 5xx (or the configured set), or
        # a response that broke off; count: all refunds only what never reached the app.
        self.refunds_failures = config.count == "success"
        self.refund_statuses = config.refund_statuses
        self._suffix = f":{namespace}:{config.name}"
        self._route_prefix = f"{{r:{namespace}}}{self._suffix}"

    def key(self, caller: Caller, tag: str, period: Period | None) -> str:
        """The counter of `caller` (whose org_tag is `tag`) in `period` (None: a rate)."""
        if self.scope == "route":
            base = self._route_prefix
        else:
            base = f"{{o:{tag}}}{self._suffix}"
            if self.scope == "org_user":
                base = f"{base}:u:{_user_part(caller.user)}"
        if period is None:
            return "rl:" + base
        return f"qt:{base}:{period.id}"

    def refunds(self, status: int, broke_off: bool) -> bool:
        """Whether an admitted request that reached the app is given back (count: success)."""
        if not self.refunds_failures:
            return False
        if broke_off:
            return True
        if self.refund_statuses is None:
            return status >= 500
        return status in self.refund_statuses


@dataclass(frozen=True, slots=True)
class Charge:
    """One limit as one request spends it: what the admission script is sent, and what
    is needed afterwards (headers, a refund)."""

    limit: CompiledLimit
    args: LimitArgs
    period: Period | None


class Plan:
    """Every limit of one route, and the per-organisation settings over them."""

    def __init__(self, config: QuotaConfig, namespace: str) -> None:
        self.config = config
        self.namespace = namespace
        self.limits = tuple(CompiledLimit(limit, namespace) for limit in config.limits)
        self.by_name = {limit.name: limit for limit in self.limits}
        self._overrides: Mapping[str, Mapping[str, int]] = config.overrides
        self._zones = {org: zone(name) for org, name in config.timezones.items()}
        self.has_cost_header = any(limit.config.cost.header for limit in self.limits)

    def limit_for(self, limit: CompiledLimit, org: str) -> int:
        """The configured limit for this organisation (the config file's override first)."""
        if limit.scope != "route":
            configured = self._overrides.get(org)
            if configured is not None:
                value = configured.get(limit.name)
                if value is not None:
                    return value
        return limit.config.limit

    def zone_for(self, limit: CompiledLimit, org: str) -> ZoneInfo:
        return self._zones.get(org, limit.zone)

    def charges(
        self,
        caller: Caller,
        costs: Mapping[str, int],
        unix_ms: int,
        clock: PeriodClock,
        divide_by: int = 1,
    ) -> list[Charge]:
        """The script arguments of every limit for this request.

        `divide_by` scales limits down for the in-process fallback (limit / replicas).
        """
        charges = []
        tag = org_tag(caller.org)  # once per request, not once per limit
        for limit in self.limits:
            period = None
            if limit.period is not None:
                period = clock.period(limit.period, self.zone_for(limit, caller.org), unix_ms)
            value = self.limit_for(limit, caller.org)
            burst = limit.burst
            if divide_by > 1:
                value = _divide(value, divide_by)
                burst = _divide(burst, divide_by) if burst else 0
            args = LimitArgs(
                kind=limit.kind,
                key=limit.key(caller, tag, period),
                limit=value,
                # An org's override never applies to a limit everybody shares.
                override_field="" if limit.scope == "route" or divide_by > 1 else limit.name,
                window=period.end_ms if period is not None else limit.window_us,
                burst=burst,
                cost=costs.get(limit.name, limit.config.cost.amount),
                shadow=limit.shadow,
            )
            charges.append(Charge(limit, args, period))
        return charges


def _divide(value: int, parts: int) -> int:
    # A replica's share never rounds a non-zero limit down to "refuse everything".
    return max(1, value // parts) if value > 0 else 0
