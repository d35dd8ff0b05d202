"""The sidecar's own error responses: RFC 9457 problem details with stable types.

Every error the sidecar answers by itself is one `Problem` from this catalogue, so the
`type` URIs stay stable and documented (docs/errors.md lists them all).
"""

from __future__ import annotations

import aiohttp
import orjson
from multidict import CIMultiDict

from sidecar.chain import Failure, Origin, Problem, ProxyRequest, ProxyResponse, UpstreamFailure

PROBLEM_CONTENT_TYPE = "application/problem+json"

BAD_REQUEST = Problem("bad-request", 400, "The request could not be understood")
ROUTE_NOT_FOUND = Problem("route-not-found", 404, "No route matches this request")
BODY_TOO_LARGE = Problem("body-too-large", 413, "Request body too large")
CLIENT_STALLED = Problem("request-body-timeout", 408, "The client stopped sending the request body")
REQUEST_HEAD_TIMEOUT = Problem(
    "request-head-timeout", 408, "The request head did not arrive in time"
)
TRANSFER_CODING_UNSUPPORTED = Problem(
    "transfer-coding-not-implemented", 501, "The request's transfer coding is not supported"
)
TOO_MANY_CONNECTIONS = Problem(
    "too-many-connections", 503, "The sidecar serves as many connections as it may"
)
INTERNAL_ERROR = Problem("internal-error", 500, "The sidecar failed to handle the request")
UPSTREAM_CONNECT_FAILED = Problem(
    "upstream-connect-failed", 502, "The upstream application could not be reached"
)
UPSTREAM_RESET = Problem(
    "upstream-reset", 502, "The upstream application closed the connection without a response"
)
UPSTREAM_BODY_BROKEN = Problem(
    "upstream-body-broken", 502, "The upstream application's response broke off midway"
)
UPSTREAM_BAD_RESPONSE = Problem(
    "upstream-bad-response", 502, "The upstream application sent an invalid response"
)
UPSTREAM_POOL_EXHAUSTED = Problem(
    "upstream-pool-exhausted", 503, "No upstream connection became free in time"
)
UPSTREAM_TIMEOUT = Problem(
    "upstream-timeout", 504, "The upstream application did not answer in time"
)
IDEMPOTENCY_KEY_MISSING = Problem(
    "idempotency-key-missing", 400, "This request needs an Idempotency-Key header"
)
IDEMPOTENCY_KEY_INVALID = Problem(
    "idempotency-key-invalid", 400, "The Idempotency-Key header is not a valid key"
)
IDEMPOTENCY_KEY_REUSED = Problem(
    "idempotency-key-reused", 422, "This idempotency key was used for a different request"
)
IDEMPOTENCY_IN_PROGRESS = Problem(
    "idempotency-in-progress", 409, "A request with this idempotency key is still in progress"
)
IDEMPOTENCY_NOT_REPLAYABLE = Problem(
    "idempotency-not-replayable",
    409,
    "A request with this idempotency key already ran; its response cannot be replayed",
)
IDEMPOTENCY_UNAVAILABLE = Problem(
    "idempotency-unavailable", 503, "Idempotency records are unavailable; retry later"
)
IDEMPOTENCY_CALLER_UNKNOWN = Problem(
    "idempotency-caller-unknown",
    400,
    "An idempotency key needs a caller identity to be scoped to",
)
IDEMPOTENCY_NOT_ACCEPTABLE = Problem(
    "idempotency-not-acceptable",
    406,
    "The stored response's content coding is not acceptable to this request",
)
IDENTITY_INVALID = Problem(
    "identity-invalid", 401, "The request's identity token could not be verified"
)
ORGANISATION_UNKNOWN = Problem(
    "organisation-unknown", 401, "This route needs to know the caller's organisation"
)
QUOTA_EXCEEDED = Problem("quota-exceeded", 429, "A rate limit or quota is exhausted")
QUOTA_IN_FLIGHT = Problem(
    "too-many-in-flight", 429, "Too many requests of this organisation are under way"
)
QUOTA_COST_INVALID = Problem(
    "quota-cost-invalid", 400, "The request's cost header is not an allowed number"
)
# The IETF rate-limit draft's problem type for a limiter that cannot decide.
QUOTA_UNAVAILABLE = Problem(
    "temporary-reduced-capacity", 503, "Limits cannot be checked right now; retry later"
)
CIRCUIT_OPEN = Problem(
    "circuit-open", 503, "The app is failing; the sidecar answers for it until it recovers"
)
ROUTE_OVERLOADED = Problem("route-overloaded", 503, "Too many requests of this route are under way")

