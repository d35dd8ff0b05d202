"""The policies a route's chain is built from, in the order they run.

Each policy is one module exposing a factory `build(route, deps) -> Policy | None` (None when
the route does not enable it). `CHAIN_ORDER` is the only place that knows how they line
up; policies never import each other.
"""

from __future__ import annotations

from sidecar.chain import Policy
from sidecar.config import RouteConfig
from sidecar.policies import body_limit, bulkhead, idempotency, retry, tracing
from sidecar.policies.base import PolicyDeps, PolicyFactory, PolicyState
from sidecar.policies.breaker import policy as breaker
from sidecar.policies.quota import policy as quota

__all__ = ["CHAIN_ORDER", "PolicyDeps", "PolicyFactory", "PolicyState", "build_policies"]

# Outermost first. Tracing wraps everything so every answer, the sidecar's own included,
# carries the trace headers; the body limit refuses oversized bodies before any policy
# spends a store round trip on them; quotas refuse before the body is read (idempotency
# reads it to fingerprint it), so a refused client never uploads it; a replay or another
# answer of idempotency's that never reaches the app is refunded by the quota policy once
# the response is sent. Then the bulkhead (a replay never takes a slot), retries, and the
# breaker inside them: it sees every attempt, and once open it stops the retries too; its
# fallback is an answer of the sidecar, which idempotency never stores as the app's.
CHAIN_ORDER: tuple[PolicyFactory, ...] = (
    tracing.build,
    body_limit.build,
    quota.build,
    idempotency.build,
    bulkhead.build,
    retry.build,
    breaker.build,
)


def build_policies(route: RouteConfig, deps: PolicyDeps) -> list[Policy]:
    """The policies this route enables, in chain order (made once, at config load)."""
    policies = []
    for factory in CHAIN_ORDER:
        policy = factory(route, deps)
        if policy is not None:
            policies.append(policy)
    return policies
