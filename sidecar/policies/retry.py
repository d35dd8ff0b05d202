"""Retries of a failed attempt (docs/breakers.md#retries).

An attempt is retried when its answer is listed in `on` (an app status, or a failure
kind: connect_error, timeout, reset), and only when resending is harmless:
- no byte of it reached the app (a connect failure, no free pooled connection), or
- its method is idempotent (RFC 9110 §9.2.2), or
- a policy made it so (`retry_safe`: idempotency holds the key's claim);
and never when its body was streamed (it is gone) or past the request's deadline. Waits
are exponential with full jitter (AWS's "full jitter": a random delay up to
min(max_backoff, backoff * 2^n)). A budget caps retries at `budget` * the route's
requests over `budget_window` (at least `min_retries`), so retries cannot multiply an
outage (Envoy's retry_budget).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.chain import Failure, Next, Origin, Policy, ProxyRequest, ProxyResponse
from sidecar.config import RetryConfig, RouteConfig
from sidecar.policies.base import PolicyDeps

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# The failure kinds `on` can name ("stream" is refused by the config: a broken stream's
# head has gone to the client); no free pooled connection is as safe as a failed connect.
_KIND_NAMES = {**Failure.CONFIG_NAMES, Failure.POOL: "connect_error"}
_BUCKETS = 10


@dataclass(slots=True)
class RetryBudget:
    """Requests and retries over a rolling window, in ten buckets (kept across reloads)."""

    window: float
    clock: Callable[[], float] = time.monotonic
    _slots: list[int] = field(default_factory=lambda: [-1] * _BUCKETS)
    _counts: list[list[int]] = field(default_factory=lambda: [[0, 0] for _ in range(_BUCKETS)])

    def _bucket(self) -> list[int]:
        number = int(self.clock() / (self.window / _BUCKETS))
        index = number % _BUCKETS
        if self._slots[index] != number:
            self._slots[index] = number
            self._counts[index] = [0, 0]
        return self._counts[index]

    def _sums(self) -> tuple[int, int]:
        number = int(self.clock() / (self.window / _BUCKETS))
        requests = retries = 0
        for held, counts in zip(self._slots, self._counts, strict=True):
            if held > number - _BUCKETS:
                requests += counts[0]
                retries += counts[1]
        return requests, retries

    def request(self) -> None:
        self._bucket()[0] += 1

    def try_retry(self, share: float, minimum: int) -> bool:
        requests, retries = self._sums()
        # Granting this one must keep retries within the cap.
        if retries + 1 > max(minimum, share * requests):
            return False
        self._bucket()[1] += 1
        return True


class RetryPolicy:
    def __init__(self, config: RetryConfig, route: RouteConfig, deps: PolicyDeps) -> None:
        self._config = config
        self._route = route.name
        self._log = deps.log
        metrics = deps.metrics
        self._retries = {
            reason: metrics.retries.labels(route.name, str(reason)) for reason in config.on
        }
        self._exhausted = metrics.retry_budget_exhausted.labels(route.name)
        self._budget = deps.state.get(
            "retry", route.name, config.budget_window, lambda: RetryBudget(config.budget_window)
        )

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        config = self._config
        self._budget.request()
        attempt = 1
        while True:
            if config.per_try_timeout is not None:
                request.attempt_timeout = config.per_try_timeout
            response = await call_next(request)
            reason = self._reason(response)
            if reason is None or attempt >= config.attempts:
                return response
            if not self._may_resend(request, response):
                return response
            ceiling = min(config.max_backoff, config.backoff * 2 ** (attempt - 1))
            delay = random.uniform(0.0, ceiling)
            left = request.time_left()
            if left is not None and left <= delay:
                return response  # the deadline would pass before the next attempt
            if not self._budget.try_retry(config.budget, config.min_retries):
                self._exhausted.inc()
                self._log.request_event(request, "retry.budget_exhausted", route=self._route)
                return response
            await response.aclose()
            self._retries[reason].inc()
            self._log.request_event(
                request, "retry.attempt", route=self._route, attempt=attempt + 1, reason=str(reason)
            )
            await asyncio.sleep(delay)
            attempt += 1

    def _reason(self, response: ProxyResponse) -> int | str | None:
        """What makes this answer retryable (as `on` names it), or None."""
        on = self._config.on
        if response.origin is Origin.FALLBACK:
            return None  # an open breaker's answer: trying again meets the breaker again
        failure = response.failure
        if failure is not None:
            name = _KIND_NAMES.get(failure.kind)
            return name if name in on else None
        if response.origin is Origin.APP and response.status in on:
            return response.status
        return None

    def _may_resend(self, request: ProxyRequest, response: ProxyResponse) -> bool:
        if not request.replayable:
            return False  # a streamed body is gone
        failure = response.failure
        if failure is not None and not failure.request_sent:
            return True
        return request.method in IDEMPOTENT_METHODS or request.retry_safe


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    if route.retry is None or route.retry.attempts <= 1:
        return None
    return RetryPolicy(route.retry, route, deps)
