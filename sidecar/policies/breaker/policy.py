"""The circuit breaker on a route's chain (docs/breakers.md).

Per request: find the breaker (the route's, or the route's and organisation's), ask its
mirror whether the request may pass (no store round trip, ever), and either answer with
the fallback or forward and record the outcome. It sits inside the retry policy, so it
sees every attempt, and an open breaker stops the retries too.

What counts: an app status listed in `failures` is a failure, any other app status a
success; a failure of the sidecar to reach or hear the app counts by its kind
(connect_error, timeout, reset, stream) when listed, and is ignored when not. Answers the
sidecar makes itself without the app (a 413, a client that hung up) are ignored. A call
whose response headers took `slow_call.threshold` or longer is slow. A streamed success is
recorded once its body is complete: a body that breaks off midway is a `stream` failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from sidecar import errors
from sidecar.chain import (
    Failure,
    Next,
    Origin,
    Outcome,
    Policy,
    ProxyRequest,
    ProxyResponse,
    SpanEvent,
)
from sidecar.config import BreakerConfig, RouteConfig
from sidecar.identity import IdentityRejected
from sidecar.policies.base import PolicyDeps
from sidecar.policies.breaker.machine import (
    Breaker,
    CallResult,
    State,
    Transition,
    Verdict,
    unix_now,
)
from sidecar.policies.breaker.sync import Syncer
from sidecar.store import MemoryStore
from sidecar.upstream import Forwarder

_ATTEMPT = web.RequestKey("sidecar.breaker_attempt", object)
# With scope: route_org, a request without an organisation shares this breaker.
_NO_ORG = "-"


@dataclass(slots=True)
class _Attempt:
    """A streamed success whose verdict waits for the end of its body."""

    breaker: Breaker
    probe: bool
    slow: bool
    done: bool = False


@dataclass(slots=True)
class BreakerGroup:
    """A route's breakers and their sync loop: process state kept across reloads."""

    route: str
    syncer: Syncer
    config: BreakerConfig
    # The alternate upstream a `fallback: {upstream: ...}` forwards to.
    fallback: Forwarder | None = None
    breakers: dict[str, Breaker] = field(default_factory=dict)

    async def aclose(self) -> None:
        await self.syncer.aclose()
        if self.fallback is not None:
            await self.fallback.close()


