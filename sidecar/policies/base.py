"""What every policy module builds on: its injected dependencies and its factory's shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sidecar.background import BackgroundTasks
from sidecar.chain import Policy
from sidecar.config import RouteConfig, SidecarConfig
from sidecar.logs import LogSink
from sidecar.metrics import Metrics
from sidecar.spans import SpanExporter
from sidecar.store import StateStore


@dataclass(frozen=True, slots=True)
class PolicyDeps:
    """Shared, long-lived objects a policy factory may use, injected."""

    config: SidecarConfig
    store: StateStore
    metrics: Metrics
    log: LogSink
    spans: SpanExporter | None
    # Work that must outlive its request (store writes after a client hung up).
    background: BackgroundTasks


# Returns None when the route does not enable the policy.
PolicyFactory = Callable[[RouteConfig, PolicyDeps], Policy | None]
