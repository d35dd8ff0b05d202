"""A route's bulkhead (`max_in_flight`): at most N of its requests under way at once in
this process; the next one gets 503 at once instead of queueing behind them, so a slow
route cannot take every connection and task of the sidecar. A request counts from the
moment it passes until its response is completely sent or abandoned."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar import errors
from sidecar.chain import Next, Outcome, Policy, ProxyRequest, ProxyResponse
from sidecar.config import RouteConfig
from sidecar.policies.base import PolicyDeps


@dataclass(slots=True)
class InFlight:
    """Kept across reloads: requests of the old generation still count against the new."""

    count: int = 0

    def leave(self, outcome: Outcome) -> None:
        self.count -= 1


class BulkheadPolicy:
    def __init__(self, limit: int, route: RouteConfig, deps: PolicyDeps) -> None:
        self._limit = limit
        self._route = route.name
        self._log = deps.log
        self._rejected = deps.metrics.bulkhead_rejected.labels(route.name)
        self._in_flight = deps.state.get("bulkhead", route.name, (), InFlight)

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        in_flight = self._in_flight
        if in_flight.count >= self._limit:
            self._rejected.inc()
            self._log.request_event(
                request, "bulkhead.rejected", route=self._route, limit=self._limit
            )
            response = errors.problem_for(
                errors.ROUTE_OVERLOADED,
                request,
                f"{self._limit} requests of route {self._route!r} are under way"
                " (its max_in_flight)",
            )
            response.headers["Retry-After"] = "1"
            return response
        in_flight.count += 1
        # Finishers run exactly once, however the request ends.
        request.add_finisher(in_flight.leave)
        return await call_next(request)


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    if route.max_in_flight is None:
        return None
    return BulkheadPolicy(route.max_in_flight, route, deps)
