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
        # Replaced or forgotten state that runs something (a sync loop): closed later.
        self._retired: list[object] = []

    def get(self, policy: str, route: str, settings: Hashable, create: Callable[[], T]) -> T:
        key = (policy, route)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == settings:
            return cast(T, entry[1])
        if entry is not None:
            self._retired.append(entry[1])
        value = create()
        self._entries[key] = (settings, value)
        return value

    def values(self, policy: str) -> list[object]:
        """The current state objects of one policy, one per route (for the admin API)."""
        return [value for (name, _), (_, value) in self._entries.items() if name == policy]

    def retain(self, routes: Iterable[str]) -> None:
        """Forget the state of routes the new config no longer has (after a reload)."""
        keep = set(routes)
        for key in [key for key in self._entries if key[1] not in keep]:
            self._retired.append(self._entries.pop(key)[1])

    async def close_retired(self) -> None:
        """Stop what replaced or forgotten state still runs (objects with `aclose`)."""
        retired, self._retired = self._retired, []
        for value in retired:
            close = getattr(value, "aclose", None)
            if close is not None:
                await close()

    async def aclose(self) -> None:
        """At shutdown: stop what every state object runs."""
        self._retired.extend(value for _, value in self._entries.values())
        self._entries.clear()
        await self.close_retired()

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
