"""What every policy module builds on: its injected dependencies and its factory's shape."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

from sidecar.background import BackgroundTasks
from sidecar.chain import Policy
from sidecar.config import RouteConfig, SidecarConfig
from sidecar.identity import IdentityResolver
from sidecar.logs import LogSink
from sidecar.metrics import Metrics
from sidecar.spans import SpanExporter
from sidecar.store import StateStore

T = TypeVar("T")


class PolicyState:
    """Policy state that outlives a config generation, keyed by policy and route name.

    A breaker's window or a bulkhead's semaphore must not be reset by every ConfigMap
    change, nor doubled while the old and new generations overlap: a factory asks here
    instead of creating its state, and gets the object the previous generation used as
    long as the settings it depends on are unchanged (changed settings start afresh).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[Hashable, object]] = {}

    def get(self, policy: str, route: str, settings: Hashable, create: Callable[[], T]) -> T:
        key = (policy, route)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == settings:
            return cast(T, entry[1])
        value = create()
        self._entries[key] = (settings, value)
        return value

    def retain(self, routes: Iterable[str]) -> None:
        """Forget the state of routes the new config no longer has (after a reload)."""
        keep = set(routes)
        for key in [key for key in self._entries if key[1] not in keep]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


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
    # Per-route state that survives reloads (breaker windows, bulkhead semaphores).
    state: PolicyState
    # Who is calling (identity headers or a verified JWT), for policies that scope by it.
    identity: IdentityResolver


# Returns None when the route does not enable the policy.
PolicyFactory = Callable[[RouteConfig, PolicyDeps], Policy | None]