class BreakerPolicy:
    def __init__(self, config: BreakerConfig, route: RouteConfig, deps: PolicyDeps) -> None:
        self._config = config
        self._route = route.name
        self._log = deps.log
        self._identity = deps.identity if config.scope == "route_org" else None
        self._failures = config.failures
        self._slow_after = config.slow_call.threshold if config.slow_call else math.inf
        metrics = deps.metrics
        self._rejected = metrics.circuit_rejected.labels(route.name)
        settings = (
            config.scope,
            config.window,
            config.shared,
            config.flush_interval,
            config.fallback.upstream,
        )
        self._group = deps.state.get(
            "breaker", route.name, settings, lambda: self._new_group(route, deps)
        )
        # A reload with new thresholds applies them to the breakers it keeps.
        self._group.config = config
        for breaker in self._group.breakers.values():
            breaker.config = config
        self._static_fallback = self._fallback_for(config, route)
        forwarder = self._group.fallback
        self._forward_fallback = forwarder.for_route(route) if forwarder else None
        with contextlib.suppress(RuntimeError):  # no event loop yet: the first request starts it
            asyncio.get_running_loop()
            self._group.syncer.start()

    def _new_group(self, route: RouteConfig, deps: PolicyDeps) -> BreakerGroup:
        config = self._config
        degraded = deps.metrics.circuit_degraded.labels(route.name)
        transitions = deps.metrics.circuit_transitions
        state_gauge = deps.metrics.circuit_state.labels(route.name)
        log = deps.log
        breakers: dict[str, Breaker] = {}

        def on_transition(breaker: Breaker, transition: Transition) -> None:
            transitions.labels(route.name, transition.before.name.lower(),
                               transition.after.name.lower()).inc()  # fmt: skip
            log.event("breaker.transition", "warning", **_fields(route.name, transition))
            # With one breaker per organisation, the gauge shows the worst of them.
            state_gauge.set(max((b.state for b in breakers.values()), default=State.CLOSED))

        def on_degraded(is_degraded: bool) -> None:
            degraded.set(1 if is_degraded else 0)
            event = "breaker.store_degraded" if is_degraded else "breaker.store_recovered"
            log.event(event, "warning" if is_degraded else "info", route=route.name)

        syncer = Syncer(
            config.flush_interval,
            deps.store,
            MemoryStore(),
            on_transition,
            on_degraded,
            shared=config.shared,
            on_error=lambda error: log.event(
                "breaker.sync_failed", "error", route=route.name, error=repr(error)
            ),
        )
        upstream = config.fallback.upstream
        group = BreakerGroup(
            route.name, syncer, config, Forwarder(upstream) if upstream else None, breakers
        )
        syncer.breakers = breakers
        if config.scope == "route":
            # It exists before any request, so it learns the shared state (a forced open)
            # from the first sync on.
            group.breakers[route.name] = Breaker.create(route.name, config)
        return group

    def _breaker_for(self, request: ProxyRequest) -> Breaker:
        name = self._route
        if self._identity is not None:
            try:
                org = self._identity.resolve(request.raw.headers).org or _NO_ORG
            except IdentityRejected:
                org = _NO_ORG
            name = f"{self._route}/{org}"
        breakers = self._group.breakers
        breaker = breakers.get(name)
        if breaker is None:
            breaker = breakers[name] = Breaker.create(name, self._config)
        return breaker

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        syncer = self._group.syncer
        syncer.start()
        breaker = self._breaker_for(request)
        self._settle_previous(request)
        now = unix_now()
        verdict = breaker.admit(now)
        if breaker.urgent:
            syncer.wake()
        if verdict is Verdict.REJECT:
            self._rejected.inc()
            return await self._fallback(request, breaker, now)
        probe = verdict is Verdict.PROBE
        started = time.perf_counter()
        response = await call_next(request)
        self._record(request, breaker, response, probe, time.perf_counter() - started)
        return response

    # -- outcomes ------------------------------------------------------------------------

    def _record(
        self,
        request: ProxyRequest,
        breaker: Breaker,
        response: ProxyResponse,
        probe: bool,
        elapsed: float,
    ) -> None:
        seconds = request.upstream_seconds
        slow = (seconds if seconds is not None else elapsed) >= self._slow_after
        failure = response.failure
        if failure is not None:
            name = Failure.CONFIG_NAMES.get(failure.kind)
            listed = name is not None and name in self._failures
            result = CallResult.FAILURE if listed else CallResult.IGNORED
            slow = slow or failure.kind == Failure.TIMEOUT
        elif response.origin is not Origin.APP:
            result = CallResult.IGNORED
        elif response.status in self._failures:
            result = CallResult.FAILURE
        elif response.body is not None and not isinstance(response.body, bytes):
            # A streamed success: its verdict comes with the end of the body.
            attempt = _Attempt(breaker, probe, slow)
            if _ATTEMPT not in request.raw:
                request.add_finisher(self._finisher(request))
            request.raw[_ATTEMPT] = attempt
            return
        else:
            result = CallResult.SUCCESS
        self._note(request, breaker, result, slow, probe)

    def _note(
        self,
        request: ProxyRequest | None,
        breaker: Breaker,
        result: CallResult,
        slow: bool,
        probe: bool,
    ) -> None:
        transition = breaker.record(unix_now(), result, slow, probe)
        if breaker.urgent:
            self._group.syncer.wake()
        if transition is not None:
            self._group.syncer.on_transition(breaker, transition)
            if request is not None and request.span_events is not None:
                request.span_events.append(_span_event(self._route, transition))

    def _settle_previous(self, request: ProxyRequest) -> None:
        """A retry after a streamed success the retry policy set aside: the app answered."""
        attempt = request.raw.get(_ATTEMPT)
        if isinstance(attempt, _Attempt) and not attempt.done:
            attempt.done = True
            self._note(request, attempt.breaker, CallResult.SUCCESS, attempt.slow, attempt.probe)

    def _finisher(self, request: ProxyRequest) -> Callable[[Outcome], None]:
        def finish(outcome: Outcome) -> None:
            attempt = request.raw.get(_ATTEMPT)
            if not isinstance(attempt, _Attempt) or attempt.done:
                return
            attempt.done = True
            if outcome.failure == Failure.STREAM:
                listed = "stream" in self._failures
                result = CallResult.FAILURE if listed else CallResult.IGNORED
            elif outcome.failure == Failure.NONE:
                result = CallResult.SUCCESS
            else:
                result = CallResult.IGNORED  # the client left: the app's part is unknown
            self._note(None, attempt.breaker, result, attempt.slow, attempt.probe)

        return finish

    # -- the fallback ----------------------------------------------------------------------

    def _fallback_for(
        self, config: BreakerConfig, route: RouteConfig
    ) -> Callable[[ProxyRequest, Breaker, float], ProxyResponse] | None:
        fallback = config.fallback
        if fallback.upstream is not None:
            return None  # forwarded: see _fallback
        if fallback.static:
            status = fallback.status
            assert status is not None
            body = fallback.body.encode()
            headers = tuple(fallback.headers.items())

            def static(request: ProxyRequest, breaker: Breaker, now: float) -> ProxyResponse:
                response_headers: CIMultiDict[str] = CIMultiDict(headers)
                return ProxyResponse(
                    status=status,
                    headers=response_headers,
                    body=body if status not in (204, 304) else None,
                    origin=Origin.FALLBACK,
                )

            return static

        def problem(request: ProxyRequest, breaker: Breaker, now: float) -> ProxyResponse:
            retry_after = breaker.retry_after(now)
            response = errors.problem_for(
                errors.CIRCUIT_OPEN,
                request,
                f"the circuit breaker of route {self._route!r} is {_condition(breaker, now)};"
                f" retry in {retry_after}s",
                None,
                route=self._route,
            )
            response.origin = Origin.FALLBACK
            response.headers["Retry-After"] = str(retry_after)
            return response

        return problem

    async def _fallback(self, request: ProxyRequest, breaker: Breaker, now: float) -> ProxyResponse:
        self._log.request_event(
            request, "breaker.rejected", route=self._route, state=breaker.state.name.lower()
        )
        if self._static_fallback is not None:
            return self._static_fallback(request, breaker, now)
        assert self._forward_fallback is not None
        response = await self._forward_fallback(request)
        response.origin = Origin.FALLBACK
        return response


def _condition(breaker: Breaker, now: float) -> str:
    shared = breaker.shared
    if shared.forced == "open":
        return "forced open"
    if shared.state is State.CLOSED:
        return "ramping traffic back after a recovery"
    return shared.state.name.lower().replace("_", "-")


def _fields(route: str, transition: Transition) -> dict[str, object]:
    fields: dict[str, object] = {
        "route": route,
        "breaker": transition.name,
        "from": transition.before.name.lower(),
        "to": transition.after.name.lower(),
        "reason": transition.reason,
        "calls": transition.total,
        "failures": transition.failures,
        "slow": transition.slow,
    }
    if transition.after is State.OPEN:
        fields["open_seconds"] = round(max(0.0, transition.until - unix_now()), 3)
    return fields


def _span_event(route: str, transition: Transition) -> SpanEvent:
    attributes = tuple(
        (f"breaker.{key}", value)
        for key, value in _fields(route, transition).items()
        if isinstance(value, str | int | float)
    )
    return SpanEvent(f"breaker.{transition.after.name.lower()}", time.time_ns(), attributes)


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    if route.circuit_breaker is None:
        return None
    return BreakerPolicy(route.circuit_breaker, route, deps)
