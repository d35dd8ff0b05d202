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
_SAFE_ORG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def record_key(org: str, user: str, method: str, route: str, key: str) -> str:
    """The store key of one record: scoped so no other org, user, method or route shares it."""
    scope = "\x00".join((org, user, method, route, key)).encode("utf-8", "surrogateescape")
    return f"idem:{{o:{org_tag(org)}}}:{hashlib.sha256(scope).hexdigest()}"


def org_tag(org: str) -> str:
    """The organisation as it appears in hash tags: itself if plain, else a hash of it.

    Braces or odd bytes in a client-sent org id must not change which slot a key lands in.
    """
    if _SAFE_ORG.fullmatch(org):
        return org
    return "h" + hashlib.sha256(org.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def parse_key(values: Sequence[str]) -> str | None:
    """The key from the header's field lines, or None when it is not a valid key.

    Accepted: an RFC 8941 string (`"8e03..."`, with `\\"` and `\\\\` escapes) as the IETF
    draft asks, or a bare token as Stripe-style clients send; 1-255 printable ASCII.
    """
    if len(values) != 1:
        return None
    value = values[0].strip(" \t")
    if value.startswith('"'):
        key = _parse_sf_string(value)
    elif _TOKEN.fullmatch(value):
        key = value
    else:
        key = None
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
    """What `begin` found: a claim for us, or someone else's record."""

    state: str  # claimed | in_progress | completed | not_replayable
    same_request: bool = True
    status: int = 0
    headers: bytes = b"[]"
    body: bytes = b""
    expires_ms: int = 0
    lease_left_ms: int = 0


def decode_begin(reply: object) -> Found:
    assert isinstance(reply, list) and reply
    state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if state == "claimed":
        return Found(state)
    same = reply[1] == 1
    if state == "in_progress":
        return Found(state, same, lease_left_ms=int(reply[2]))
    if state == "completed":
        return Found(state, same, int(reply[2]), reply[3], reply[4], int(reply[5]))
    return Found(state, same, int(reply[2]), expires_ms=int(reply[3]))


# --- the scripts' Python twins (the memory backend), line for line with the Lua ---------


def _arg(value: ScriptArg) -> bytes:
    """An argument as Lua sees it: Redis passes every ARGV as a string."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _begin(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    key = keys[0]
    token, print_, lease = _arg(args[0]), _arg(args[1]), int(args[2])
    state = ks.hget(key, "s")
    if state is None:
        ks.hset(key, {"s": b"p", "t": token, "f": print_})
        ks.pexpire(key, lease)
        return [b"claimed"]
    same = 1 if ks.hget(key, "f") == print_ else 0
    if state == b"p":
        return [b"in_progress", same, ks.pttl(key)]
    status = int(ks.hget(key, "c") or 0)
    expires = int(ks.hget(key, "e") or 0)
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
    fields = {"s": 1, "c": 2, "h": 3, "b": 4, "e": 5, "f": 7, "t": 0}
    ks.hset(key, {name: _arg(args[index]) for name, index in fields.items()})
    ks.pexpire(key, int(args[6]))
    return result


def _release(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    if _owns(ks, keys[0], _arg(args[0])):
        ks.delete(keys[0])
        return 1
    return 0


BEGIN = Script.from_package("idempotency_begin", _begin)
RENEW = Script.from_package("idempotency_renew", _renew)
FINISH = Script.from_package("idempotency_finish", _finish)
RELEASE = Script.from_package("idempotency_release", _release)
