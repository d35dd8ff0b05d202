"""IdentityResolver: identity headers, or the claims of a verified JWT.

Real keys and real signatures throughout; time comes from an injected clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDict

from sidecar.config import IdentityConfig, JwtConfig, parse_config
from sidecar.identity import ANONYMOUS, Identity, IdentityRejected, IdentityResolver

NOW = 1_750_000_000.0
SECRET = "an-hs256-secret-of-at-least-32-bytes!"
ISSUER = "https://issuer.example.com/"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def identity_config(
    jwt_lines: list[str] | None, env: dict[str, str] | None = None
) -> IdentityConfig:
    text = "identity:\n  org_header: X-Org-Id\n  user_header: X-User-Id\n"
    if jwt_lines is not None:
        text += "  jwt:\n" + "".join(f"    {line}\n" for line in jwt_lines)
    return parse_config(text, env=env or {}).identity


def resolver(
    jwt_lines: list[str] | None,
    clock: Clock | None = None,
    env: dict[str, str] | None = None,
    **options: Any,
) -> IdentityResolver:
    return IdentityResolver(identity_config(jwt_lines, env), clock=clock or Clock(), **options)


def claims(**extra: Any) -> dict[str, Any]:
    return {"org_id": "acme", "sub": "alice", "iat": NOW, "exp": NOW + 600, **extra}


def token(key: Any, algorithm: str, payload: dict[str, Any] | None = None, **headers: Any) -> str:
    return jwt.encode(claims() if payload is None else payload, key, algorithm, headers=headers)


def bearer(value: str, name: str = "Authorization") -> CIMultiDict[str]:
    return CIMultiDict({name: f"Bearer {value}"})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed by hand (PyJWT refuses to sign with a PEM as the secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def rejected(resolver: IdentityResolver, headers: CIMultiDict[str]) -> str:
    with pytest.raises(IdentityRejected) as caught:
        resolver.resolve(headers)
    error = caught.value
    # The reason is all a client (or a log) ever sees: never the token, nor a chained error.
    value = headers.get("authorization", "")
    assert str(error) == error.reason
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    if value:
        assert value.split()[-1] not in repr(error)
    return error.reason


@pytest.fixture
def hs256() -> IdentityResolver:
    return resolver(["secret: ${S}", f"issuer: {ISSUER}", "audience: orders"], env={"S": SECRET})


def hs_claims(**extra: Any) -> dict[str, Any]:
    return {**claims(iss=ISSUER, aud="orders"), **extra}


def hs_token(**extra: Any) -> str:
    return token(SECRET, "HS256", hs_claims(**extra))


@pytest.fixture
def rs256_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> IdentityConfig:
    (tmp_path / "pub.pem").write_bytes(public_pem(rsa_key))
    return identity_config([f"key_file: {tmp_path / 'pub.pem'}"])


@pytest.fixture
def rs256(rs256_config: IdentityConfig) -> IdentityResolver:
    return IdentityResolver(rs256_config, clock=Clock())


@pytest.fixture
def jwks(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, ec_key: Any
) -> IdentityResolver:
    keys = [
        {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "r1"},
        {**RSAAlgorithm.to_jwk(other_rsa_key.public_key(), as_dict=True), "kid": "r2"},
        {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "e1"},
    ]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    return resolver([f"jwks_file: {tmp_path / 'jwks.json'}", "algorithms: [RS256, ES256]"])


# --- without jwt: the identity headers ----------------------------------------------------


def test_headers_mode_reads_the_identity_headers() -> None:
    plain = resolver(None)
    headers = CIMultiDict([("X-Org-Id", "acme"), ("x-user-id", "alice"), ("X-Org-Id", "evil")])
    assert plain.resolve(headers) == Identity("acme", "alice")  # the first value
    assert plain.resolve(CIMultiDict({"X-Org-Id": "acme"})) == Identity("acme", "")
    assert plain.resolve(CIMultiDict()) == ANONYMOUS
    # A token means nothing without identity.jwt.
    assert plain.resolve(bearer(hs_token())) == ANONYMOUS


# --- valid tokens -------------------------------------------------------------------------


def test_hs256_token(hs256: IdentityResolver) -> None:
    assert hs256.resolve(bearer(hs_token())) == Identity("acme", "alice")


def test_rs256_token(rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey) -> None:
    assert rs256.resolve(bearer(token(rsa_key, "RS256"))) == Identity("acme", "alice")


def test_es256_token(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    (tmp_path / "ec.pem").write_bytes(public_pem(ec_key))
    es256 = resolver([f"key_file: {tmp_path / 'ec.pem'}"])
    assert es256.resolve(bearer(token(ec_key, "ES256"))) == Identity("acme", "alice")


@pytest.mark.parametrize("value", ["Bearer {}", "bearer {}", "BEARER   {}  ", "{}"])
def test_the_bearer_scheme_is_optional_and_case_insensitive(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey, value: str
) -> None:
    headers = CIMultiDict({"Authorization": value.format(token(rsa_key, "RS256"))})
    assert rs256.resolve(headers) == Identity("acme", "alice")


def test_the_token_header_is_configurable(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (tmp_path / "pub.pem").write_bytes(public_pem(rsa_key))
    custom = resolver([f"key_file: {tmp_path / 'pub.pem'}", "header: X-Jwt"])
    assert custom.resolve(bearer(token(rsa_key, "RS256"), name="X-Jwt")).org == "acme"
    assert custom.resolve(bearer(token(rsa_key, "RS256"))) == ANONYMOUS


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer "}])
def test_no_token_is_anonymous(rs256: IdentityResolver, headers: dict[str, str]) -> None:
    assert rs256.resolve(CIMultiDict(headers)) == ANONYMOUS


def test_identity_headers_are_ignored_when_jwt_is_configured(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey
) -> None:
    forged = CIMultiDict({"X-Org-Id": "someone-else", "X-User-Id": "mallory"})
    assert rs256.resolve(forged) == ANONYMOUS
    forged["Authorization"] = f"Bearer {token(rsa_key, 'RS256')}"
    assert rs256.resolve(forged) == Identity("acme", "alice")


# --- claims -------------------------------------------------------------------------------


def test_numeric_claims_become_decimal_strings(hs256: IdentityResolver) -> None:
    assert hs256.resolve(bearer(hs_token(org_id=42, sub=7))) == Identity("42", "7")
    assert hs256.resolve(bearer(hs_token(org_id=1e3))) == Identity("1000", "alice")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"org_id": None}, "missing claim org_id"),
        ({"org_id": ""}, "missing claim org_id"),
        ({"sub": None}, "missing claim sub"),
        ({"org_id": ["acme"]}, "invalid claim org_id"),
        ({"org_id": {"id": 1}}, "invalid claim org_id"),
        ({"org_id": True}, "invalid claim org_id"),
    ],
)
def test_a_missing_or_unusable_claim_is_rejected(
    hs256: IdentityResolver, payload: dict[str, Any], reason: str
) -> None:
    # None leaves the claim out.
    body = {key: value for key, value in hs_claims(**payload).items() if value is not None}
    assert rejected(hs256, bearer(token(SECRET, "HS256", body))) == reason


def test_claim_names_may_be_urls_or_dotted_paths() -> None:
    env = {"S": SECRET}
    by_url = resolver(["secret: ${S}", "org_claim: https://example.com/org"], env=env)
    payload = claims(**{"https://example.com/org": "acme-url"})
    assert by_url.resolve(bearer(token(SECRET, "HS256", payload))).org == "acme-url"

    nested = resolver(
        ["secret: ${S}", "org_claim: tenant.id", "user_claim: profile.email"], env=env
    )
    payload = claims(tenant={"id": 99}, profile={"email": "a@example.com"})
    assert nested.resolve(bearer(token(SECRET, "HS256", payload))) == Identity(
        "99", "a@example.com"
    )
    # The exact name wins over the path.
    payload = claims(**{"tenant.id": "flat"}, tenant={"id": "deep"}, profile={"email": "a@x"})
    assert nested.resolve(bearer(token(SECRET, "HS256", payload))).org == "flat"
    payload = claims(tenant="not-an-object", profile={"email": "a@example.com"})
    assert rejected(nested, bearer(token(SECRET, "HS256", payload))) == "missing claim tenant.id"


# --- forged, expired and otherwise wrong tokens -------------------------------------------


def test_a_token_signed_with_another_key_is_rejected(
    rs256: IdentityResolver, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    assert rejected(rs256, bearer(token(other_rsa_key, "RS256"))) == "bad signature"


def test_a_tampered_payload_is_rejected(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey
) -> None:
    header, _, signature = token(rsa_key, "RS256").split(".")
    payload = b64(json.dumps(claims(org_id="someone-else")).encode())
    assert rejected(rs256, bearer(f"{header}.{payload}.{signature}")) == "bad signature"


def test_expiry_follows_the_clock_and_the_leeway(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    (tmp_path / "pub.pem").write_bytes(public_pem(rsa_key))
    clock = Clock()
    rs = resolver([f"key_file: {tmp_path / 'pub.pem'}", "leeway: 30s"], clock)
    expired = token(rsa_key, "RS256", claims(exp=NOW - 31))
    assert rejected(rs, bearer(expired)) == "token expired"
    within_leeway = token(rsa_key, "RS256", claims(exp=NOW - 29))
    assert rs.resolve(bearer(within_leeway)).org == "acme"
    clock.now = NOW + 1
    assert rejected(rs, bearer(within_leeway)) == "token expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_not_yet_valid_is_rejected(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey, claim: str
) -> None:
    # The default leeway is 60 s.
    assert rs256.resolve(bearer(token(rsa_key, "RS256", claims(**{claim: NOW + 59})))).org
    early = token(rsa_key, "RS256", claims(**{claim: NOW + 61}))
    assert rejected(rs256, bearer(early)) == "token not yet valid"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_time_claim_must_be_a_number(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey, claim: str
) -> None:
    bad = token(rsa_key, "RS256", claims(**{claim: str(int(NOW + 600))}))
    assert rejected(rs256, bearer(bad)) == f"invalid claim {claim}"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"iss": "https://evil.example.com/"}, "wrong issuer"),
        ({"iss": None}, "missing claim iss"),
        ({"aud": "billing"}, "wrong audience"),
        ({"aud": None}, "missing claim aud"),
    ],
)
def test_issuer_and_audience_are_checked(
    hs256: IdentityResolver, extra: dict[str, Any], reason: str
) -> None:
    body = {key: value for key, value in hs_claims(**extra).items() if value is not None}
    assert rejected(hs256, bearer(token(SECRET, "HS256", body))) == reason


def test_an_audience_list_containing_ours_is_accepted(hs256: IdentityResolver) -> None:
    payload = claims(iss=ISSUER, aud=["billing", "orders"])
    assert hs256.resolve(bearer(token(SECRET, "HS256", payload))).org == "acme"


def test_an_audience_is_not_required_unless_configured(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert rs256.resolve(bearer(token(rsa_key, "RS256", claims(aud="anything")))).org == "acme"


def test_alg_none_is_rejected(rs256: IdentityResolver) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert rejected(rs256, bearer(unsigned)) == "algorithm not allowed"


def test_algorithm_confusion_is_rejected(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic attack: HS256 "signed" with the server's own public key as the secret.
    forged = hand_signed_hs256({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(rsa_key))
    assert rejected(rs256, bearer(forged)) == "algorithm not allowed"


def test_an_algorithm_not_listed_is_rejected(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Same key, a listed family, but algorithms is [RS256] (derived from the key).
    assert rejected(rs256, bearer(token(rsa_key, "PS256"))) == "algorithm not allowed"


@pytest.mark.parametrize(
    "value",
    ["abc", "a.b.c", "e30.e30", "Basic dXNlcjpwYXNz", "eyJhbGciOiJSUzI1NiJ9.!!!.sig"],
)
def test_a_malformed_token_is_rejected(rs256: IdentityResolver, value: str) -> None:
    assert rejected(rs256, CIMultiDict({"Authorization": value})) == "malformed token"


def test_a_non_object_payload_is_malformed(hs256: IdentityResolver) -> None:
    header = b64(json.dumps({"alg": "HS256"}).encode())
    payload = b64(b"[1, 2]")
    signing_input = f"{header}.{payload}".encode()
    signature = b64(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
    value = f"{header}.{payload}.{signature}"
    assert rejected(hs256, bearer(value)) == "malformed token"


# --- JWKS: keys by kid --------------------------------------------------------------------


def test_jwks_picks_the_key_by_kid(
    jwks: IdentityResolver, rsa_key: Any, other_rsa_key: Any, ec_key: Any
) -> None:
    assert jwks.resolve(bearer(token(rsa_key, "RS256", kid="r1"))).org == "acme"
    assert jwks.resolve(bearer(token(other_rsa_key, "RS256", kid="r2"))).org == "acme"
    assert jwks.resolve(bearer(token(ec_key, "ES256", kid="e1"))).org == "acme"


def test_jwks_a_kid_naming_another_key_is_a_bad_signature(
    jwks: IdentityResolver, rsa_key: Any
) -> None:
    assert rejected(jwks, bearer(token(rsa_key, "RS256", kid="r2"))) == "bad signature"


def test_jwks_a_kid_of_another_key_type_is_a_wrong_algorithm(
    jwks: IdentityResolver, ec_key: Any
) -> None:
    assert rejected(jwks, bearer(token(ec_key, "ES256", kid="r1"))) == "algorithm not allowed"


def test_jwks_unknown_or_missing_kid(jwks: IdentityResolver, rsa_key: Any, ec_key: Any) -> None:
    assert rejected(jwks, bearer(token(rsa_key, "RS256", kid="gone"))) == "unknown key id"
    # Two RSA keys: a token without kid is ambiguous.
    assert rejected(jwks, bearer(token(rsa_key, "RS256"))) == "missing key id"
    # One EC key: a token without kid can only mean that one.
    assert jwks.resolve(bearer(token(ec_key, "ES256"))).org == "acme"


# --- verify: false ------------------------------------------------------------------------


def test_verify_false_takes_claims_without_checking_signatures(
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    unverified = resolver(["verify: false", "audience: orders"])
    assert unverified.resolve(bearer(token(other_rsa_key, "RS256", claims(aud="orders")))) == (
        Identity("acme", "alice")
    )
    unsigned = jwt.encode(claims(aud="orders"), None, algorithm="none")
    assert unverified.resolve(bearer(unsigned)).org == "acme"
    # Still checked: the token's shape, its times and the configured claims.
    assert rejected(unverified, bearer("not-a-token")) == "malformed token"
    expired = jwt.encode(claims(aud="orders", exp=NOW - 3600), None, algorithm="none")
    assert rejected(unverified, bearer(expired)) == "token expired"
    wrong = jwt.encode(claims(aud="billing"), None, algorithm="none")
    assert rejected(unverified, bearer(wrong)) == "wrong audience"


# --- the cache ----------------------------------------------------------------------------


def test_a_verified_token_is_not_verified_again(
    rs256: IdentityResolver, rsa_key: rsa.RSAPrivateKey
) -> None:
    headers = bearer(token(rsa_key, "RS256"))
    assert [rs256.resolve(headers) for _ in range(5)] == [Identity("acme", "alice")] * 5
    assert rs256.verifications == 1
    assert rs256.cached == 1


def test_a_rejected_token_is_not_cached(
    rs256: IdentityResolver, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    headers = bearer(token(other_rsa_key, "RS256"))
    for _ in range(3):
        assert rejected(rs256, headers) == "bad signature"
    assert rs256.verifications == 3
    assert rs256.cached == 0


def test_a_cached_token_expires_with_its_exp(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    (tmp_path / "pub.pem").write_bytes(public_pem(rsa_key))
    clock = Clock()
    rs = resolver([f"key_file: {tmp_path / 'pub.pem'}", "leeway: 10s"], clock)
    headers = bearer(token(rsa_key, "RS256", claims(exp=NOW + 100)))
    assert rs.resolve(headers).org == "acme"
    clock.now = NOW + 109  # exp + leeway not yet reached: still the cached answer
    assert rs.resolve(headers).org == "acme"
    assert rs.verifications == 1
    clock.now = NOW + 110
    assert rejected(rs, headers) == "token expired"
    assert rs.verifications == 2
    assert rs.cached == 0


def test_a_cached_token_is_verified_again_after_five_minutes(
    rs256_config: IdentityConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    rs = IdentityResolver(rs256_config, clock=clock)
    headers = bearer(token(rsa_key, "RS256", claims(exp=NOW + 3600)))
    rs.resolve(headers)
    clock.now = NOW + 299
    rs.resolve(headers)
    assert rs.verifications == 1
    clock.now = NOW + 300
    rs.resolve(headers)
    assert rs.verifications == 2


def test_the_cache_is_a_bounded_lru(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (tmp_path / "pub.pem").write_bytes(public_pem(rsa_key))
    rs = resolver([f"key_file: {tmp_path / 'pub.pem'}"], cache_size=2)
    first, second, third = (bearer(token(rsa_key, "RS256", claims(sub=f"u{n}"))) for n in range(3))
    rs.resolve(first)
    rs.resolve(second)
    rs.resolve(first)  # first is now the most recently used
    rs.resolve(third)  # evicts second
    assert (rs.cached, rs.verifications) == (2, 3)
    rs.resolve(first)
    rs.resolve(third)
    assert rs.verifications == 3
    assert rs.resolve(second).user == "u1"
    assert rs.verifications == 4


def test_each_resolver_has_its_own_cache(rs256_config: IdentityConfig, rsa_key: Any) -> None:
    headers = bearer(token(rsa_key, "RS256"))
    rs256 = IdentityResolver(rs256_config, clock=Clock())
    rs256.resolve(headers)
    fresh = IdentityResolver(rs256_config, clock=Clock())
    fresh.resolve(headers)
    assert (rs256.verifications, fresh.verifications) == (1, 1)


def test_a_config_built_by_hand_without_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="no loaded keys"):
        IdentityResolver(IdentityConfig(jwt=JwtConfig(secret=SECRET, algorithms=("HS256",))))
