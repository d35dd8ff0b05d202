"""Quotas and rate limits: each organisation's plan holds exactly, across replicas.

The path of a request on a route with `quotas:`:
1. the caller's organisation (identity headers or a verified JWT); none: 401, or one
   `anonymous` bucket per client address;
2. each limit's cost (fixed, or a header's value within bounds: else 400);
3. max_in_flight: an organisation's excess is refused at once (429), in process;
4. a refusal remembered from earlier (until its Retry-After) answers without the store;
5. one store round trip checks every limit and charges them all or none (GCRA on the
   store's clock for rates, a counter per calendar period for quotas);
6. refused: 429 problem+json naming the violated limits, Retry-After no earlier than the
   request could pass, the RateLimit headers; the request's body is never read;
7. admitted: the response carries RateLimit-Policy and RateLimit; once it is sent, a
   request that never reached the app (a replay, a local refusal, a connect failure)
   and, with `count: success`, one that failed, is refunded off the request path.

When the store fails: `local` decides with an in-process limiter at limit / replicas,
`open` lets requests through unchecked, `closed` answers 503; the store is skipped
with back-off and probed by one request at a time until it answers again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict

from sidecar import errors
from sidecar.chain import Failure, Next, Outcome, Policy, ProxyRequest, ProxyResponse
from sidecar.config import QuotaConfig, RouteConfig
from sidecar.identity import IdentityRejected
from sidecar.policies.base import PolicyDeps
from sidecar.policies.quota.periods import PeriodClock
from sidecar.policies.quota.plan import (
    ANONYMOUS,
    Caller,
    Charge,
    Plan,
    overrides_key,
)
from sidecar.policies.quota.scripts import (
    Admission,
    LimitResult,
    admit_call,
    decode_admission,
    refund_call,
)
from sidecar.policies.quota.state import DenialCache, InFlight, RefundQueue, StoreHealth
from sidecar.store import MemoryStore, StateStore, StoreError

DECISIONS = ("allowed", "denied", "shadow_denied")
_FALLBACK_ACTIONS = ("local", "open", "closed")


@dataclass(slots=True)
class _Shared:
    """The policy's process state, kept across config reloads while its limits are the same."""

    health: StoreHealth
    denials: DenialCache
    in_flight: InFlight
    periods: PeriodClock
    # The in-process limiter `on_store_error: local` falls back to.
    local: MemoryStore
    refunds: RefundQueue
    local_refunds: RefundQueue


