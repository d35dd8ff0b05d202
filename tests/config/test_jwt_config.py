"""`identity.jwt`: every key, and every load-time check at its line and key path.

Real keys, generated here and written to tmp_path; nothing is mocked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sidecar import cli
from sidecar.config import ConfigError, ConfigIssue, JwtConfig, load_config, parse_config
from sidecar.config.jwt import JwtKeys, warnings_for

SECRET = "s3cret-value-that-is-32-bytes-ok"  # exactly 32 bytes
assert len(SECRET.encode()) == 32


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example.com")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def rsa_jwk(key: rsa.RSAPrivateKey, **extra: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, **extra: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), **extra}


def write(path: Path, data: bytes | str | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return str(path)


def jwt_yaml(*lines: str) -> str:
    """A config whose identity.jwt holds `lines`: `identity:` is line 1, `jwt:` line 2,
    and the first of `lines` line 3."""
    return "identity:\n  jwt:\n" + "".join(f"    {line}\n" for line in lines)


def parse(text: str, env: dict[str, str] | None = None) -> JwtConfig:
    config = parse_config(text, source="t.yaml", env=env or {})
    assert config.identity.jwt is not None
    return config.identity.jwt


def issues(text: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.yaml", env=env or {})
    return list(caught.value.issues)


def only_issue(text: str, env: dict[str, str] | None = None) -> ConfigIssue:
    found = issues(text, env)
    assert len(found) == 1, [str(issue) for issue in found]
    return found[0]


def keys_of(config: JwtConfig) -> JwtKeys:
    assert isinstance(config.keys, JwtKeys)
    return config.keys


# --- valid sections -----------------------------------------------------------------------


def test_no_jwt_section_means_headers() -> None:
    assert parse_config("identity: {org_header: X-Tenant}\n").identity.jwt is None
    assert parse_config("identity:\n  jwt: null\n").identity.jwt is None


def test_a_secret_from_the_environment_with_defaults() -> None:
    config = parse(jwt_yaml("secret: ${JWT_SECRET}"), env={"JWT_SECRET": SECRET})
    assert config == JwtConfig(secret=SECRET, algorithms=("HS256",))
    assert (config.header, config.org_claim, config.user_claim) == (
        "authorization",
        "org_id",
        "sub",
    )
    assert (config.leeway, config.verify, config.issuer, config.audience) == (
        60.0,
        True,
        None,
        None,
    )
    keys = keys_of(config)
    assert not keys.from_jwks
    assert [(k.kid, k.family, k.key, k.algorithms) for k in keys.keys] == [
        (None, "HMAC", SECRET.encode(), ("HS256",))
    ]
    assert warnings_for(config) == []


def test_every_key_is_converted(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key_file = write(tmp_path / "pub.pem", public_pem(rsa_key))
    config = parse(
        jwt_yaml(
            "header: X-Id-Token",
            "algorithms: [rs256, PS256]",  # names are case-insensitive, stored canonical
            f"key_file: {key_file}",
            "org_claim: https://example.com/org",
            "user_claim: email",
            "issuer: https://issuer.example.com/",
            "audience: orders-api",
            "leeway: 5s",
            "verify: true",
        )
    )
    assert config == JwtConfig(
        header="x-id-token",
        algorithms=("RS256", "PS256"),
        key_file=key_file,
        org_claim="https://example.com/org",
        user_claim="email",
        issuer="https://issuer.example.com/",
        audience="orders-api",
        leeway=5.0,
    )
    (key,) = keys_of(config).keys
    assert key.family == "RSA" and key.algorithms == ("RS256", "PS256")
    assert isinstance(key.key, rsa.RSAPublicKey)


def test_key_file_algorithm_follows_the_key_when_not_set(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rsa_file = write(tmp_path / "rsa.pem", public_pem(rsa_key))
    ec_file = write(tmp_path / "ec.pem", public_pem(ec_key))
    p384 = write(tmp_path / "p384.pem", public_pem(ec.generate_private_key(ec.SECP384R1())))
    ed = write(tmp_path / "ed.pem", public_pem(ed25519.Ed25519PrivateKey.generate()))
    assert parse(jwt_yaml(f"key_file: {rsa_file}")).algorithms == ("RS256",)
    assert parse(jwt_yaml(f"key_file: {ec_file}")).algorithms == ("ES256",)
    assert parse(jwt_yaml(f"key_file: {p384}")).algorithms == ("ES384",)
    assert parse(jwt_yaml(f"key_file: {ed}")).algorithms == ("EdDSA",)


def test_key_file_may_be_a_certificate(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key_file = write(tmp_path / "cert.pem", certificate_pem(rsa_key))
    (key,) = keys_of(parse(jwt_yaml(f"key_file: {key_file}"))).keys
    assert isinstance(key.key, rsa.RSAPublicKey)
    assert key.key.public_numbers() == rsa_key.public_key().public_numbers()


def test_relative_key_file_is_read_from_the_current_directory(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keys").mkdir()
    write(tmp_path / "keys" / "pub.pem", public_pem(rsa_key))
    monkeypatch.chdir(tmp_path)
    assert parse(jwt_yaml("key_file: keys/pub.pem")).key_file == "keys/pub.pem"


def test_jwks_file_with_two_keys(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = {"keys": [rsa_jwk(rsa_key, kid="r1"), ec_jwk(ec_key, kid="e1", alg="ES256")]}
    config = parse(jwt_yaml(f"jwks_file: {write(tmp_path / 'jwks.json', jwks)}"))
    assert config.algorithms == ("RS256", "ES256")
    keys = keys_of(config)
    assert keys.from_jwks
    assert {kid: (key.family, key.algorithms) for kid, key in keys.by_kid.items()} == {
        "r1": ("RSA", ("RS256",)),
        "e1": ("EC", ("ES256",)),
    }
    assert warnings_for(config) == []


def test_jwks_members_that_are_not_for_us_are_skipped_with_a_warning(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = {
        "keys": [
            rsa_jwk(rsa_key, kid="sig"),
            rsa_jwk(rsa_key, kid="enc", use="enc"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            ec_jwk(ec_key, kid="ec"),  # fine, but algorithms does not list ES256
        ]
    }
    path = write(tmp_path / "jwks.json", jwks)
    config = parse(jwt_yaml(f"jwks_file: {path}", "algorithms: [RS256]"))
    assert list(keys_of(config).by_kid) == ["sig"]
    warnings = warnings_for(config)
    assert len(warnings) == 3
    assert all(w.startswith(f"identity.jwt.jwks_file {path!r}: key ") for w in warnings)
    assert "(kid 'enc') is not used: it is an encryption key" in warnings[0]
    assert "(kid 'sym') is not used: it is a symmetric key" in warnings[1]
    assert (
        "(kid 'ec') is not used: it verifies ES256, which algorithms does not list" in (warnings[2])
    )


def test_verify_false_needs_no_key_and_is_warned_about() -> None:
    config = parse(jwt_yaml("verify: false"))
    assert not config.verify
    assert keys_of(config).keys == ()
    (warning,) = warnings_for(config)
    assert warning.startswith("identity.jwt.verify is false: token signatures are not checked")


def test_a_secret_written_into_the_file_is_warned_about() -> None:
    config = parse(jwt_yaml(f"secret: {SECRET}"))
    (warning,) = warnings_for(config)
    assert "identity.jwt.secret is written into the config file" in warning
    assert SECRET not in warning


# --- key sources --------------------------------------------------------------------------


def test_no_key_source_is_an_error_at_the_section() -> None:
    issue = only_issue(jwt_yaml("org_claim: tenant"))
    assert (issue.line, issue.key_path) == (3, "identity.jwt")
    assert issue.message.startswith("needs a key to verify tokens: set one of key_file")


def test_an_empty_jwt_section_is_off() -> None:
    # `jwt:` with nothing under it is null, like `jwt: null`: headers stay in use.
    assert parse_config("identity:\n  jwt:\n").identity.jwt is None


def test_an_empty_jwt_mapping_needs_a_key() -> None:
    issue = only_issue("identity:\n  jwt: {}\n")
    assert (issue.line, issue.key_path) == (2, "identity.jwt")


def test_two_key_sources_are_an_error_at_the_second(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    key_file = write(tmp_path / "pub.pem", public_pem(rsa_key))
    issue = only_issue(
        jwt_yaml(f"key_file: {key_file}", "audience: api", "secret: ${S}"), env={"S": SECRET}
    )
    assert (issue.line, issue.key_path) == (5, "identity.jwt.secret")
    assert issue.message == (
        "only one of key_file, jwks_file and secret can be set (key_file is already set at line 3)"
    )


def test_a_null_key_source_does_not_count() -> None:
    config = parse(jwt_yaml("key_file: null", "secret: ${S}"), env={"S": SECRET})
    assert config.key_file is None and config.secret == SECRET


# --- algorithms ---------------------------------------------------------------------------


def test_none_is_never_an_algorithm() -> None:
    issue = only_issue(
        jwt_yaml("algorithms:", "  - HS256", "  - none", "secret: ${S}"), {"S": SECRET}
    )
    assert (issue.line, issue.key_path) == (5, "identity.jwt.algorithms[1]")
    assert issue.message.startswith("'none' accepts unsigned tokens and is never allowed")


def test_unknown_and_empty_algorithm_lists() -> None:
    env = {"S": SECRET}
    issue = only_issue(jwt_yaml("algorithms: [HS256, RS1024]", "secret: ${S}"), env)
    assert (issue.line, issue.key_path) == (3, "identity.jwt.algorithms[1]")
    assert issue.message.startswith("expected one of HS256, HS384, HS512, RS256,")
    assert issue.message.endswith(", EdDSA, got 'RS1024'")
    issue = only_issue(jwt_yaml("algorithms: []", "secret: ${S}"), env)
    assert (issue.line, issue.key_path) == (3, "identity.jwt.algorithms")
    assert issue.message == "expected at least one algorithm, got an empty list"


def test_hmac_algorithms_need_a_secret(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key_file = write(tmp_path / "pub.pem", public_pem(rsa_key))
    issue = only_issue(jwt_yaml(f"key_file: {key_file}", "algorithms: [RS256, HS256]"))
    assert (issue.line, issue.key_path) == (4, "identity.jwt.algorithms[1]")
    assert issue.message.startswith("HS256 needs a secret; key_file holds public keys")


def test_a_secret_verifies_only_hmac() -> None:
    issue = only_issue(
        jwt_yaml("secret: ${S}", "algorithms:", "  - HS256", "  - ES256"), {"S": SECRET}
    )
    assert (issue.line, issue.key_path) == (6, "identity.jwt.algorithms[1]")
    assert issue.message == (
        "ES256 needs an EC P-256 key (key_file or jwks_file);"
        " a secret only verifies HS256, HS384 and HS512"
    )


def test_the_key_type_must_fit_the_algorithm(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rsa_file = write(tmp_path / "rsa.pem", public_pem(rsa_key))
    issue = only_issue(jwt_yaml(f"key_file: {rsa_file}", "algorithms: [ES256]"))
    assert (issue.line, issue.key_path) == (4, "identity.jwt.algorithms[0]")
    assert issue.message == "ES256 needs an EC P-256 key; key_file holds an RSA key"

    p384 = write(tmp_path / "p384.pem", public_pem(ec.generate_private_key(ec.SECP384R1())))
    issue = only_issue(jwt_yaml("algorithms: [ES256]", f"key_file: {p384}"))
    assert (issue.line, issue.key_path) == (3, "identity.jwt.algorithms[0]")
    assert issue.message == "ES256 needs an EC P-256 key; key_file holds an EC P-384 key"

    ec_file = write(tmp_path / "ec.pem", public_pem(ec_key))
    issue = only_issue(jwt_yaml(f"key_file: {ec_file}", "algorithms: [RS256]"))
    assert issue.message == "RS256 needs an RSA key; key_file holds an EC P-256 key"


def test_every_algorithm_needs_a_key_in_the_jwks(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = write(tmp_path / "jwks.json", {"keys": [rsa_jwk(rsa_key, kid="a")]})
    issue = only_issue(jwt_yaml(f"jwks_file: {path}", "algorithms: [RS256, ES256]"))
    assert (issue.line, issue.key_path) == (4, "identity.jwt.algorithms[1]")
    assert issue.message == "ES256 needs an EC P-256 key; no key of jwks_file fits (an RSA key)"


def test_a_jwk_alg_must_fit_its_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = write(tmp_path / "jwks.json", {"keys": [ec_jwk(ec_key, kid="a", alg="ES384")]})
    issue = only_issue(jwt_yaml(f"jwks_file: {path}"))
    assert (issue.line, issue.key_path) == (3, "identity.jwt.jwks_file")
    assert issue.message == (
        f"{path!r}: key 0 (kid 'a') has alg ES384, which an EC P-256 key cannot verify"
    )


# --- reading and parsing the files --------------------------------------------------------


def test_a_missing_key_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    issue = only_issue(jwt_yaml("algorithms: [RS256]", f"key_file: {missing}"))
    assert (issue.line, issue.key_path) == (4, "identity.jwt.key_file")
    assert issue.message == f"cannot read {str(missing)!r}: No such file or directory"


def test_a_missing_relative_file_says_relative_to_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    issue = only_issue(jwt_yaml("jwks_file: keys/jwks.json"))
    assert (issue.line, issue.key_path) == (3, "identity.jwt.jwks_file")
    assert issue.message == (
        "cannot read 'keys/jwks.json': No such file or directory;"
        f" relative to the current directory {tmp_path}"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "is not a PEM file"),
        (
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "is not a valid PEM public key or certificate",
        ),
    ],
)
def test_an_unparsable_key_file_names_the_path(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = write(tmp_path / "bad.pem", content)
    issue = only_issue(jwt_yaml(f"key_file: {path}"))
    assert (issue.line, issue.key_path) == (3, "identity.jwt.key_file")
    assert issue.message.startswith(f"{path!r} {message}")


def test_a_private_key_file_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = write(tmp_path / "private.pem", private_pem(rsa_key))
    issue = only_issue(jwt_yaml(f"key_file: {path}"))
    assert (
        issue.message == f"{path!r} holds a private key; give the public key or certificate instead"
    )


def test_several_pem_blocks_are_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = write(tmp_path / "two.pem", public_pem(rsa_key) * 2)
    issue = only_issue(jwt_yaml(f"key_file: {path}"))
    assert (
        issue.message
        == f"{path!r} holds 2 PEM blocks; key_file takes one (jwks_file takes several)"
    )


def test_a_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = write(tmp_path / "weak.pem", public_pem(weak))
    issue = only_issue(jwt_yaml(f"key_file: {path}"))
    assert issue.message == (
        f"{path!r} holds a 1024-bit RSA key; RSA algorithms need at least 2048 bits (RFC 7518 §3.3)"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", " is not valid JSON ("),
        ('{"kty": "RSA"}', ' is not a JWK Set (expected a JSON object with a "keys" list)'),
        ('{"keys": []}', " holds an empty JWK Set"),
        (
            '{"keys": [{"kty": "RSA", "kid": "x", "n": "AQAB"}]}',
            ": key 0 (kid 'x') is not a valid JWK",
        ),
        ('{"keys": [{"kid": "x"}]}', ": a key has no kty"),
    ],
)
def test_an_unparsable_jwks_file_names_the_path(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path / "jwks.json", content)
    issue = only_issue(jwt_yaml("algorithms: [RS256]", f"jwks_file: {path}"))
    assert (issue.line, issue.key_path) == (4, "identity.jwt.jwks_file")
    assert issue.message.startswith(f"{path!r}{message}")


def test_a_jwks_private_key_or_duplicate_kid_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    private = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    path = write(tmp_path / "private.json", {"keys": [{**private, "kid": "p"}]})
    issue = only_issue(jwt_yaml(f"jwks_file: {path}"))
    assert (
        issue.message
        == f"{path!r}: key 0 (kid 'p') holds a private key; publish only the public part"
    )
    assert "'d'" not in issue.message and private["d"] not in issue.message

    path = write(tmp_path / "twice.json", {"keys": [rsa_jwk(rsa_key, kid="a")] * 2})
    issue = only_issue(jwt_yaml(f"jwks_file: {path}"))
    assert issue.message == f"{path!r}: two keys share kid 'a'"


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "size", "needed"),
    [("HS256", 31, 32), ("HS384", 47, 48), ("HS512", 63, 64)],
)
def test_a_secret_shorter_than_the_hash_is_an_error(algorithm: str, size: int, needed: int) -> None:
    secret = "k" * size
    issue = only_issue(jwt_yaml(f"algorithms: [{algorithm}]", "secret: ${S}"), {"S": secret})
    assert (issue.line, issue.key_path) == (4, "identity.jwt.secret")
    assert issue.message == (
        f"is shorter than the {needed} bytes {algorithm} needs (RFC 7518 §3.2: a key at least"
        " as long as the hash); the value is not shown"
    )
    assert secret not in str(issue)
    # One byte more is enough.
    parse(jwt_yaml(f"algorithms: [{algorithm}]", "secret: ${S}"), {"S": secret + "k"})


def test_the_strictest_hmac_algorithm_sets_the_length() -> None:
    issue = only_issue(jwt_yaml("algorithms: [HS256, HS512]", "secret: ${S}"), {"S": SECRET})
    assert "64 bytes HS512 needs" in issue.message


def test_a_secret_is_never_quoted_back() -> None:
    issue = only_issue(jwt_yaml("secret: 12345"))
    assert (issue.line, issue.key_path) == (3, "identity.jwt.secret")
    assert issue.message == "expected a non-empty string (the value is not shown: it is a secret)"
    assert "12345" not in str(issue)
    issue = only_issue(jwt_yaml("secret: ${S}"), {"S": ""})
    assert issue.key_path == "identity.jwt.secret"


def test_a_numeric_looking_secret_from_the_environment_is_text() -> None:
    digits = "1" * 40
    assert parse(jwt_yaml("secret: ${S}"), {"S": digits}).secret == digits


def test_a_pem_as_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = public_pem(rsa_key).decode()
    issue = only_issue(jwt_yaml("secret: ${S}"), {"S": pem})
    assert (issue.line, issue.key_path) == (3, "identity.jwt.secret")
    assert issue.message == "looks like a PEM or SSH key, which cannot be an HMAC secret"


# --- other keys ---------------------------------------------------------------------------


def test_other_keys_report_at_their_lines() -> None:
    found = issues(
        jwt_yaml(
            "secret: ${S}",
            "header: 'Bad Header'",
            "leeway: 5",
            "verify: 'no'",
            "org_claim: ''",
            "colour: blue",
        ),
        {"S": SECRET},
    )
    assert [(issue.line, issue.key_path) for issue in found] == [
        (4, "identity.jwt.header"),
        (5, "identity.jwt.leeway"),
        (6, "identity.jwt.verify"),
        (7, "identity.jwt.org_claim"),
        (8, "identity.jwt.colour"),
    ]


def test_a_bad_algorithms_list_is_not_cross_checked_again() -> None:
    # The broken list is reported once; no made-up complaint about its default.
    issue = only_issue(jwt_yaml("algorithms: RS256", "secret: ${S}"), {"S": SECRET})
    assert issue.key_path == "identity.jwt.algorithms"


# --- through the file and the command line ------------------------------------------------


def test_check_config_names_file_line_and_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = write(tmp_path / "pub.pem", public_pem(rsa_key))
    config = tmp_path / "sidecar.yaml"
    config.write_text(jwt_yaml(f"key_file: {key_file}", "algorithms: [ES256]"))
    with pytest.raises(ConfigError) as caught:
        load_config(config, env={})
    assert [str(issue) for issue in caught.value.issues] == [
        f"{config}:4: identity.jwt.algorithms[0]: ES256 needs an EC P-256 key;"
        " key_file holds an RSA key"
    ]
    assert cli.main(["check-config", str(config)]) == 1
    assert f"{config}:4: identity.jwt.algorithms[0]: " in capsys.readouterr().err
