"""Idempotency: a retried request with the same Idempotency-Key runs once, on any replica.

The path of a protected request (a listed method with a key):
1. the body is buffered (up to max_request_body) and fingerprinted;
2. one store round trip looks the record up and, if there is none, claims it;
3. a completed record is replayed, a different request with the same key gets 422, one
   still in flight gets 409 (or, with `wait`, its result once it lands; a store error
   after that is a 409 too, never a forward);
4. a claimed request goes upstream in a task of its own, shielded from the client: a
   client that hangs up cancels neither the app's work nor the completion write. The
   owner renews its lease meanwhile (lease.py) and tells the app its claim token; a
   crashed owner's lease simply runs out;
5. the outcome decides the record: stored, except the release_statuses (and other 5xx
   when cache_5xx is off) and a connect failure, which release it; an unknown outcome
   (timeout or reset after sending) is left to expire; a response too large or endless is
   kept as "ran, not replayable". The completion write does not hold up the response; it
   and every release are retried until the store answers or the lease would be over.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
from sidecar.identity import IdentityRejected
from sidecar.policies.base import PolicyDeps
from sidecar.policies.idempotency.lease import Lease, ReleaseQueue, until_answered
from sidecar.policies.idempotency.records import (
    BEGIN,
    FINISH,
    RECORD_VERSION,
    RELEASE,
    RENEW,
    REPLAYED_HEADERS,
    BadRecord,
    Found,
    accepts_encoding,
    credentials_scope,
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
_WAIT_FIRST_POLL = 0.05
_WAIT_LONGEST_POLL = 0.5
OUTCOMES = (
    "claimed",
    "replayed",
    "conflict",
    "mismatch",
    "bypassed",
    "not_replayable",
    "not_acceptable",
    "store_error",
)


class IdempotencyPolicy:
    def __init__(self, config: IdempotencyConfig, route: RouteConfig, deps: PolicyDeps) -> None:
        self._config = config
        self._route = route.name
        self._namespace = config.namespace or route.name
        self._methods = config.methods
        self._header = config.header
        self._claim_header = config.claim_header
        # The route's own max_body still applies: buffering must not raise the limit.
        self._body_limit = min(config.max_request_body, route.max_body)
        self._lease = config.lease
        self._lease_ms = int(config.lease * 1000)
        self._ttl_ms = int(config.ttl * 1000)
        self._org_header = deps.config.identity.org_header
        self._user_header = deps.config.identity.user_header
        self._identity = deps.identity
        self._store = deps.store
        self._log = deps.log
        self._background = deps.background
        self._releases = ReleaseQueue(self._store, self._background.spawn)
        counter: Counter = deps.metrics.idempotency
        self._outcomes = {outcome: counter.labels(route.name, outcome) for outcome in OUTCOMES}
        self._claims_lost = deps.metrics.idempotency_claims_lost.labels(route.name)

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        if self._claim_header is not None:
            # Only the sidecar speaks for a claim: a client's own value never reaches the app.
            request.headers.popall(self._claim_header, None)
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
            return await self._bypass(request, call_next)
        key = parse_key(values)
        if key is None:
            return errors.problem_for(
                errors.IDEMPOTENCY_KEY_INVALID,
                request,
                "send one Idempotency-Key of 1 to 255 printable ASCII characters,"
                ' bare or as a quoted string ("...")',
            )
        try:
            caller = self._caller(request)
        except IdentityRejected as rejected:
            return errors.identity_invalid(request, rejected.reason)
        if caller is None:
            if self._config.anonymous == "bypass":
                return await self._bypass(request, call_next)
            return self._caller_unknown(request)
        try:
            body = await request.read_body(self._body_limit)
        except BodyTooLarge as exc:
            return errors.body_too_large(request, exc.limit)
        except ClientStalled as exc:
            return errors.client_stalled(request, exc.detail)
        raw_headers = request.raw.headers
        claim = _Claim(
            record=record_key(caller[0], caller[1], request.method, self._namespace, key),
            owner=f"{getrandbits(128):032x}",
            fingerprint=fingerprint(
                request.method,
                request.target,
                raw_headers.get(hdrs.CONTENT_TYPE, ""),
                raw_headers.get(hdrs.CONTENT_ENCODING, ""),
                body,
            ),
        )
        return await self._admit(request, call_next, claim)

    def _caller(self, request: ProxyRequest) -> tuple[str, str] | None:
        """(org, user) the record is scoped to; None for a caller nobody vouches for.

        Raises IdentityRejected for a JWT that is sent but cannot be believed."""
        headers = request.raw.headers
        identity = self._identity.resolve(headers)
        if identity.org or identity.user:
            return identity.org, identity.user
        if self._config.anonymous == "credentials":
            credentials = headers.get(self._config.credentials_header, "")
            if credentials:
                return "", credentials_scope(credentials)
        return None

    async def _bypass(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        self._outcomes["bypassed"].inc()
        return await call_next(request)

    def _caller_unknown(self, request: ProxyRequest) -> ProxyResponse:
        # Without a caller to scope it to, one caller's key could replay another's response.
        if self._config.anonymous == "credentials":
            wanted = f"{self._org_header}, {self._user_header} or {self._config.credentials_header}"
        else:
            wanted = f"{self._org_header} or {self._user_header}"
        return errors.problem_for(
            errors.IDEMPOTENCY_CALLER_UNKNOWN,
            request,
            f"requests with an Idempotency-Key on this route must identify their caller ({wanted})",
        )

    # -- before the upstream ---------------------------------------------------------

    async def _admit(self, request: ProxyRequest, call_next: Next, claim: _Claim) -> ProxyResponse:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._config.wait
        poll = _WAIT_FIRST_POLL
        in_progress: Found | None = None
        while True:
            sent_at = loop.time()
            try:
                found = await self._begin(claim, sent_at)
            except StoreError as error:
                # The claim may have landed with its reply lost: give it back once the
                # store answers, or a retry would meet a claim nobody owns for a lease.
                self._give_back(claim.owner, claim.record, sent_at + self._lease)
                if in_progress is not None:
                    return self._still_in_progress(request, in_progress, error.kind)
                return await self._store_failed(request, call_next, error.kind)
            except BadRecord as error:
                return await self._store_failed(request, call_next, error.kind)
            if found.state == "claimed":
                claim.token = found.token
                return await self._execute(request, call_next, claim, sent_at)
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
            in_progress = found
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                return self._conflict(request, found)
            # Waiting for the first request to finish: poll, backing off (bounded by wait).
            await asyncio.sleep(min(poll, remaining))
            poll = min(poll * 2, _WAIT_LONGEST_POLL)

    async def _begin(self, claim: _Claim, sent_at: float) -> Found:
        call = ScriptCall(
            BEGIN, (claim.record,), (claim.owner, claim.fingerprint, self._lease_ms, RECORD_VERSION)
        )
        begin = asyncio.ensure_future(self._store.execute([call]))
        try:
            replies = await asyncio.shield(begin)
        except asyncio.CancelledError:
            # The client left while the claim was on its way: if it landed, give it back
            # rather than leave an ownerless claim blocking retries for a whole lease.
            self._background.spawn(self._release_if_claimed(begin, claim, sent_at))
            raise
        return decode_begin(replies[0])

    async def _release_if_claimed(
        self, begin: asyncio.Future[list[object]], claim: _Claim, sent_at: float
    ) -> None:
        try:
            replies = await begin
        except StoreError:
            self._give_back(claim.owner, claim.record, sent_at + self._lease)
            return
        with contextlib.suppress(BadRecord):
            found = decode_begin(replies[0])
            if found.state == "claimed":
                self._give_back(found.token, claim.record, sent_at + self._lease)

    async def _store_failed(
        self, request: ProxyRequest, call_next: Next, kind: str
    ) -> ProxyResponse:
        self._outcomes["store_error"].inc()
        fail_open = self._config.on_store_error == "open"
        self._log.request_event(
            request,
            "idempotency.store_error",
            level="warning",
            route=self._route,
            kind=kind,
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

    def _still_in_progress(self, request: ProxyRequest, found: Found, kind: str) -> ProxyResponse:
        """A waiting retry whose store went away: the first request was running when last
        seen, so forwarding this one (even with on_store_error: open) could run it twice."""
        self._outcomes["store_error"].inc()
        self._log.request_event(
            request,
            "idempotency.store_error",
            level="warning",
            route=self._route,
            kind=kind,
            action="refused: the first request was still in progress",
        )
        return self._in_progress_response(request, found)

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
        return self._in_progress_response(request, found)

    def _in_progress_response(self, request: ProxyRequest, found: Found) -> ProxyResponse:
        response = errors.problem_for(
            errors.IDEMPOTENCY_IN_PROGRESS,
            request,
            "the first request with this key has not finished; retry later",
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(found.lease_left_ms / 1000)))
        return response

    def _replay(self, request: ProxyRequest, found: Found) -> ProxyResponse:
        headers: CIMultiDict[str] = CIMultiDict(decode_headers(found.headers))
        coding = headers.get(hdrs.CONTENT_ENCODING, "")
        if not accepts_encoding(request.raw.headers.get(hdrs.ACCEPT_ENCODING), coding):
            return self._not_acceptable(request, coding)
        self._outcomes["replayed"].inc()
        self._log.request_event(
            request, "idempotency.replayed", route=self._route, status=found.status
        )
        headers[REPLAYED] = "true"
        headers[EXPIRES] = _http_date(found.expires_ms)
        return ProxyResponse(found.status, headers, found.body, origin=Origin.REPLAY)

    def _not_acceptable(self, request: ProxyRequest, coding: str) -> ProxyResponse:
        # The sidecar never re-encodes a stored body; a retry that no longer accepts the
        # first answer's coding is told so rather than sent bytes it cannot read.
        self._outcomes["not_acceptable"].inc()
        self._log.request_event(
            request, "idempotency.not_acceptable", route=self._route, coding=coding
        )
        return errors.problem_for(
            errors.IDEMPOTENCY_NOT_ACCEPTABLE,
            request,
            f"the first response with this key is {coding}-encoded and this request's"
            " Accept-Encoding refuses that",
        )

    # -- the one execution -----------------------------------------------------------

    async def _execute(
        self, request: ProxyRequest, call_next: Next, claim: _Claim, claimed_at: float
    ) -> ProxyResponse:
        self._outcomes["claimed"].inc()
        # The claim makes a resend harmless: the app fences on it, no other copy can run.
        request.retry_safe = True
        if self._claim_header is not None:
            request.headers[self._claim_header] = claim.token
        renew = ScriptCall(RENEW, (claim.record,), (claim.token, self._lease_ms))

        def lost(reason: str) -> None:
            self._claims_lost.inc()
            self._log.request_event(
                request, "idempotency.claim_lost", level="error", route=self._route, reason=reason
            )

        lease = Lease(self._store, renew, self._lease, claimed_at, lost)
        run = self._background.spawn(self._run(request, call_next, claim, lease))
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            # The client left. The app's work and the record's outcome go on regardless;
            # only the response, which nobody will read, is let go of.
            run.add_done_callback(_discard_response)
            raise

    async def _run(
        self, request: ProxyRequest, call_next: Next, claim: _Claim, lease: Lease
    ) -> ProxyResponse:
        lease.start()
        try:
            response = await call_next(request)
        except BaseException:
            lease.stop()  # outcome unknown: the claim is left to expire
            raise
        return await self._settle(request, response, claim, lease)

    async def _settle(
        self, request: ProxyRequest, response: ProxyResponse, claim: _Claim, lease: Lease
    ) -> ProxyResponse:
        """Decide what the record becomes, from what the app answered."""
        failure = response.failure
        if failure is not None:
            lease.stop()
            if not failure.request_sent:
                self._give_back(claim.token, claim.record, lease.deadline)
            # Otherwise the outcome is unknown (the app may have acted): the claim stays
            # until its lease runs out, so retries get 409 rather than a second execution.
            return response
        if response.local or self._released(response.status):
            # Answered before reaching the app (a 413, and later a quota 429 or an open
            # breaker's 503), or refused by it in a way a retry may repeat: the key is free.
            lease.stop()
            self._give_back(claim.token, claim.record, lease.deadline)
            return response
        response.headers[REPLAYED] = "false"
        try:
            body = await self._capture(response)
        except (UpstreamBodyBroken, TimeoutError):
            # The app's body broke off: what it did is unknown; leave the claim to expire.
            lease.stop()
            if response.release is not None:
                response.release()
            failure = UpstreamFailure(
                Failure.STREAM,
                errors.UPSTREAM_BODY_BROKEN,
                "the upstream's response body broke off",
            )
            return errors.failure_response(request, failure)
        kept = [
            (name, value)
            for name, value in response.headers.items()
            if name.lower() in REPLAYED_HEADERS
        ]
        status = response.status
        # Stored once the response went out: the client does not wait for this write.
        request.after_response(
            lambda: self._background.spawn(self._finish(request, claim, lease, status, kept, body))
        )
        return response

    def _released(self, status: int) -> bool:
        if status in self._config.release_statuses:
            return True
        return status >= 500 and not self._config.cache_5xx

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
        lease: Lease,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes | None,
    ) -> None:
        """Store the outcome, retrying (the write is a compare-and-set, so a repeat that
        lands twice is harmless) for up to one lease while the lease is renewed: a blip
        right after the response must not leave the record to expire and the request to
        run again. Each request counts once, under the outcome it met; these writes are
        counted by the store's own metrics (sidecar_store_errors_total{operation=...})."""
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
                self._ttl_ms,
                claim.fingerprint,
                RECORD_VERSION,
            ),
        )
        give_up_at = asyncio.get_running_loop().time() + self._lease
        try:
            stored = await until_answered(self._store, call, give_up_at)
        except StoreError as error:
            self._log.request_event(
                request,
                "idempotency.finish_failed",
                level="error",
                route=self._route,
                kind=error.kind,
            )
            return
        finally:
            lease.stop()
        if stored == 0:
            lease.lose("taken")  # another owner holds the key: nothing was written

    def _give_back(self, token: str, record: str, until: float) -> None:
        """Release a claim (by its token, or only its owner id when the claim's reply was
        lost), retried until the store answers or the claim would have expired anyway."""
        self._releases.add(record, token, ScriptCall(RELEASE, (record,), (token,)), until)


class _Claim:
    __slots__ = ("fingerprint", "owner", "record", "token")

    def __init__(self, record: str, owner: str, fingerprint: str) -> None:
        self.record = record
        # Random, chosen here: enough to release a claim whose reply was lost.
        self.owner = owner
        # The store's claim token (time-ordered, ending in the owner id), once claimed.
        self.token = ""
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
