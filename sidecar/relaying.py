"""What the forwarder and the WebSocket relay share: hop-by-hop headers (RFC 9110 §7.6.1)
and turning an app's answer into a ProxyResponse, relayed byte for byte."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from operator import itemgetter

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.chain import ProxyResponse
from sidecar.config import UpstreamConfig

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
# Bodies up to this size that arrived with their headers are relayed in one write.
WHOLE = 64 * 1024
# Statuses whose responses never carry a body (RFC 9110 §6.4.1).
NO_BODY_STATUSES = frozenset({204, 304})

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
RawHeaders = tuple[tuple[bytes, bytes], ...]
# aiohttp's client would otherwise invent these for every request.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def app_client(config: UpstreamConfig, limit: int) -> aiohttp.ClientSession:
    """A client for the app that adds nothing the client did not send (`skip_auto_headers`),
    keeps no cookies between users, never decompresses, and bounds connecting.
    `limit` caps its connections (0: no cap; a WebSocket relay holds one per session)."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        keepalive_timeout=config.idle_timeout,
        ttl_dns_cache=10,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
    )


def app_origin(config: UpstreamConfig) -> str:
    """Scheme, authority and base path of the app: what every request target is put after."""
    return f"{config.scheme}://{config.host}:{config.port}{config.base_path}"


def app_url(config: UpstreamConfig, target: str) -> URL:
    """The app's URL for a request target, exactly as the client sent it (no re-quoting)."""
    return URL(app_origin(config) + target, encoded=True)


def as_sent(raw_headers: RawHeaders, headers: Headers) -> CIMultiDict[str]:
    """A copy of the client's headers in order, each name spelt as the client sent it.

    aiohttp's parser gives well-known names its own spelling (`accept` becomes `Accept`);
    `raw_headers` keeps the bytes, and the parsed values are the same text one for one.
    Most clients already use that spelling, so the common case is one C-level copy.
    """
    names = map(_NAME, raw_headers)
    if b"".join(names) == "".join(headers).encode("latin-1", "replace"):
        return CIMultiDict(headers)
    pairs = zip(raw_headers, headers.values(), strict=True)
    return CIMultiDict([(name.decode("latin-1"), value) for (name, _), value in pairs])


_NAME = itemgetter(0)


def strip_hop_by_hop(headers: Headers) -> CIMultiDict[str]:
    """Copy headers in order, keeping repeats, without hop-by-hop ones (RFC 9110 §7.6.1)."""
    # Copy in C, then delete the few hop-by-hop names present: far cheaper than a
    # Python loop over every header (this runs twice per request).
    return drop_hop_by_hop(CIMultiDict(headers))


def drop_hop_by_hop(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Delete the hop-by-hop headers, those the Connection header names too, in place."""
    listed = connection_tokens(headers)  # before Connection itself goes
    for name in HOP_BY_HOP:
        if name in headers:
            del headers[name]
    for name in listed:
        if name in headers:
            del headers[name]
    return headers


def connection_tokens(headers: Headers) -> frozenset[str]:
    """The (lower-case) header names the Connection header lists as hop-by-hop."""
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def app_response(
    method: str, upstream: aiohttp.ClientResponse, release: Callable[[], None]
) -> ProxyResponse:
    """The app's answer as it arrived: no body (HEAD, 204, 304, 1xx), a small body that
    came whole with its headers (relayed in one write), or a body streamed as it arrives.
    `release` frees the connection once the body is done with (at once when bodiless)."""
    headers = strip_hop_by_hop(upstream.headers)
    status = upstream.status
    if method == "HEAD" or status in NO_BODY_STATUSES or status < 200:
        release()
        return ProxyResponse(status, headers, None, upstream.reason)
    content = upstream.content
    if content.is_eof() and hdrs.CONTENT_LENGTH in headers and content.total_bytes <= WHOLE:
        # Bounded, so large bodies still stream instead of being held in memory per request.
        body = content.read_nowait(-1)
        release()
        return ProxyResponse(status, headers, body, upstream.reason)
    return ProxyResponse(status, headers, _chunks(upstream), upstream.reason, release=release)


async def _chunks(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    # iter_any hands over whatever has arrived, so server-sent events reach the client
    # as each event is written, not when some buffer fills.
    async for chunk in upstream.content.iter_any():
        yield chunk
