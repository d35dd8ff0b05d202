"""The Idempotency-Key header: which values are keys, which are the same key, and what
happens without one (required or not), or on a method the route does not protect."""

from __future__ import annotations

import asyncio

import pytest

from tests.idempotency.conftest import BODY, TEST_TIMEOUT, EnvFactory
from tests.proxy.conftest import exchange

PRINTABLE = "".join(chr(code) for code in range(0x20, 0x7F))


def sf_string(key: str) -> str:
    """`key` as an RFC 8941 string: quoted, with \\ and " escaped."""
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def raw_post(key_lines: list[bytes], body: bytes = BODY) -> bytes:
    """A POST with these Idempotency-Key field lines, as bytes (no client normalises them)."""
    head = [
        b"POST /orders HTTP/1.1",
        b"Host: sidecar.test",
        b"X-Org-Id: acme",
        b"X-User-Id: bob",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    head += [b"Idempotency-Key: " + line for line in key_lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# --- the same key, written two ways ---------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("abc", '"abc"', id="token-then-sf-string"),
        pytest.param('"abc"', "abc", id="sf-string-then-token"),
        pytest.param("abc", " abc\t", id="surrounding-whitespace"),
        pytest.param('"a\\"b"', '"a\\"b"', id="escaped-quote"),
        pytest.param('"a\\\\b"', '"a\\\\b"', id="escaped-backslash"),
        pytest.param("k" * 255, sf_string("k" * 255), id="255-chars-both-forms"),
        pytest.param(sf_string(PRINTABLE), sf_string(PRINTABLE), id="every-printable-char"),
        pytest.param("a", "a", id="one-char"),
        # What Stripe-style clients send bare: namespaced ids, base64, e-mail-like keys.
        pytest.param("order:42", '"order:42"', id="colon"),
        pytest.param("dGVzdC9rZXk+Pw==", '"dGVzdC9rZXk+Pw=="', id="base64-padding"),
        pytest.param("a/b+c=", '"a/b+c="', id="base64-slash-plus"),
        pytest.param("job@host", '"job@host"', id="at-sign"),
        pytest.param("a b", '"a b"', id="inner-space"),
        pytest.param('abc"', '"abc\\""', id="quote-not-first"),
    ],
)
async def test_valid_keys_written_either_way_name_one_record(
    make_env: EnvFactory, first: str, second: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        one = await env.send(key=first)
        assert (one.status, one.replayed, one.n) == (201, "false", 1)
        assert await env.records.settled() == [b"c"]
        two = await env.send(key=second)
        assert (two.status, two.replayed, two.n) == (201, "true", 1)
        assert two.body == one.body
        assert env.upstream.executions == 1


async def test_escapes_are_decoded_so_distinct_keys_stay_distinct(make_env: EnvFactory) -> None:
    """`"a\\"b"` is the key a"b and `"a\\\\b"` the key a\\b: different keys, two records."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        first = await env.send(key='"a\\"b"')
        second = await env.send(key='"a\\\\b"')
        third = await env.send(key='"ab"')
        assert [r.status for r in (first, second, third)] == [201, 201, 201]
        assert [r.n for r in (first, second, third)] == [1, 2, 3]
        assert [r.replayed for r in (first, second, third)] == ["false"] * 3
        assert env.upstream.executions == 3


# --- invalid keys ---------------------------------------------------------------------------

INVALID = [
    pytest.param([b"k" * 256], id="256-char-token"),
    pytest.param([b'"' + b"k" * 256 + b'"'], id="256-char-sf-string"),
    pytest.param([b'""'], id="empty-sf-string"),
    pytest.param([b""], id="empty-value"),
    pytest.param([b'"a\tb"'], id="tab-inside"),
    pytest.param([b'"caf\xc3\xa9"'], id="non-ascii-sf-string"),
    pytest.param([b"caf\xc3\xa9"], id="non-ascii-token"),
    pytest.param([b"abc", b"abc"], id="two-field-lines-same-value"),
    pytest.param([b"abc", b"def"], id="two-field-lines"),
    pytest.param([b'"abc'], id="unterminated-quote"),
    pytest.param([b'"a"b"'], id="unescaped-inner-quote"),
    pytest.param([b'"a\\x"'], id="unknown-escape"),
    pytest.param([b'"abc\\"'], id="escape-eats-closing-quote"),
    pytest.param([b'"abc"x'], id="text-after-string"),
]


@pytest.mark.parametrize("lines", INVALID)
async def test_invalid_key_is_refused_before_anything_runs(
    make_env: EnvFactory, lines: list[bytes]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        reply = await exchange(env.sidecar.port, raw_post(lines))
        assert reply.status == 400
        assert reply.header("Content-Type") == ["application/problem+json"]
        body = reply.json()
        assert body["type"] == "urn:sidecar:problem:idempotency-key-invalid"
        assert body["status"] == 400
        assert env.upstream.executions == 0
        assert await env.records.all() == {}


@pytest.mark.parametrize("control", [b"\x01", b"\x1f", b"\x7f"])
async def test_control_characters_never_reach_the_app(make_env: EnvFactory, control: bytes) -> None:
    """A CTL in a field value makes the whole message invalid HTTP (RFC 9110 §5.5), so the
    sidecar's HTTP parser may refuse it (bad-request) before the policy would
    (idempotency-key-invalid); either way it is a 400 problem and nothing runs."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        reply = await exchange(env.sidecar.port, raw_post([b'"a' + control + b'b"']))
        assert reply.status == 400
        assert reply.json()["type"] in (
            "urn:sidecar:problem:idempotency-key-invalid",
            "urn:sidecar:problem:bad-request",
        )
        assert env.upstream.executions == 0
        assert await env.records.all() == {}


# --- no key ---------------------------------------------------------------------------------


async def test_missing_key_on_a_required_route_is_refused(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{required: true}")
        reply = await env.send(key=None)
        assert reply.status == 400
        assert reply.problem == "idempotency-key-missing"
        assert reply.json()["request_id"] == reply.headers["X-Request-Id"]
        assert env.upstream.executions == 0
        assert await env.outcomes() == {}


async def test_missing_key_on_an_optional_route_passes_through_unprotected(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{required: false}")
        first = await env.send(key=None)
        second = await env.send(key=None)
        assert [first.status, second.status] == [201, 201]
        assert [first.n, second.n] == [1, 2]
        for reply in (first, second):
            assert "Idempotent-Replayed" not in reply.headers
            assert "Idempotency-Expires" not in reply.headers
        assert env.upstream.executions == 2
        assert await env.outcomes() == {"bypassed": 2.0}
        assert await env.records.all() == {}


@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
async def test_methods_not_listed_pass_through_untouched(make_env: EnvFactory, method: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{methods: [POST], required: true}")
        replies = [await env.send(method=method, key="same") for _ in range(2)]
        assert [r.status for r in replies] == [201, 201]
        assert [r.n for r in replies] == [1, 2]
        for reply in replies:
            assert "Idempotent-Replayed" not in reply.headers
            assert "Idempotency-Expires" not in reply.headers
        assert env.upstream.executions == 2
        assert await env.outcomes() == {}
        assert await env.records.all() == {}


async def test_the_configured_header_is_the_key_and_the_default_one_is_ignored(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{header: X-Request-Key}")
        first = await env.send(key="ignored", headers={"X-Request-Key": "one"})
        second = await env.send(key="ignored", headers={"X-Request-Key": "two"})
        again = await env.send(key="other", headers={"X-Request-Key": "one"})
        assert [first.n, second.n, again.n] == [1, 2, 1]
        assert [first.replayed, second.replayed, again.replayed] == ["false", "false", "true"]
        assert env.upstream.executions == 2


async def test_defaults_section_protects_every_route_unless_a_route_turns_it_off(
    make_env: EnvFactory,
) -> None:
    routes = (
        "  - name: plain\n    match: {path_prefix: /plain}\n"
        "    idempotency: {enabled: false}\n"
        "  - name: orders\n    match: {path_prefix: /}\n"
    )
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(
            routes=routes, extra="defaults:\n  idempotency: {methods: [POST], ttl: 1h}\n"
        )
        protected = [await env.send("/orders", key="d") for _ in range(2)]
        assert [r.n for r in protected] == [1, 1]
        assert protected[1].replayed == "true"
        plain = [await env.send("/plain", key="d") for _ in range(2)]
        assert [r.n for r in plain] == [2, 3]
        assert all("Idempotent-Replayed" not in r.headers for r in plain)
        assert env.upstream.executions == 3
