"""The policies a route's chain is built from, in the order they run.

Each policy is one module exposing a factory `build(route, deps) -> Policy | None` (None when
the route does not enable it). `CHAIN_ORDER` is the only place that knows how they line
up; policies never import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sidecar.chain import Policy
from sidecar.config import RouteConfig, SidecarConfig
from sidecar.logs import LogSink
from sidecar.metrics import Metrics
from sidecar.store import StateStore


@dataclass(frozen=True, slots=True)
class PolicyDeps:
    """What a policy factory may use: shared, long-lived objects, injected."""

    config: SidecarConfig
    store: StateStore
    metrics: Metrics
    log: LogSink


PolicyFactory = Callable[[RouteConfig, PolicyDeps], Policy | None]

# Outermost first: tracing, identity, idempotency lookup, quota/breaker admission,
# idempotency claim, retry/timeout next to the forwarder. Empty until the policies land.
CHAIN_ORDER: tuple[PolicyFactory, ...] = ()


def build_policies(route: RouteConfig, deps: PolicyDeps) -> list[Policy]:
    """The policies this route enables, in chain order (made once, at config load)."""
    policies = []
    for factory in CHAIN_ORDER:
        policy = factory(route, deps)
        if policy is not None:
            policies.append(policy)
    return policies
