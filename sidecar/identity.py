"""Who is calling: the organisation and user a request acts for.

Two sources, never both: the identity headers (`identity.org_header`/`user_header`, believed
because the gateway in front sets them), or, with `identity.jwt`, the claims of a JWT that
is verified here. With a JWT configured the identity headers are ignored: a client could
send them itself.

Time: PyJWT's decode has no clock parameter, so its exp/nbf/iat checks are turned off and
done here against the injected clock, with the same comparisons PyJWT makes (expired when
exp <= now - leeway; not yet valid when nbf or iat > now + leeway). Everything else (the
signature, the algorithm, iss and aud) is PyJWT's.

Neither the token nor a claim value ever goes into a log line or an exception message.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from jwt.types import Options

from sidecar.config.jwt import JwtKeys, VerificationKey
from sidecar.config.model import IdentityConfig, JwtConfig

__all__ = ["ANONYMOUS", "Identity", "IdentityRejected", "IdentityResolver"]

# Verified tokens remembered per resolver, and for how long at most (a token's exp may be
# later; five minutes bounds how long a cached answer outlives, say, a key rotation).
CACHE_SIZE: Final = 4096
CACHE_TTL: Final = 300.0


@dataclass(frozen=True, slots=True)
class Identity:
    org: str  # "" when unknown
    user: str  # "" when unknown


ANONYMOUS: Final = Identity("", "")


class IdentityRejected(Exception):
    """A token was sent but cannot be believed; `reason` is short and safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# PyJWT's failures as reasons, most specific first (InvalidSignatureError is a DecodeError).
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.DecodeError, "malformed token"),
)


class IdentityResolver:
    """Reads the identity of one request; built once per loaded config."""

    def __init__(
        self,
        config: IdentityConfig,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
        cache_ttl: float = CACHE_TTL,
    ) -> None:
        self._org_header = config.org_header
        self._user_header = config.user_header
        self._jwt = config.jwt
        self._verifier = _Verifier(config.jwt) if config.jwt is not None else None
        self._clock = clock
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl
        # token -> (valid until, identity), least recently used first. Per instance: a
        # reload builds a new resolver, so a changed key or claim never serves old answers.
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        # Full verifications run (cache misses), for tests and metrics.
        self.verifications = 0

    @property
    def cached(self) -> int:
        """Tokens currently remembered."""
        return len(self._cache)

    def resolve(self, headers: Mapping[str, str]) -> Identity:
        """The caller's identity; raises IdentityRejected for a token that is sent but bad.

        `headers` must match names case-insensitively (aiohttp's request headers do); the
        configured names are lower-case. No token at all is ANONYMOUS, not an error: the
        policies decide whether anonymous callers are allowed.
        """
        if self._verifier is None:
            return Identity(headers.get(self._org_header, ""), headers.get(self._user_header, ""))
        token = self._token(headers)
        if token is None:
            return ANONYMOUS
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if now < cached[0]:
                self._cache.move_to_end(token)
                return cached[1]
            del self._cache[token]
        return self._verify_and_remember(token, now)

    def _token(self, headers: Mapping[str, str]) -> str | None:
        assert self._jwt is not None
        value = headers.get(self._jwt.header)
        if value is None:
            return None
        value = value.strip()
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "bearer":
            value = rest.strip()
        return value or None

    def _verify_and_remember(self, token: str, now: float) -> Identity:
        assert self._verifier is not None
        self.verifications += 1
        # A rejection is not remembered: garbage tokens would evict good ones from the LRU,
        # and most rejections (malformed, wrong algorithm, unknown kid) cost no crypto.
        identity, expires = self._verifier.verify(token, now)
        if self._cache_size > 0:
            self._cache[token] = (min(expires, now + self._cache_ttl), identity)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity


