"""Idempotency: a retried request with the same Idempotency-Key runs once, on any replica.

The path of a protected request (a listed method with a key):
1. the body is buffered (up to max_request_body) and fingerprinted;
2. one store round trip looks the record up and, if there is none, claims it;
3. a completed record is replayed, a different request with the same key gets 422, one
   still in flight gets 409 (or, with `wait`, its result once it lands);
4. a claimed request goes upstream in a task of its own, shielded from the client: a
   client that hangs up cancels neither the app's work nor the completion write. The
   owner renews its lease meanwhile; a crashed owner's lease simply runs out;
5. the outcome decides the record: 2xx/4xx stored (but 408, 425, 429 and 5xx released,
   unless cache_5xx), a connect failure released, an unknown outcome (timeout or reset
   after sending) left to expire, a response too large or endless kept as "ran, not
   replayable". The completion write does not hold up the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from email.utils import formatdate
from random import getrandbits

from aiohttp import hdrs
from multidict import CIMultiDict
from prometheus_client import Counter

from sidecar import errors
from sidecar.chain import (
    BodyTooLarge,
    ClientStalled,
    Failure,
    Next,
    Origin,
    Policy,
    ProxyRequest,
    ProxyResponse,
    UpstreamBodyBroken,
    UpstreamFailure,
    chain_chunks,
)
from sidecar.config import IdempotencyConfig, RouteConfig
from sidecar.policies.base import PolicyDeps
from sidecar.policies.idempotency.records import (
    BEGIN,
    FINISH,
    RELEASE,
    RENEW,
    REPLAYED_HEADERS,
    Found,
    decode_begin,
    decode_headers,
    encode_headers,
    fingerprint,
    parse_key,
    record_key,
)
from sidecar.store import ScriptCall, StoreError

REPLAYED = "Idempotent-Replayed"
EXPIRES = "Idempotency-Expires"
# Statuses a retry may repeat: the request was refused, not acted upon.
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_FINISH_ATTEMPTS = 3
_WAIT_FIRST_POLL = 0.05
_WAIT_LONGEST_POLL = 0.5
OUTCOMES = (
    "claimed",
    "replayed",
    "conflict",
    "mismatch",
    "bypassed",
    "not_replayable",
    "store_error",
)


class IdempotencyPolicy:
    def __init__(self, config: IdempotencyConfig, route: RouteConfig, deps: PolicyDeps) -> None:
        self._config = config
        self._route = route.name
        self._methods = config.methods
        self._header = config.header
        # The route's own max_body still applies: buffering must not raise the limit.
        self._body_limit = min(config.max_request_body, route.max_body)
        self._lease_ms = int(config.lease * 1000)
        self._ttl_ms = int(config.ttl * 1000)
        self._org_header = deps.config.identity.org_header
        self._user_header = deps.config.identity.user_header
        self._store = deps.store
        self._log = deps.log
        self._background = deps.background
        counter: Counter = deps.metrics.idempotency
        self._outcomes = {outcome: counter.labels(route.name, outcome) for outcome in OUTCOMES}

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        if request.method not in self._methods:
            return await call_next(request)
        values = request.raw.headers.getall(self._header, ())
        if not values:
            if self._config.required:
                return errors.problem_for(
                    errors.IDEMPOTENCY_KEY_MISSING,
                    request,
                    f"{request.method} requests on this route need an Idempotency-Key",
                )
            self._outcomes["bypassed"].inc()
            return await call_next(request)
        key = parse_key(values)
        if key is None:
            return errors.problem_for(
                errors.IDEMPOTENCY_KEY_INVALID,
                request,
                "send one Idempotency-Key of 1 to 255 printable ASCII characters,"
                ' as a token or a quoted string ("...")',
            )
        try:
            body = await request.read_body(self._body_limit)
        except BodyTooLarge as exc:
            return errors.body_too_large(request, exc.limit)
        except ClientStalled as exc:
            return errors.client_stalled(request, exc.detail)
        raw_headers = request.raw.headers
        claim = _Claim(
            record=record_key(
                raw_headers.get(self._org_header, ""),
                raw_headers.get(self._user_header, ""),
                request.method,
                self._route,
                key,
            ),
            token=f"{getrandbits(128):032x}",
            fingerprint=fingerprint(
                request.method,
                request.target,
                raw_headers.get(hdrs.CONTENT_TYPE, ""),
                raw_headers.get(hdrs.CONTENT_ENCODING, ""),
                body,
            ),
        )
        return await self._admit(request, call_next, claim)

    # -- before the upstream ---------------------------------------------------------

    async def _admit(self, request: ProxyRequest, call_next: Next, claim: _Claim) -> ProxyResponse:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._config.wait
        poll = _WAIT_FIRST_POLL
        while True:
            try:
                found = await self._begin(claim)
            except StoreError as error:
                return await self._store_failed(request, call_next, error)
            if found.state == "claimed":
                return await self._execute(request, call_next, claim)
            if not found.same_request:
                return self._mismatch(request)
            if found.state == "completed":
                return self._replay(request, found)
            if found.state == "not_replayable":
                self._outcomes["not_replayable"].inc()
                self._log.request_event(request, "idempotency.not_replayable", route=self._route)
                return errors.problem_for(
                    errors.IDEMPOTENCY_NOT_REPLAYABLE,
                    request,
                    "the first request with this key ran, but its response was too large or"
                    " streamed, so it was not kept; use a new key to run it again",
                )
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                return self._conflict(request, found)
            # Waiting for the first request to finish: poll, backing off (bounded by wait).
            await asyncio.sleep(min(poll, remaining))
            poll = min(poll * 2, _WAIT_LONGEST_POLL)

    async def _begin(self, claim: _Claim) -> Found:
        call = ScriptCall(BEGIN, (claim.record,), (claim.token, claim.fingerprint, self._lease_ms))
        begin = asyncio.ensure_future(self._store.execute([call]))
        try:
            replies = await asyncio.shield(begin)
        except asyncio.CancelledError:
            # The client left while the claim was on its way: if it landed, give it back
            # rather than leave an ownerless claim blocking retries for a whole lease.
            self._background.spawn(self._release_if_claimed(begin, claim))
            raise
        return decode_begin(replies[0])

    async def _release_if_claimed(self, begin: asyncio.Future[list[object]], claim: _Claim) -> None:
        with contextlib.suppress(StoreError):
            replies = await begin
            if decode_begin(replies[0]).state == "claimed":
                await self._store.execute([ScriptCall(RELEASE, (claim.record,), (claim.token,))])

    async def _store_failed(
        self, request: ProxyRequest, call_next: Next, error: StoreError
    ) -> ProxyResponse:
        self._outcomes["store_error"].inc()
        fail_open = self._config.on_store_error == "open"
        self._log.request_event(
            request,
            "idempotency.store_error",
            level="warning",
            route=self._route,
            kind=error.kind,
            action="forwarded unprotected" if fail_open else "refused",
        )
        if fail_open:
            return await call_next(request)
        response = errors.problem_for(
            errors.IDEMPOTENCY_UNAVAILABLE,
            request,
            "the idempotency store did not answer; nothing was executed",
        )
        response.headers["Retry-After"] = "1"
        return response

    def _mismatch(self, request: ProxyRequest) -> ProxyResponse:
        self._outcomes["mismatch"].inc()
        self._log.request_event(request, "idempotency.mismatch", route=self._route)
        return errors.problem_for(
            errors.IDEMPOTENCY_KEY_REUSED,
            request,
            "this key was first used with another method, path, query or body",
            status=self._config.mismatch_status,
        )

    def _conflict(self, request: ProxyRequest, found: Found) -> ProxyResponse:
        self._outcomes["conflict"].inc()
        self._log.request_event(request, "idempotency.conflict", route=self._route)
        response = errors.problem_for(
            errors.IDEMPOTENCY_IN_PROGRESS,
            request,
            "the first request with this key has not finished; retry later",
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(found.lease_left_ms / 1000)))
        return response

    def _replay(self, request: ProxyRequest, found: Found) -> ProxyResponse:
        self._outcomes["replayed"].inc()
        self._log.request_event(
            request, "idempotency.replayed", route=self._route, status=found.status
        )
        headers: CIMultiDict[str] = CIMultiDict(decode_headers(found.headers))
        headers[REPLAYED] = "true"
        headers[EXPIRES] = _http_date(found.expires_ms)
        return ProxyResponse(found.status, headers, found.body, origin=Origin.REPLAY)

    # -- the one execution -----------------------------------------------------------

    async def _execute(
        self, request: ProxyRequest, call_next: Next, claim: _Claim
    ) -> ProxyResponse:
        self._outcomes["claimed"].inc()
        run = self._background.spawn(self._run(request, call_next, claim))
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            # The client left. The app's work and the record's outcome go on regardless;
            # only the response, which nobody will read, is let go of.
            run.add_done_callback(_discard_response)
            raise

    async def _run(self, request: ProxyRequest, call_next: Next, claim: _Claim) -> ProxyResponse:
        renewing = asyncio.create_task(self._keep_claim(claim))
        try:
            response = await call_next(request)
            return await self._settle(request, response, claim)
        finally:
            renewing.cancel()

    async def _keep_claim(self, claim: _Claim) -> None:
        interval = self._config.lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                replies = await self._store.execute(
                    [ScriptCall(RENEW, (claim.record,), (claim.token, self._lease_ms))]
                )
            except StoreError:
                continue  # the next renewal may get through; the lease still has 2/3 left
            if replies[0] != 1:
                return  # not ours any more: nothing left to renew

    async def _settle(
        self, request: ProxyRequest, response: ProxyResponse, claim: _Claim
    ) -> ProxyResponse:
        """Decide what the record becomes, from what the app answered."""
        failure = response.failure
        if failure is not None:
            if not failure.request_sent:
                self._release(claim)
            # Otherwise the outcome is unknown (the app may have acted): the claim stays
            # until its lease runs out, so retries get 409 rather than a second execution.
            return response
        if response.local:
            # Answered before reaching the app (a 413, and later a quota 429 or an open
            # breaker's 503): nothing ran, so the key is free again, whatever the status.
            self._release(claim)
            return response
        status = response.status
        response.headers[REPLAYED] = "false"
        if status in _RETRYABLE_STATUSES or (status >= 500 and not self._config.cache_5xx):
            self._release(claim)
            return response
        try:
            body = await self._capture(response)
        except (UpstreamBodyBroken, TimeoutError):
            # The app's body broke off: what it did is unknown; leave the claim to expire.
            if response.release is not None:
                response.release()
            failure = UpstreamFailure(
                Failure.STREAM,
                errors.UPSTREAM_BODY_BROKEN,
                "the upstream's response body broke off",
            )
            return errors.failure_response(request, failure)
        expires_ms = int((time.time() + self._config.ttl) * 1000)
        response.headers[EXPIRES] = _http_date(expires_ms)
        kept = [
            (name, value)
            for name, value in response.headers.items()
            if name.lower() in REPLAYED_HEADERS
        ]
        self._background.spawn(self._finish(request, claim, status, kept, body, expires_ms))
        return response

    async def _capture(self, response: ProxyResponse) -> bytes | None:
        """The whole body if it fits in max_response_body (then relayed from memory);
        None if it is too large or a never-ending stream (then relayed as it streams)."""
        body = response.body
        if body is None:
            return b""
        if response.headers.get(hdrs.CONTENT_TYPE, "").startswith("text/event-stream"):
            return None
        limit = self._config.max_response_body
        if isinstance(body, bytes):  # it arrived whole with its headers
            return body if len(body) <= limit else None
        iterator = body.__aiter__()
        chunks: list[bytes] = []
        size = 0
        async for chunk in iterator:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                response.body = chain_chunks(chunks, iterator)
                return None
        if response.release is not None:
            response.release()
            response.release = None
        data = b"".join(chunks)
        response.body = data
        return data

    async def _finish(
        self,
        request: ProxyRequest,
        claim: _Claim,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes | None,
        expires_ms: int,
    ) -> None:
        # Each request counts once, under the outcome it met; these writes are counted by
        # the store's own metrics (sidecar_store_errors_total{operation=...}).
        state = "c" if body is not None else "n"
        call = ScriptCall(
            FINISH,
            (claim.record,),
            (
                claim.token,
                state,
                status,
                encode_headers(headers),
                body or b"",
                expires_ms,
                self._ttl_ms,
                claim.fingerprint,
            ),
        )
        for attempt in range(_FINISH_ATTEMPTS):
            try:
                replies = await self._store.execute([call])
            except StoreError as error:
                # A timeout may have landed; the script makes a repeated write harmless.
                if error.kind != "script" and attempt + 1 < _FINISH_ATTEMPTS:
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                self._log.request_event(
                    request,
                    "idempotency.finish_failed",
                    level="error",
                    route=self._route,
                    kind=error.kind,
                )
                return
            if replies[0] == 0:
                self._log.request_event(
                    request, "idempotency.claim_lost", level="warning", route=self._route
                )
            return

    def _release(self, claim: _Claim) -> None:
        async def release() -> None:
            with contextlib.suppress(StoreError):  # failing that, the lease expires on its own
                await self._store.execute([ScriptCall(RELEASE, (claim.record,), (claim.token,))])

        self._background.spawn(release())


class _Claim:
    __slots__ = ("fingerprint", "record", "token")

    def __init__(self, record: str, token: str, fingerprint: str) -> None:
        self.record = record
        self.token = token
        self.fingerprint = fingerprint


def _discard_response(run: asyncio.Task[ProxyResponse]) -> None:
    if run.cancelled() or run.exception() is not None:
        return
    response = run.result()
    if response.release is not None:
        response.release()


def _http_date(unix_ms: int) -> str:
    return formatdate(unix_ms / 1000, usegmt=True)


def build(route: RouteConfig, deps: PolicyDeps) -> Policy | None:
    if route.idempotency is None:
        return None
    return IdempotencyPolicy(route.idempotency, route, deps)
