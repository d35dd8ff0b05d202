"""Idempotency records in the state store: key layout, encoding, and the four scripts.

A record is one hash per (organisation, user, method, route, key), stored under
`idem:{o:ORG}:<sha256>` so every key of an organisation shares one Redis Cluster slot.
Its life: claimed (in progress, with an owner token and a lease the owner renews) ->
completed (status, allowed headers and body kept for `ttl`), or completed-not-replayable,
or released (deleted, so a retry runs again). Every write after the claim is a
compare-and-set on the owner token, so a stale owner can never overwrite a newer one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from sidecar.store import MemoryKeyspace, Script, ScriptArg
from sidecar.store.keys import org_tag

# What a replay may carry: representation and caching metadata, never per-exchange or
# per-user headers (Set-Cookie, WWW-Authenticate, Date, trace ids, hop-by-hop...).
REPLAYED_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-language",
        "location",
        "content-location",
        "etag",
        "last-modified",
        "link",
        "cache-control",
        "retry-after",
    }
)
MAX_KEY_LENGTH = 255
# The record layout these scripts read and write (field `v`); a record of another layout,
# written by another release sharing the store, is reported rather than misread.
RECORD_VERSION = 1
# A user slot no header value can hold (field values cannot carry control characters), so
# a caller scoped by its credentials never shares a namespace with a user of that name.
_CREDENTIALS_SCOPE = "\x01credentials:"


def record_key(org: str, user: str, method: str, namespace: str, key: str) -> str:
    """The store key of one record: scoped so no other org, user, method or namespace (the
    route's name unless configured) shares it."""
    scope = "\x00".join((org, user, method, namespace, key)).encode("utf-8", "surrogateescape")
    return f"idem:{{o:{org_tag(org)}}}:{hashlib.sha256(scope).hexdigest()}"


def credentials_scope(credentials: str) -> str:
    """The user slot of a caller known only by its credentials: a hash of them, never the
    credentials themselves (the store key must not hold a bearer token)."""
    digest = hashlib.sha256(credentials.encode("utf-8", "surrogateescape")).hexdigest()
    return _CREDENTIALS_SCOPE + digest


def parse_key(values: Sequence[str]) -> str | None:
    """The key from the header's field lines, or None when it is not a valid key.

    Accepted: an RFC 8941 string (`"8e03..."`, with `\\"` and `\\\\` escapes) as the IETF
    draft asks, or the bare value Stripe-style clients send (`order:42`, base64 with `/`,
    `+`, `=`, a UUID, `user@host`...); either way 1-255 printable ASCII characters.
    """
    if len(values) != 1:
        return None
    value = values[0].strip(" \t")
    key = _parse_sf_string(value) if value.startswith('"') else value
    if key is None or not 1 <= len(key) <= MAX_KEY_LENGTH:
        return None
    if not all(0x20 <= ord(char) <= 0x7E for char in key):
        return None
    return key


def _parse_sf_string(value: str) -> str | None:
    if len(value) < 2 or not value.endswith('"'):
        return None
    out = []
    index = 1
    end = len(value) - 1
    while index < end:
        char = value[index]
        if char == "\\":
            index += 1
            if index >= end or value[index] not in '"\\':
                return None
            out.append(value[index])
        elif char == '"':
            return None  # an unescaped quote inside
        else:
            out.append(char)
        index += 1
    return "".join(out)


def fingerprint(
    method: str, target: str, content_type: str, content_encoding: str, body: bytes
) -> str:
    """What makes two requests "the same request": method, path and query, the body's
    type and encoding, and the body's SHA-256."""
    digest = hashlib.sha256()
    for part in (method, target, content_type, content_encoding):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\x00")
    digest.update(hashlib.sha256(body).digest())
    return digest.hexdigest()


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    return orjson.dumps([[name, value] for name, value in headers])


def decode_headers(data: bytes) -> list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in orjson.loads(data)]


@dataclass(frozen=True, slots=True)
class Found:
    """What `begin` found: a claim for us (with its token), or someone else's record."""

    state: str  # claimed | in_progress | completed | not_replayable
    same_request: bool = True
    status: int = 0
    headers: bytes = b"[]"
    body: bytes = b""
    expires_ms: int = 0
    lease_left_ms: int = 0
    token: str = ""


class BadRecord(Exception):
    """A record this release cannot read: garbled, or written in another layout."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "malformed_record" or "foreign_record"


def decode_begin(reply: object) -> Found:
    """The begin script's reply, or BadRecord if the record behind it cannot be read."""
    try:
        return _decode_begin(reply)
    except BadRecord:
        raise
    except (IndexError, TypeError, ValueError) as exc:
        message = f"unreadable idempotency record: {reply!r:.200}"
        raise BadRecord("malformed_record", message) from exc


