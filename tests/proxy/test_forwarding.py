"""What reaches the app is what the client sent: target, headers, Host, X-Forwarded-*.

Requests are written on raw sockets and the upstream is a RawUpstream, so both ends are
compared byte for byte without any HTTP library normalising them in between.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from tests.proxy.conftest import TEST_TIMEOUT, RawResponse, exchange
from tests.support import RawUpstream, run_sidecar, sidecar_config


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    for name, value in headers:
        head += f"{name}: {value}\r\n".encode("latin-1")
    return head + b"\r\n" + body


async def forward_one(upstream: RawUpstream, raw: bytes, **server: object) -> RawResponse:
    """Send `raw` through a fresh sidecar; returns what the client got."""
    async with asyncio.timeout(TEST_TIMEOUT):
        async with run_sidecar(sidecar_config(upstream.url, **server)) as sc:
            response = await exchange(sc.port, raw)
        assert len(upstream.exchanges) == 1
        return response


# -- 1, 2: the request target -------------------------------------------------------------

TARGETS = [
    "/a%3Ab/c%20d;p=1/%E2%9C%93?q=a+b&q=%2F&q=&x=%20;y",
    "/",
    "/%7euser/%7Euser/~user?a=%7e&b=%7E&c=~",
    "/p/%2e%2e/q/%2E/r",
    "/x/./y/../z",
    "//double//slashes//",
    "/empty-query?",
    "/only?&&=&",
    "/plus+sign?k=%2B+%20&k2=a%26b%3Dc",
    "/bad-escape?q=%zz%",
    "/sub-delims!$&'()*+,;=:@?q=!$&'()*+,;=:@/?",
]


@pytest.mark.parametrize("target", TARGETS)
async def test_path_and_query_forwarded_byte_for_byte(
    raw_upstream: RawUpstream, target: str
) -> None:
    raw = request_bytes("GET", target, [("Host", "app"), ("Connection", "close")])
    response = await forward_one(raw_upstream, raw)
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert raw_upstream.exchanges[0].request_line == f"GET {target} HTTP/1.1".encode()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://example.com/p?q=1", "/p?q=1"),
        ("http://example.com:8080/a%3ab/c?x=%2F", "/a%3ab/c?x=%2F"),
        ("http://example.com", "/"),
        ("http://example.com?q=1", "/?q=1"),
    ],
)
async def test_absolute_form_target_forwarded_as_origin_form(
    raw_upstream: RawUpstream, target: str, expected: str
) -> None:
    raw = request_bytes("GET", target, [("Host", "example.com"), ("Connection", "close")])
    response = await forward_one(raw_upstream, raw)
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert raw_upstream.exchanges[0].request_line == f"GET {expected} HTTP/1.1".encode()


async def test_absolute_form_target_authority_replaces_host(raw_upstream: RawUpstream) -> None:
    # RFC 9112 §3.2.2: the received Host is ignored and replaced by the target's authority.
    raw = request_bytes(
        "GET", "http://example.com:8080/p", [("Host", "other.example"), ("Connection", "close")]
    )
    await forward_one(raw_upstream, raw)
    assert raw_upstream.exchanges[0].header("Host") == ["example.com:8080"]


# -- 3: hop-by-hop headers ----------------------------------------------------------------


async def test_hop_by_hop_request_headers_not_forwarded(raw_upstream: RawUpstream) -> None:
    raw = request_bytes(
        "GET",
        "/hop",
        [
            ("Host", "app"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End", "1"),
        ],
    )
    await forward_one(raw_upstream, raw)
    seen = raw_upstream.exchanges[0]
    names = {name.lower() for name, _ in seen.header_lines}
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization", "upgrade", "proxy-connection"):
        assert hop not in names, f"{hop} reached the upstream: {seen.header_lines}"
    # The sidecar may open its own hop with a Connection header, but not the client's one.
    for value in seen.header("Connection"):
        assert "x-hop" not in value.lower()
    assert seen.header("X-End") == ["1"]


async def test_hop_by_hop_response_headers_not_relayed() -> None:
    upstream = RawUpstream(
        response=b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Resp-Hop\r\n"
        b"X-Resp-Hop: 1\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\n"
        b"X-Resp-End: 1\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    await upstream.start()
    try:
        raw = request_bytes("GET", "/", [("Host", "app"), ("Connection", "close")])
        headers = (await forward_one(upstream, raw)).headers
    finally:
        await upstream.stop()
    names = {name.lower() for name, _ in headers}
    assert "x-resp-hop" not in names
    assert "keep-alive" not in names
    assert "proxy-authenticate" not in names
    for name, value in headers:
        if name.lower() == "connection":
            assert "x-resp-hop" not in value.lower()
    assert ("X-Resp-End", "1") in headers


async def test_upgrade_websocket_not_named_in_connection_is_a_plain_request(
    raw_upstream: RawUpstream,
) -> None:
    # RFC 9110 §7.8: Upgrade only means something with an "upgrade" Connection option;
    # otherwise it is an ordinary request whose hop-by-hop Upgrade header is dropped.
    raw = request_bytes(
        "GET", "/plain", [("Host", "app"), ("Upgrade", "websocket"), ("Connection", "close")]
    )
    response = await forward_one(raw_upstream, raw)
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert response.body == b"ok"  # the app's answer, not a problem of the sidecar's
    seen = raw_upstream.exchanges[0]
    names = {name.lower() for name, _ in seen.header_lines}
    assert "upgrade" not in names
    assert "sec-websocket-key" not in names


# -- 4: repeated headers ------------------------------------------------------------------


async def test_repeated_response_headers_kept_in_order() -> None:
    cookies = [
        "a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/",
        "b=2; Expires=Thu, 22 Oct 2026 07:28:00 GMT; HttpOnly",
        "c=3; Max-Age=60, d=not-a-separate-cookie",
    ]
    response = b"HTTP/1.1 200 OK\r\n"
    for cookie in cookies:
        response += f"Set-Cookie: {cookie}\r\n".encode()
    upstream = await RawUpstream(response=response + b"Content-Length: 2\r\n\r\nok").start()
    try:
        raw = request_bytes("GET", "/", [("Host", "app"), ("Connection", "close")])
        headers = (await forward_one(upstream, raw)).headers
    finally:
        await upstream.stop()
    assert [v for k, v in headers if k.lower() == "set-cookie"] == cookies


async def test_repeated_request_headers_kept_in_order(raw_upstream: RawUpstream) -> None:
    raw = request_bytes(
        "GET",
        "/",
        [
            ("Host", "app"),
            ("X-Multi", "one"),
            ("X-Other", "between"),
            ("X-Multi", "two, three"),
            ("X-Multi", "four"),
            ("Connection", "close"),
        ],
    )
    await forward_one(raw_upstream, raw)
    assert raw_upstream.exchanges[0].header("X-Multi") == ["one", "two, three", "four"]


# -- 5: Host ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["api.example.com:8443", "API.Example.COM", "[::1]:8080"])
async def test_host_forwarded_as_sent(raw_upstream: RawUpstream, host: str) -> None:
    raw = request_bytes("GET", "/", [("Host", host), ("Connection", "close")])
    await forward_one(raw_upstream, raw)
    assert raw_upstream.exchanges[0].header("Host") == [host]


# -- 6: X-Forwarded-* ---------------------------------------------------------------------


async def test_x_forwarded_for_appended(raw_upstream: RawUpstream) -> None:
    raw = request_bytes(
        "GET", "/", [("Host", "app"), ("X-Forwarded-For", "203.0.113.7"), ("Connection", "close")]
    )
    await forward_one(raw_upstream, raw)
    assert raw_upstream.exchanges[0].header("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]


async def test_x_forwarded_for_set_when_absent(raw_upstream: RawUpstream) -> None:
    raw = request_bytes("GET", "/", [("Host", "app"), ("Connection", "close")])
    await forward_one(raw_upstream, raw)
    assert raw_upstream.exchanges[0].header("X-Forwarded-For") == ["127.0.0.1"]


async def test_x_forwarded_for_repeated_lines_all_kept(raw_upstream: RawUpstream) -> None:
    # RFC 9110 §5.3: several field lines of a list header mean the same as one joined line.
    raw = request_bytes(
        "GET",
        "/",
        [
            ("Host", "app"),
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("Connection", "close"),
        ],
    )
    await forward_one(raw_upstream, raw)
    assert raw_upstream.exchanges[0].header("X-Forwarded-For") == [
        "198.51.100.1, 203.0.113.7, 127.0.0.1"
    ]


async def test_x_forwarded_proto_and_host_set(raw_upstream: RawUpstream) -> None:
    raw = request_bytes("GET", "/", [("Host", "shop.example:8080"), ("Connection", "close")])
    await forward_one(raw_upstream, raw)
    seen = raw_upstream.exchanges[0]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["shop.example:8080"]


async def test_untrusted_client_forwarded_headers_replaced(raw_upstream: RawUpstream) -> None:
    raw = request_bytes(
        "GET",
        "/",
        [
            ("Host", "shop.example"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil"),
            ("Connection", "close"),
        ],
    )
    await forward_one(raw_upstream, raw)
    seen = raw_upstream.exchanges[0]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["shop.example"]


async def test_trusted_proxy_forwarded_headers_kept(raw_upstream: RawUpstream) -> None:
    raw = request_bytes(
        "GET",
        "/",
        [
            ("Host", "shop.example"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("Connection", "close"),
        ],
    )
    await forward_one(raw_upstream, raw, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    seen = raw_upstream.exchanges[0]
    assert seen.header("X-Forwarded-Proto") == ["https"]
    assert seen.header("X-Forwarded-Host") == ["public.example"]
    assert seen.header("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]


async def test_trusted_proxy_without_forwarded_headers_gets_them_set(
    raw_upstream: RawUpstream,
) -> None:
    raw = request_bytes("GET", "/", [("Host", "shop.example"), ("Connection", "close")])
    await forward_one(raw_upstream, raw, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    seen = raw_upstream.exchanges[0]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["shop.example"]


# -- 7: nothing added ---------------------------------------------------------------------

# traceparent: a request without trace context starts a new trace (tracing is on by default).
_SIDECAR_ADDED = {
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "traceparent",
}


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "DELETE", "POST"])
async def test_bodiless_request_adds_no_headers_the_client_did_not_send(
    raw_upstream: RawUpstream, method: str
) -> None:
    await forward_one(raw_upstream, f"{method} / HTTP/1.1\r\nHost: app\r\n\r\n".encode())
    names = [name.lower() for name, _ in raw_upstream.exchanges[0].header_lines]
    assert sorted(names) == sorted({"host"} | _SIDECAR_ADDED)


async def _bare_response_headers() -> set[str]:
    """Header names the client gets for an app response with nothing but Content-Length."""
    bare = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    upstream = await RawUpstream(response=bare).start()
    try:
        raw = request_bytes("GET", "/", [("Host", "app"), ("Connection", "close")])
        response = await forward_one(upstream, raw)
    finally:
        await upstream.stop()
    assert response.body == b"hello"
    return response.header_names()


async def test_response_content_type_not_invented() -> None:
    # RFC 9110 §8.3: without Content-Type the recipient may sniff; octet-stream forbids it.
    assert "content-type" not in await _bare_response_headers()


async def test_response_server_header_not_invented() -> None:
    assert "server" not in await _bare_response_headers()


async def test_response_gets_no_other_headers_added() -> None:
    # Date is required of a forwarding recipient when the app sent none (RFC 9110 §6.6.1);
    # X-Request-Id and X-Trace-Id are the sidecar's; Connection may frame the client hop.
    allowed = {
        "content-length",
        "date",
        "x-request-id",
        "x-trace-id",
        "connection",
        "content-type",
        "server",
    }
    assert await _bare_response_headers() <= allowed


async def test_post_without_content_type_gets_none(raw_upstream: RawUpstream) -> None:
    raw = b"POST /submit HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\n\r\nhello world"
    await forward_one(raw_upstream, raw)
    seen = raw_upstream.exchanges[0]
    names = {name.lower() for name, _ in seen.header_lines}
    assert "content-type" not in names
    assert names <= {"host", "content-length", *_SIDECAR_ADDED}
    assert seen.body == b"hello world"
