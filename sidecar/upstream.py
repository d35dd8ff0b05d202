"""The forwarder: sends a ProxyRequest to the app and streams its answer back, byte for byte.

What "faithful" means here, and why each setting below exists:
- the request target is sent exactly as received (yarl `encoded=True`; no re-quoting);
- bodies are never decompressed (`auto_decompress=False`) nor re-chunked needlessly;
- aiohttp's client adds nothing the client did not send (`skip_auto_headers`), keeps no
  cookies between users (`DummyCookieJar`) and follows no redirects;
- one pool per process, whose idle timeout sits below the app server's keep-alive timeout,
  so a pooled connection the app has just closed is never used for a POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar import errors
from sidecar.chain import (
    BodyTooLarge,
    ClientStalled,
    Next,
    ProxyRequest,
    ProxyResponse,
    UpstreamFailure,
)
from sidecar.config import RouteConfig, UpstreamConfig
from sidecar.websocket import connect_websocket, is_websocket_upgrade

# RFC 9110 §7.6.1 plus the de-facto Proxy-Connection; every header named in Connection too.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp's client would otherwise invent these for every request.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# Bodies up to this size that arrived with their headers are relayed in one write.
_WHOLE = 64 * 1024
# Statuses whose responses never carry a body (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Copy headers in order, keeping repeats, without hop-by-hop ones (RFC 9110 §7.6.1)."""
    # Copy in C, then delete the few hop-by-hop names present: far cheaper than a
    # Python loop over every header (this runs twice per request).
    out: CIMultiDict[str] = CIMultiDict(headers)
    for name in HOP_BY_HOP:
        if name in out:
            del out[name]
    for name in _connection_tokens(headers):
        if name in out:
            del out[name]
    return out


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


@dataclass(slots=True)
class _BodyStream:
    """The client's body streamed upstream (see ProxyRequest.body_chunks).

    The route's response deadline starts when the body has been sent (`on_sent`), as in
    Envoy: a large or slow upload is not a slow app. aiohttp sends the body from a task of
    its own, so why the body stopped is noted here for `forward` to report.
    """

    request: ProxyRequest
    limit: int
    on_sent: Callable[[], None]
    exceeded: bool = False
    stalled: bool = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.request.body_chunks(self.limit):
                yield chunk
        except BodyTooLarge:
            self.exceeded = True
            raise
        except ClientStalled:
            self.stalled = True
            raise
        self.on_sent()

    def raise_client_fault(self) -> None:
        """Re-raise what the client did wrong, if the body stopped because of the client."""
        if self.exceeded:
            raise BodyTooLarge(self.limit)
        if self.stalled:
            raise ClientStalled(self.request.route.idle_timeout)


class _FaithfulClientRequest(aiohttp.ClientRequest):
    """aiohttp's request, minus the `Content-Length: 0` it invents for bodiless POST/DELETE.

    A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112 §6.3),
    so the header adds nothing but a difference from what the client sent.
    """

    def update_body_from_data(self, body: Any, *args: Any, **kwargs: Any) -> None:
        had_length = hdrs.CONTENT_LENGTH in self.headers
        super().update_body_from_data(body, *args, **kwargs)
        if body is None and not had_length:
            self.headers.popall(hdrs.CONTENT_LENGTH, None)


class Forwarder:
    """The terminal step of every chain: one pooled aiohttp client per process."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._origin = f"{config.scheme}://{config.host}:{config.port}{config.base_path}"
        connector = aiohttp.TCPConnector(
            limit=config.max_connections,
            keepalive_timeout=config.idle_timeout,
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            request_class=_FaithfulClientRequest,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
        )

    def for_route(self, route: RouteConfig) -> Next:
        """The terminal step of one route's chain, its timeouts made once at config load.

        Failures come back as problem responses (with `failure` set), not exceptions, so
        they travel out through the chain like any response: tracing adds its headers,
        a breaker or retry policy sees what happened.
        """
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.config.connect_timeout,
            # Bounds every read, so also the silence between two chunks of a streamed body.
            sock_read=route.idle_timeout,
        )
        forward = self.forward

        async def terminal(request: ProxyRequest) -> ProxyResponse:
            try:
                return await forward(request, timeout)
            except BodyTooLarge as exc:
                return errors.body_too_large(request, exc.limit)
            except ClientStalled as exc:
                return errors.client_stalled(request, exc.idle)
            except UpstreamFailure as failure:
                return errors.failure_response(request, failure)

        return terminal

    async def close(self) -> None:
        await self.session.close()

    async def forward(
        self, request: ProxyRequest, client_timeout: aiohttp.ClientTimeout
    ) -> ProxyResponse:
        route = request.route
        if is_websocket_upgrade(request.raw.headers):
            return await connect_websocket(self, request)
        url = self.upstream_url(request.target)
        loop = asyncio.get_running_loop()
        deadline = asyncio.Timeout(None)

        def start_deadline() -> None:
            # The app may have answered (and the deadline been left) before the body ended.
            with contextlib.suppress(RuntimeError):
                deadline.reschedule(loop.time() + route.timeout)

        body, stream = self._request_body(request, start_deadline)
        if stream is None:
            deadline = asyncio.Timeout(loop.time() + route.timeout)
        sent_at = time.perf_counter()
        try:
            async with deadline:
                upstream = await self.session.request(
                    request.method,
                    url,
                    headers=request.headers,
                    data=body,
                    allow_redirects=False,
                    timeout=client_timeout,
                )
        except aiohttp.ClientError as exc:
            # Before TimeoutError: aiohttp's socket timeouts are TimeoutErrors too.
            if stream is not None:
                stream.raise_client_fault()
            raise errors.classify_client_error(exc) from None
        except TimeoutError:
            if stream is not None:
                stream.raise_client_fault()
            raise UpstreamFailure(
                "timeout",
                errors.UPSTREAM_TIMEOUT,
                f"no response from the upstream within {route.timeout:g}s",
            ) from None
        request.upstream_seconds = time.perf_counter() - sent_at
        return self._response(request, upstream)

    def upstream_url(self, target: str) -> URL:
        return URL(self._origin + target, encoded=True)

    def _request_body(
        self, request: ProxyRequest, on_sent: Callable[[], None]
    ) -> tuple[object, _BodyStream | None]:
        if request.body is not None:
            return request.body, None
        raw = request.raw
        if not raw.body_exists:
            return None, None
        stream = _BodyStream(request, request.route.max_body, on_sent)
        return stream, stream

    def _response(self, request: ProxyRequest, upstream: aiohttp.ClientResponse) -> ProxyResponse:
        headers = strip_hop_by_hop(upstream.headers)
        status = upstream.status
        if request.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200:
            upstream.release()
            return ProxyResponse(status, headers, None, upstream.reason)
        content = upstream.content
        if content.is_eof() and hdrs.CONTENT_LENGTH in headers and content.total_bytes <= _WHOLE:
            # The whole (small) body came with the headers: relay it as one buffer, so the
            # client gets headers and body in one write instead of two. Bounded, so large
            # bodies still stream instead of being held in memory per request.
            body = content.read_nowait(-1)
            upstream.release()
            return ProxyResponse(status, headers, body, upstream.reason)
        return ProxyResponse(
            status,
            headers,
            _relay_chunks(upstream),
            upstream.reason,
            release=upstream.release,
        )


async def _relay_chunks(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    # iter_any hands over whatever has arrived, so server-sent events reach the client
    # as each event is written, not when some buffer fills.
    async for chunk in upstream.content.iter_any():
        yield chunk