class QuotaPolicy:
    def __init__(
        self,
        config: QuotaConfig,
        route: RouteConfig,
        deps: PolicyDeps,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._route = route.name
        self._plan = Plan(config, config.namespace or route.name)
        self._store = deps.store
        self._identity = deps.identity
        self._log = deps.log
        self._clock = clock
        self._headers_wanted = config.draft_headers or config.legacy_headers
        metrics = deps.metrics
        self._decisions = {
            (limit.name, decision): metrics.ratelimit_decisions.labels(
                route.name, limit.name, decision
            )
            for limit in self._plan.limits
            for decision in DECISIONS
        }
        self._near = {
            limit.name: metrics.ratelimit_near_limit.labels(route.name, limit.name)
            for limit in self._plan.limits
        }
        self._in_flight_denied = metrics.ratelimit_decisions.labels(
            route.name, "max_in_flight", "denied"
        )
        self._fallbacks = {
            action: metrics.ratelimit_store_fallbacks.labels(route.name, action)
            for action in _FALLBACK_ACTIONS
        }
        self._usage = metrics.quota_usage_ratio
        self._refunds_queued = metrics.ratelimit_refunds.labels(route.name, "queued")
        self._report_orgs = frozenset(config.report_orgs)
        settings = (self._plan.namespace, config.limits, config.replicas)
        self._shared = deps.state.get(
            "quota", route.name, settings, lambda: _new_shared(route.name, deps)
        )

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        caller = self._caller(request)
        if isinstance(caller, ProxyResponse):
            return caller
        costs = self._costs(request) if self._plan.has_cost_header else _NO_COSTS
        if isinstance(costs, ProxyResponse):
            return costs
        cap = self._config.max_in_flight
        if cap is not None:
            in_flight = self._shared.in_flight
            if not in_flight.enter(caller.org, cap):
                return self._too_many_in_flight(request)
            # Finishers run once whatever happens to the request, refusals included.
            request.add_finisher(lambda outcome: in_flight.leave(caller.org))
        return await self._decide(request, call_next, caller, costs)

    # -- who and how much ------------------------------------------------------------

    def _caller(self, request: ProxyRequest) -> Caller | ProxyResponse:
        try:
            identity = self._identity.resolve(request.raw.headers)
        except IdentityRejected as rejected:
            return errors.identity_invalid(request, rejected.reason)
        if identity.org:
            return Caller(identity.org, identity.user)
        if self._config.anonymous == "limit":
            return Caller(f"{ANONYMOUS}:{request.client_ip}", identity.user, anonymous=True)
        response = errors.problem_for(
            errors.ORGANISATION_UNKNOWN,
            request,
            "requests on this route are limited per organisation, and this one names none",
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _costs(self, request: ProxyRequest) -> dict[str, int] | ProxyResponse:
        costs = {}
        headers = request.raw.headers
        for limit in self._plan.limits:
            cost = limit.config.cost
            if cost.header is None:
                continue
            raw = headers.get(cost.header)
            if raw is None:
                continue
            value = raw.strip()
            if not (value.isascii() and value.isdigit()) or not (
                cost.minimum <= int(value) <= cost.maximum
            ):
                return errors.problem_for(
                    errors.QUOTA_COST_INVALID,
                    request,
                    f"{cost.header} must be an integer from {cost.minimum} to {cost.maximum}",
                )
            costs[limit.name] = int(value)
        return costs

    # -- the decision ----------------------------------------------------------------

    async def _decide(
        self, request: ProxyRequest, call_next: Next, caller: Caller, costs: Mapping[str, int]
    ) -> ProxyResponse:
        shared = self._shared
        now_ms = int(self._clock() * 1000)
        charges: Sequence[Charge] = self._plan.charges(caller, costs, now_ms, shared.periods)
        loop_now = asyncio.get_running_loop().time()
        cached = self._cached_refusal(charges, loop_now)
        if cached is not None:
            return self._refused(request, charges, cached, remembered=True)
        admission, store, charges = await self._admit(request, caller, costs, now_ms, charges)
        if admission is None:  # the store failed and the route fails open or closed
            if self._config.on_store_error == "closed":
                return self._unavailable(request)
            return await call_next(request)
        self._count(request, caller, charges, admission)
        if not admission.allowed:
            # Only the store's refusals: the local fallback is stricter (limit / replicas),
            # and its refusal must not outlive the outage it was made in.
            if store is self._store:
                self._remember(charges, admission, loop_now)
            return self._refused(request, charges, admission)
        refunds = shared.refunds if store is self._store else shared.local_refunds
        request.add_finisher(self._finisher(charges, admission, refunds))
        response = await call_next(request)
        if self._headers_wanted:
            self._add_headers(response.headers, charges, admission.limits)
        return response

    async def _admit(
        self,
        request: ProxyRequest,
        caller: Caller,
        costs: Mapping[str, int],
        now_ms: int,
        charges: Sequence[Charge],
    ) -> tuple[Admission | None, StateStore, Sequence[Charge]]:
        """The store's decision, or the fallback's (with the charges it was made on)."""
        shared = self._shared
        count = len(charges)
        if shared.health.should_try():
            call = admit_call(overrides_key(caller.org), [charge.args for charge in charges])
            try:
                replies = await self._store.execute([call])
                admission = decode_admission(replies[0], count)
            except asyncio.CancelledError:
                shared.health.abandoned()  # the client left: the next request probes
                raise
            except (StoreError, ValueError) as error:
                shared.health.failed()
                kind = error.kind if isinstance(error, StoreError) else "malformed_reply"
                self._log.request_event(
                    request,
                    "quota.store_error",
                    level="warning",
                    route=self._route,
                    kind=kind,
                    action=self._config.on_store_error,
                )
            else:
                shared.health.answered()
                return admission, self._store, charges
        action = self._config.on_store_error
        self._fallbacks[action].inc()
        if action != "local":
            return None, self._store, charges
        local = self._plan.charges(
            caller, costs, now_ms, shared.periods, divide_by=self._config.replicas
        )
        call = admit_call(overrides_key(caller.org), [charge.args for charge in local])
        replies = await shared.local.execute([call])
        return decode_admission(replies[0], count), shared.local, local

    # -- what was decided ------------------------------------------------------------

    def _count(
        self,
        request: ProxyRequest,
        caller: Caller,
        charges: Sequence[Charge],
        admission: Admission,
    ) -> None:
        """Decisions per limit, near-limit crossings, and the reported orgs' usage."""
        for charge, result in zip(charges, admission.limits, strict=True):
            name = charge.limit.name
            if not result.ok:
                decision = "shadow_denied" if charge.limit.shadow else "denied"
                self._decisions[(name, decision)].inc()
                if charge.limit.shadow:
                    self._log.request_event(
                        request, "quota.shadow_denied", route=self._route, limit=name
                    )
                continue
            if not admission.allowed:
                continue  # this limit had room, but another refused: nothing was charged
            self._decisions[(name, "allowed")].inc()
            self._check_near(request, charge, result)
            if caller.org in self._report_orgs and result.limit > 0:
                used = (result.limit - result.remaining) / result.limit
                self._usage.labels(self._route, name, caller.org).set(used)

    def _check_near(self, request: ProxyRequest, charge: Charge, result: LimitResult) -> None:
        threshold = self._config.near_limit_ratio * result.limit
        used_after = result.limit - result.remaining
        used_before = used_after - charge.args.cost
        if used_before < threshold <= used_after:
            self._near[charge.limit.name].inc()
            self._log.request_event(
                request,
                "quota.near_limit",
                route=self._route,
                limit=charge.limit.name,
                used=used_after,
                of=result.limit,
            )

    def _cached_refusal(self, charges: Sequence[Charge], now: float) -> Admission | None:
        """A refusal known from an earlier request, as if the store had just said it."""
        denials = self._shared.denials
        if not len(denials):
            return None
        waits: list[float | None] = []
        for charge in charges:
            if charge.limit.shadow:
                waits.append(None)
                continue
            waits.append(denials.refused(charge.args.key, charge.args.cost, now))
        if all(wait is None for wait in waits):
            return None
        results = tuple(
            LimitResult(True, charge.args.limit, 0, 0, 0)
            if wait is None
            else LimitResult(
                False, charge.args.limit, 0, math.ceil(wait * 1000), math.ceil(wait * 1000)
            )
            for charge, wait in zip(charges, waits, strict=True)
        )
        return Admission(False, 0, results)

    def _remember(self, charges: Sequence[Charge], admission: Admission, now: float) -> None:
        for charge, result in zip(charges, admission.limits, strict=True):
            if not result.ok and not charge.limit.shadow and result.retry_after_ms > 0:
                until = now + result.retry_after_ms / 1000
                self._shared.denials.remember(charge.args.key, charge.args.cost, until, now)

    def _finisher(
        self,
        charges: Sequence[Charge],
        admission: Admission,
        queue: RefundQueue,
    ) -> Callable[[Outcome], None]:
        def finish(outcome: Outcome) -> None:
            never_reached = not outcome.request_sent
            broke_off = outcome.failure != Failure.NONE
            refunds = [
                (charge.args.kind, charge.args.key, charge.args.cost)
                for charge, result in zip(charges, admission.limits, strict=True)
                if result.ok
                and charge.args.cost > 0
                and (never_reached or charge.limit.refunds(outcome.status, broke_off))
            ]
            if refunds:
                self._refunds_queued.inc(len(refunds))
                queue.add(refunds)

        return finish

    # -- answers ---------------------------------------------------------------------

    def _refused(
        self,
        request: ProxyRequest,
        charges: Sequence[Charge],
        admission: Admission,
        remembered: bool = False,
    ) -> ProxyResponse:
        violated = [
            (charge, result)
            for charge, result in zip(charges, admission.limits, strict=True)
            if not result.ok and not charge.limit.shadow
        ]
        names = [charge.limit.name for charge, _ in violated]
        # The request passes only once every violated limit has room again.
        wait_ms = max(result.retry_after_ms for _, result in violated)
        retry_after = max(1, math.ceil(wait_ms / 1000))
        if remembered:
            for charge, _ in violated:
                self._decisions[(charge.limit.name, "denied")].inc()
        self._log.request_event(
            request,
            "quota.denied",
            route=self._route,
            limits=",".join(names),
            retry_after=retry_after,
        )
        response = errors.problem_for(
            errors.QUOTA_EXCEEDED,
            request,
            f"{', '.join(names)} exhausted; retry in {retry_after}s",
            None,
            **{"violated-policies": names},
        )
        response.headers["Retry-After"] = str(retry_after)
        if self._headers_wanted:
            self._add_headers(response.headers, charges, admission.limits, refused=True)
        return response

    def _too_many_in_flight(self, request: ProxyRequest) -> ProxyResponse:
        self._in_flight_denied.inc()
        self._log.request_event(request, "quota.in_flight_denied", route=self._route)
        response = errors.problem_for(
            errors.QUOTA_IN_FLIGHT,
            request,
            f"at most {self._config.max_in_flight} requests of one organisation at once here",
        )
        response.headers["Retry-After"] = "1"
        return response

    def _unavailable(self, request: ProxyRequest) -> ProxyResponse:
        response = errors.problem_for(
            errors.QUOTA_UNAVAILABLE,
            request,
            "the limits store did not answer; nothing was forwarded",
        )
        response.headers["Retry-After"] = "1"
        return response

    def _add_headers(
        self,
        headers: CIMultiDict[str],
        charges: Sequence[Charge],
        results: Sequence[LimitResult],
        refused: bool = False,
    ) -> None:
        shown = [
            (charge, result)
            for charge, result in zip(charges, results, strict=True)
            if not charge.limit.shadow
        ]
        if not shown:
            return
        tightest = _most_restrictive(shown, refused)
        charge, result = tightest
        seconds = _reset_seconds(result, refused)
        if self._config.draft_headers:
            headers["RateLimit-Policy"] = ", ".join(
                f"{c.limit.token};q={r.limit};w={_policy_window(c)}" for c, r in shown
            )
            headers["RateLimit"] = f"{charge.limit.token};r={result.remaining};t={seconds}"
        if self._config.legacy_headers:
            headers["X-RateLimit-Limit"] = str(result.limit)
            headers["X-RateLimit-Remaining"] = str(result.remaining)
            headers["X-RateLimit-Reset"] = str(seconds)


_NO_COSTS: Mapping[str, int] = {}


def _policy_window(charge: Charge) -> int:
    if charge.period is not None:
        return charge.period.seconds
    return charge.limit.policy_window


def _reset_seconds(result: LimitResult, refused: bool) -> int:
    millis = result.retry_after_ms if refused and not result.ok else result.reset_ms
    return max(0, math.ceil(millis / 1000))


def _most_restrictive(
    shown: Sequence[tuple[Charge, LimitResult]], refused: bool
) -> tuple[Charge, LimitResult]:
    """The limit the RateLimit field reports: on a refusal, the violated one that holds the
    request back longest; otherwise the one with the least left (the later reset on a tie)."""
    if refused:
        violated = [item for item in shown if not item[1].ok]
        if violated:
            return max(violated, key=lambda item: item[1].retry_after_ms)
    return min(shown, key=lambda item: (item[1].remaining, -item[1].reset_ms))


def _new_shared(route: str, deps: PolicyDeps) -> _Shared:
    log, metrics = deps.log, deps.metrics
    degraded = metrics.ratelimit_degraded.labels(route)
    refunds_dropped = metrics.ratelimit_refunds.labels(route, "dropped")

    def on_change(is_degraded: bool) -> None:
        degraded.set(1 if is_degraded else 0)
        event = "quota.degraded" if is_degraded else "quota.recovered"
        log.event(event, "warning" if is_degraded else "info", route=route)

    local = MemoryStore()
    return _Shared(
        health=StoreHealth(on_change),
        denials=DenialCache(),
        in_flight=InFlight(),
        periods=PeriodClock(),
        local=local,
        refunds=RefundQueue(deps.store, refund_call, deps.background.spawn, refunds_dropped.inc),
        local_refunds=RefundQueue(local, refund_call, deps.background.spawn, refunds_dropped.inc),
    )


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    if route.quotas is None:
        return None
    return QuotaPolicy(route.quotas, route, deps)