def _decode_begin(reply: object) -> Found:
    if not isinstance(reply, list) or not reply:
        raise TypeError("not a list")
    state = _text(reply[0])
    if state == "claimed":
        return Found(state, token=_text(reply[1]))
    if state == "foreign":
        raise BadRecord("foreign_record", f"idempotency record of layout {reply[1]!r}")
    if state == "malformed":
        raise BadRecord("malformed_record", f"idempotency record in state {reply[1]!r}")
    same = reply[1] == 1
    if state == "in_progress":
        return Found(state, same, lease_left_ms=_number(reply[2]))
    if state == "completed":
        headers, body = _bytes(reply[3]), _bytes(reply[4])
        decode_headers(headers)  # a garbled header list fails here, not while replaying
        return Found(state, same, _number(reply[2]), headers, body, _number(reply[5]))
    if state == "not_replayable":
        return Found(state, same, _number(reply[2]), expires_ms=_number(reply[3]))
    raise ValueError(f"unknown record state {state!r}")


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {value!r:.50}")
    return value


def _text(value: object) -> str:
    return _bytes(value).decode()


def _number(value: object) -> int:
    # A field the script could not read as a number comes back as nil -> Redis' false,
    # which is None on the wire; the memory twin gives None too.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def accepts_encoding(accept_encoding: str | None, coding: str) -> bool:
    """Whether a request whose Accept-Encoding is `accept_encoding` accepts a body in
    `coding` (RFC 9110 section 12.5.3): no header accepts anything; `*` stands for every coding
    not named; a q of 0 refuses."""
    coding = coding.strip().lower()
    if accept_encoding is None or coding in ("", "identity"):
        return True
    wildcard: bool | None = None
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        accepted = not _zero_q(params)
        if name == coding:
            return accepted
        if name == "*":
            wildcard = accepted
    return bool(wildcard)


def _zero_q(params: str) -> bool:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip()) == 0
            except ValueError:
                return False
    return False


# --- the scripts' Python twins (the memory backend), line for line with the Lua ---------


def _arg(value: ScriptArg) -> bytes:
    """An argument as Lua sees it: Redis passes every ARGV as a string."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


_INTEGER = re.compile(rb"-?[0-9]+")


def _int_field(ks: MemoryKeyspace, key: str, name: str) -> int | None:
    """The Lua's integer(field): None for a missing field or one not a plain integer."""
    value = ks.hget(key, name)
    if value is None or not _INTEGER.fullmatch(value):
        return None
    return int(value)


def _begin(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    key = keys[0]
    owner, print_, lease, version = _arg(args[0]), _arg(args[1]), int(args[2]), _arg(args[3])
    state = ks.hget(key, "s")
    if state is None:
        token = b"%016d-%s" % (ks.unix_us(), owner)
        ks.hset(key, {"s": b"p", "t": token, "f": print_, "v": version})
        ks.pexpire(key, lease)
        return [b"claimed", token]
    stored_version = ks.hget(key, "v") or b"1"
    if stored_version != version:
        return [b"foreign", stored_version]
    same = 1 if ks.hget(key, "f") == print_ else 0
    if state == b"p":
        return [b"in_progress", same, ks.pttl(key)]
    if state not in (b"c", b"n"):
        return [b"malformed", state]
    status = _int_field(ks, key, "c")
    expires = _int_field(ks, key, "e")
    if state == b"c":
        return [b"completed", same, status, ks.hget(key, "h"), ks.hget(key, "b"), expires]
    return [b"not_replayable", same, status, expires]


def _owns(ks: MemoryKeyspace, key: str, token: bytes) -> bool:
    return ks.hget(key, "s") == b"p" and ks.hget(key, "t") == token


def _renew(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    if _owns(ks, keys[0], _arg(args[0])):
        ks.pexpire(keys[0], int(args[1]))
        return 1
    return 0


def _finish(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    key = keys[0]
    state = ks.hget(key, "s")
    result = 1
    if state is None:
        result = 2
    elif ks.hget(key, "t") != _arg(args[0]):
        return 0
    elif state != b"p":
        return 1
    expires = ks.unix_us() // 1000 + int(args[5])
    fields = {"s": 1, "c": 2, "h": 3, "b": 4, "f": 6, "t": 0, "v": 7}
    ks.hset(key, {name: _arg(args[index]) for name, index in fields.items()})
    ks.hset(key, {"e": str(expires).encode()})
    ks.pexpire(key, int(args[5]))
    return result


def _release(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    token, given = ks.hget(keys[0], "t"), _arg(args[0])
    mine = token is not None and (token == given or token.endswith(b"-" + given))
    if ks.hget(keys[0], "s") == b"p" and mine:
        ks.delete(keys[0])
        return 1
    return 0


BEGIN = Script.from_package("idempotency_begin", _begin)
RENEW = Script.from_package("idempotency_renew", _renew)
FINISH = Script.from_package("idempotency_finish", _finish)
RELEASE = Script.from_package("idempotency_release", _release)