CATALOGUE: tuple[Problem, ...] = (
    BAD_REQUEST,
    ROUTE_NOT_FOUND,
    BODY_TOO_LARGE,
    CLIENT_STALLED,
    REQUEST_HEAD_TIMEOUT,
    TRANSFER_CODING_UNSUPPORTED,
    TOO_MANY_CONNECTIONS,
    INTERNAL_ERROR,
    UPSTREAM_CONNECT_FAILED,
    UPSTREAM_RESET,
    UPSTREAM_BODY_BROKEN,
    UPSTREAM_BAD_RESPONSE,
    UPSTREAM_POOL_EXHAUSTED,
    UPSTREAM_TIMEOUT,
    IDEMPOTENCY_KEY_MISSING,
    IDEMPOTENCY_KEY_INVALID,
    IDEMPOTENCY_KEY_REUSED,
    IDEMPOTENCY_IN_PROGRESS,
    IDEMPOTENCY_NOT_REPLAYABLE,
    IDEMPOTENCY_UNAVAILABLE,
    IDEMPOTENCY_CALLER_UNKNOWN,
    IDEMPOTENCY_NOT_ACCEPTABLE,
    IDENTITY_INVALID,
    ORGANISATION_UNKNOWN,
    QUOTA_EXCEEDED,
    QUOTA_IN_FLIGHT,
    QUOTA_COST_INVALID,
    QUOTA_UNAVAILABLE,
    CIRCUIT_OPEN,
    ROUTE_OVERLOADED,
)


def problem_for(
    problem: Problem,
    request: ProxyRequest,
    detail: str | None = None,
    status: int | None = None,
    **members: object,
) -> ProxyResponse:
    """The problem response to `request`, with its request and trace ids."""
    if request.trace_id is not None:
        members["trace_id"] = request.trace_id
    return problem_response(problem, request.request_id, detail, status=status, members=members)


def problem_response(
    problem: Problem,
    request_id: str,
    detail: str | None = None,
    *,
    status: int | None = None,
    members: dict[str, object] | None = None,
) -> ProxyResponse:
    """Build the problem+json response; `members` become extension members of the body.

    `status` overrides the problem's usual status where the code must follow another
    party (a refused WebSocket upgrade keeps the app's own status).
    """
    status = status or problem.status
    body: dict[str, object] = {"type": problem.type, "title": problem.title, "status": status}
    if detail is not None:
        body["detail"] = detail
    body["request_id"] = request_id
    if members:
        body.update(members)
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = PROBLEM_CONTENT_TYPE
    # Our own answers must never be cached by an intermediary as if they came from the app.
    headers["Cache-Control"] = "no-store"
    return ProxyResponse(
        status=status, headers=headers, body=orjson.dumps(body), origin=Origin.SIDECAR
    )


def failure_response(request: ProxyRequest, failure: UpstreamFailure) -> ProxyResponse:
    """The problem answer to an upstream failure, tagged with it for metrics and policies."""
    response = problem_for(failure.problem, request, failure.detail)
    response.failure = failure
    return response


def identity_invalid(request: ProxyRequest, reason: str) -> ProxyResponse:
    """A JWT was sent that cannot be believed (RFC 6750's invalid_token)."""
    response = problem_for(IDENTITY_INVALID, request, reason)
    response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def client_stalled(request: ProxyRequest, detail: str) -> ProxyResponse:
    response = problem_for(CLIENT_STALLED, request, detail=detail)
    # The rest of the body may still come: this connection cannot carry another request.
    response.headers["Connection"] = "close"
    return response


def body_too_large(request: ProxyRequest, limit: int) -> ProxyResponse:
    return problem_for(
        BODY_TOO_LARGE,
        request,
        detail=f"the request body is larger than this route's limit of {limit} bytes",
        max_body=limit,
    )


def classify_client_error(exc: aiohttp.ClientError) -> UpstreamFailure:
    """Map an aiohttp client error to the kind we count and the problem we answer.

    The detail is ours, never aiohttp's message: those embed the upstream URL with the
    client's query string, which must not reach logs or clients.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure(
            Failure.CONNECT_TIMEOUT,
            UPSTREAM_CONNECT_FAILED,
            "connecting to the upstream timed out",
        )
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamFailure(
            Failure.TIMEOUT, UPSTREAM_TIMEOUT, "the upstream stopped sending data"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return UpstreamFailure(
            Failure.CONNECT, UPSTREAM_CONNECT_FAILED, f"cannot connect to the upstream: {reason}"
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamFailure(
            Failure.BAD_RESPONSE,
            UPSTREAM_BAD_RESPONSE,
            "the upstream's response is not valid HTTP/1.1",
        )
    return UpstreamFailure(
        Failure.RESET, UPSTREAM_RESET, "the upstream closed the connection before responding"
    )
