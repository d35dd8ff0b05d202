"""A naive aiohttp reverse proxy: what a Python team writes in an afternoon.

The benchmark's "naive" target: the sidecar must beat this per CPU to be worth running
instead of it. One web.Application with one catch-all route, one shared ClientSession,
the method, path + query, headers (minus hop-by-hop) and body forwarded, the response
streamed back as it arrives. No policies, no logs, no metrics, uvloop if installed (as the
sidecar runs), so the comparison is like with like.

    python bench/naive_proxy.py --port 8000 --upstream http://127.0.0.1:8080

It does only what a sensible afternoon version would: no cookie jar (a shared one would
hand one caller's cookies to the next), no decompression (bytes pass as they are), no
redirects followed. It has no dependency on the sidecar's code.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from aiohttp import ClientError, ClientSession, DummyCookieJar, TCPConnector, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# RFC 9110 7.6.1 connection-specific fields, plus Host (set from the upstream URL).
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
        "host",
    }
)
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def forwarded_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    response: web.StreamResponse | None = None
    try:
        async with session.request(
            request.method,
            url,
            headers=forwarded_headers(request.headers),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=forwarded_headers(upstream.headers),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except ClientError:  # the app's connection failed, or (once prepared) the client's
        if response is None or not response.prepared:
            return web.Response(status=502, text="bad gateway\n")
        response.force_close()  # mid-answer: nothing more to send, the connection goes
        return response


async def client_session(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=256)
    async with ClientSession(
        connector=connector, cookie_jar=DummyCookieJar(), auto_decompress=False
    ) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description="a naive aiohttp reverse proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=2.0,
        loop=new_loop(),
    )


if __name__ == "__main__":
    main()