class _Verifier:
    """One `identity.jwt`'s checks: key selection, PyJWT's decode, times and claims."""

    def __init__(self, config: JwtConfig) -> None:
        if config.verify and not (isinstance(config.keys, JwtKeys) and config.keys.keys):
            raise ValueError("identity.jwt has no loaded keys: build it with the config loader")
        self._config = config
        self._keys = config.keys if isinstance(config.keys, JwtKeys) else JwtKeys()
        self._options: Options = {
            "verify_signature": config.verify,
            # Times are checked against the injected clock (see the module docstring).
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            # Checked only when configured: PyJWT would otherwise refuse every token with
            # an aud claim when no audience is expected.
            "verify_iss": config.issuer is not None,
            "verify_aud": config.audience is not None,
            # sub is read like any claim (a number is accepted); jti is not used.
            "verify_sub": False,
            "verify_jti": False,
        }
        self._org = _ClaimPath(config.org_claim)
        self._user = _ClaimPath(config.user_claim)

    def verify(self, token: str, now: float) -> tuple[Identity, float]:
        """The token's identity and the time its verification stops holding."""
        claims = self._decode(token)
        expires = _check_times(claims, now, self._config.leeway)
        return Identity(self._org.read(claims), self._user.read(claims)), expires

    def _decode(self, token: str) -> dict[str, Any]:
        key: VerificationKey | None = None
        if self._config.verify:
            key = self._key_for(token)
        try:
            return jwt.decode(
                token,
                b"" if key is None else key.key,
                # The configured algorithms this key may verify, never the token's own alg.
                algorithms=None if key is None else list(key.algorithms),
                options=self._options,
                audience=self._config.audience,
                issuer=self._config.issuer,
            )
        except jwt.MissingRequiredClaimError as error:
            raise IdentityRejected(f"missing claim {error.claim}") from None
        except jwt.PyJWTError as error:
            raise IdentityRejected(_reason(error)) from None

    def _key_for(self, token: str) -> VerificationKey:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityRejected("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise IdentityRejected("malformed token")
        if alg not in self._config.algorithms:
            raise IdentityRejected("algorithm not allowed")
        key = self._select(header.get("kid"), alg)
        if alg not in key.algorithms:
            raise IdentityRejected("algorithm not allowed")
        return key

    def _select(self, kid: str | None, alg: str) -> VerificationKey:
        keys = self._keys
        if not keys.from_jwks:
            return keys.keys[0]  # a key_file or a secret: one key, whatever the kid says
        if kid is not None:
            key = keys.by_kid.get(kid)
            if key is None:
                raise IdentityRejected("unknown key id")
            return key
        # No kid: only unambiguous when exactly one key of the set verifies this algorithm.
        fitting = [key for key in keys.keys if alg in key.algorithms]
        if len(fitting) != 1:
            raise IdentityRejected("missing key id")
        return fitting[0]


def _reason(error: Exception) -> str:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "invalid token"


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # RFC 7519 §2: a JSON number (PyJWT's int() would also take "123" and true).
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IdentityRejected(f"invalid claim {name}")
    return float(value)


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> float:
    """Checks exp, nbf and iat at `now`; returns when the token expires (inf: never)."""
    exp = _numeric_date(claims, "exp")
    if exp is not None and exp <= now - leeway:
        raise IdentityRejected("token expired")
    for name in ("nbf", "iat"):
        moment = _numeric_date(claims, name)
        if moment is not None and moment > now + leeway:
            raise IdentityRejected("token not yet valid")
    return math.inf if exp is None else exp + leeway


class _ClaimPath:
    """A configured claim: the exact name first, else (if dotted) a path into nested objects.

    The exact name wins so that namespaced claims like `https://example.com/org` work as
    written; `tenant.id` then reaches {"tenant": {"id": ...}} when there is no claim of that
    literal name. Path segments cannot themselves contain dots.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._path = tuple(name.split(".")) if "." in name else None

    def read(self, claims: Mapping[str, Any]) -> str:
        value = claims.get(self.name)
        if value is None and self._path is not None:
            value = _nested(claims, self._path)
        if value is None or value == "":
            raise IdentityRejected(f"missing claim {self.name}")
        text = _claim_text(value)
        if text is None:
            raise IdentityRejected(f"invalid claim {self.name}")
        return text


def _nested(claims: Mapping[str, Any], path: tuple[str, ...]) -> object:
    value: object = claims
    for segment in path:
        if not isinstance(value, dict):
            return None
        value = value.get(segment)
    return value


def _claim_text(value: object) -> str | None:
    """A string as is, a number as its decimal string (42, 1e3 -> "1000"); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None
