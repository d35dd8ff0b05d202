"""The policies a route's chain is built from, in the order they run.

Each policy is one module exposing a factory `build(route, deps) -> Policy | None` (None when
the route does not enable it). `CHAIN_ORDER` is the only place that knows how they line
up; policies never import each other.
"""

from __future__ import annotations

from sidecar.chain import Policy
from sidecar.config import RouteConfig
from sidecar.policies import body_limit, idempotency, tracing
from sidecar.policies.base import PolicyDeps, PolicyFactory, PolicyState

__all__ = ["CHAIN_ORDER", "PolicyDeps", "PolicyFactory", "PolicyState", "build_policies"]

# Outermost first. Tracing wraps everything so every answer, the sidecar's own included,
# carries the trace headers; the body limit refuses oversized bodies before any policy
# spends a store round trip on them; idempotency answers replays, conflicts and mismatches
# before anything is charged. Quota/breaker admission and retries go after it.
CHAIN_ORDER: tuple[PolicyFactory, ...] = (tracing.build, body_limit.build, idempotency.build)


def build_policies(route: RouteConfig, deps: PolicyDeps) -> list[Policy]:
    """The policies this route enables, in chain order (made once, at config load)."""
    policies = []
    for factory in CHAIN_ORDER:
        policy = factory(route, deps)
        if policy is not None:
            policies.append(policy)
    return policies
