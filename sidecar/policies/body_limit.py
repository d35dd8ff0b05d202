"""Body limit: a declared Content-Length over the route's max_body is refused at once.

Answered before any byte of the body is read, before `100 Continue` is sent, and before any
later policy spends work on the request. Chunked bodies are counted as they stream (by the
forwarder), since their size is only known at the end.
"""

from __future__ import annotations

from sidecar import errors
from sidecar.chain import Next, Policy, ProxyRequest, ProxyResponse
from sidecar.config import RouteConfig
from sidecar.policies.base import PolicyDeps


class BodyLimitPolicy:
    def __init__(self, limit: int) -> None:
        self._limit = limit

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        declared = request.raw.content_length
        if declared is not None and declared > self._limit:
            return errors.body_too_large(request, self._limit)
        return await call_next(request)


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    return BodyLimitPolicy(route.max_body)
