"""The `identity.jwt` section: organisation and user from a verified JWT.

Everything that can be wrong with the keys is found here, at load time: a key file that
cannot be read or parsed, a key that cannot verify one of the listed algorithms, a secret
too short for its hash, two key sources at once. The resolver (sidecar/identity.py) then
only looks keys up; it never reads a file or guesses an algorithm.

Algorithms are pinned per key, never taken from a token (RFC 8725 §2.1, §3.1): an HMAC
algorithm is only ever checked against `secret`, an asymmetric one only against a public
key of the right type, so a token cannot make a public key serve as an HMAC secret.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK, PyJWTError
from jwt.algorithms import HMACAlgorithm

from sidecar.config.issues import IssueLog, join
from sidecar.config.model import JwtConfig
from sidecar.config.raw import RawMap, RawNode, RawScalar, RawSeq
from sidecar.config.schema import (
    Invalid,
    Schema,
    boolean,
    duration,
    list_of,
    mapping_of,
    optional,
    read_fields,
    text,
)
from sidecar.config.values import parse_header_name

__all__ = [
    "ALGORITHMS",
    "JWT",
    "JwtKeys",
    "VerificationKey",
    "jwt_section",
    "warnings_for",
]

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

# RFC 7518 §3.2: an HMAC key must be at least as long as the hash's output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# Each ES algorithm is bound to one curve (RFC 7518 §3.4); ES512 is P-521, not a typo.
EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
ALGORITHMS = (*HMAC_MIN_BYTES, *RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
_CANONICAL = {name.lower(): name for name in ALGORITHMS}
# RFC 7518 §3.3: RSA keys of 2048 bits or more MUST be used.
RSA_MIN_BITS = 2048
_SOURCES = ("key_file", "jwks_file", "secret")


# --- the parsed keys (JwtConfig.keys) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key, ready for PyJWT, with the configured algorithms it may verify."""

    kid: str | None
    family: str  # "HMAC", "RSA", "EC" or "OKP"
    # bytes for HMAC, else a cryptography public key object: what jwt.decode takes.
    key: bytes | PublicKey = field(repr=False)
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JwtKeys:
    """What `identity.jwt` verifies with; empty only when verify is false and no key is set."""

    keys: tuple[VerificationKey, ...] = ()
    # True for a JWKS file: tokens pick their key by `kid`. Otherwise there is one key.
    from_jwks: bool = False
    by_kid: Mapping[str, VerificationKey] = field(default_factory=lambda: MappingProxyType({}))
    # Load-time findings worth a warning at start (see warnings_for).
    notes: tuple[str, ...] = ()


def warnings_for(config: JwtConfig) -> list[str]:
    """What the app should log as warnings when it starts with this config."""
    warnings: list[str] = []
    if not config.verify:
        warnings.append(
            "identity.jwt.verify is false: token signatures are not checked, so any caller can"
            " claim any organisation and user; only use it behind a gateway that verifies"
            " the tokens and strips forged ones"
        )
    if isinstance(config.keys, JwtKeys):
        warnings.extend(config.keys.notes)
    return warnings


# --- keys as converters read them ---------------------------------------------------------


def _parse_algorithm(value: str) -> str:
    if value.lower() == "none":
        raise ValueError(
            "'none' accepts unsigned tokens and is never allowed"
            " (verify: false is the explicit way to take claims from unverified tokens)"
        )
    canonical = _CANONICAL.get(value.lower())
    if canonical is None:
        raise ValueError(f"expected one of {', '.join(ALGORITHMS)}, got {value!r}")
    return canonical


_algorithm_list = list_of(
    text(_parse_algorithm, "an algorithm like RS256"), "a list of algorithms like [RS256]"
)


def _algorithms(node: RawNode, path: str, log: IssueLog) -> tuple[str, ...]:
    algorithms = _algorithm_list(node, path, log)
    if not algorithms:
        raise Invalid("expected at least one algorithm, got an empty list")
    return algorithms


def _secret(node: RawNode, path: str, log: IssueLog) -> str:
    # Never quoted back: config errors are logged and shown on /health. The text of an
    # expanded ${JWT_SECRET} is taken as written, even if it would read as a number.
    if isinstance(node, RawScalar) and node.text and (isinstance(node.value, str) or node.expanded):
        return node.text
    raise Invalid("expected a non-empty string (the value is not shown: it is a secret)")


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty string")
    return value


_file = text(_non_empty, "a file path")
_claim = text(_non_empty, "a claim name like org_id")

JWT: Schema = {
    "header": text(parse_header_name, "a header name like Authorization"),
    "algorithms": _algorithms,
    "key_file": optional(_file),
    "jwks_file": optional(_file),
    "secret": _secret,
    "org_claim": _claim,
    "user_claim": _claim,
    "issuer": optional(text(_non_empty, "a string like https://issuer.example.com/")),
    "audience": optional(text(_non_empty, "a string like my-api")),
    "leeway": duration(allow_zero=True),
    "verify": boolean,
}


# --- the section --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Section:
    """The raw mapping of one `identity.jwt`, for checks that report at its keys' lines."""

    node: RawMap
    path: str
    log: IssueLog
    failed: frozenset[str]  # keys present but not converted (their issue is logged)

    def line(self, key: str) -> int:
        entry = self.node.entries.get(key)
        return entry.value.line if entry is not None else self.node.line

    def add(self, key: str, message: str) -> None:
        self.log.add(self.line(key), join(self.path, key), message)

    def algorithm_positions(self) -> dict[str, tuple[int, int]]:
        """Each listed algorithm's first (index, line) in the `algorithms` list."""
        entry = self.node.entries.get("algorithms")
        if entry is None or not isinstance(entry.value, RawSeq):
            return {}
        positions: dict[str, tuple[int, int]] = {}
        for index, item in enumerate(entry.value.items):
            if isinstance(item, RawScalar):
                name = _CANONICAL.get(item.text.lower())
                if name is not None:
                    positions.setdefault(name, (index, item.line))
        return positions

    def add_algorithm(self, algorithm: str, message: str) -> None:
        index, line = self.algorithm_positions().get(algorithm, (0, self.line("algorithms")))
        self.log.add(line, f"{join(self.path, 'algorithms')}[{index}]", message)


def jwt_section(node: RawNode, path: str, log: IssueLog) -> JwtConfig:
    """`identity.jwt`: its keys converted, cross-checked, and its key material loaded.

    Not `schema.section(...)` with a check: a check returns nothing, and this one's result
    (the parsed keys) has to end up in the frozen JwtConfig it builds.
    """
    mapping = mapping_of(node, "a mapping like {jwks_file: /etc/sidecar/jwks.json}")
    values = read_fields(mapping, path, log, JWT)
    failed = frozenset(key for key in mapping.entries if key in JWT and key not in values)
    config = JwtConfig(**values)
    return _check(config, _Section(mapping, path, log, failed))


def _check(config: JwtConfig, section: _Section) -> JwtConfig:
    source = _single_source(config, section)
    if source is None:
        return config
    loaded = _load_source(config, source, section) if source else _Loaded((), False, ())
    if loaded is None:
        return config
    explicit = "algorithms" in section.node.entries
    algorithms = config.algorithms if explicit else _derived_algorithms(source, loaded)
    if source and not algorithms:
        section.add(source, "holds no key that can verify any algorithm the sidecar supports")
        return config
    config = replace(config, algorithms=algorithms)
    if explicit and "algorithms" not in section.failed:
        _check_algorithms_fit(config, source, loaded, section)
    if source == "secret":
        _check_secret_length(config, section)
    return replace(config, keys=_keys(config, loaded))


def _single_source(config: JwtConfig, section: _Section) -> str | None:
    """The one key source set ("" for none, when verify is false); None after an issue."""
    present = [
        key
        for key in section.node.entries
        if key in _SOURCES and (key in section.failed or getattr(config, key) is not None)
    ]
    for extra in present[1:]:
        first = section.node.entries[present[0]].key_line
        message = (
            "only one of key_file, jwks_file and secret can be set"
            f" ({present[0]} is already set at line {first})"
        )
        section.log.add(section.node.entries[extra].key_line, join(section.path, extra), message)
    if len(present) > 1 or (present and present[0] in section.failed):
        return None
    if not present:
        if config.verify and "verify" not in section.failed:
            section.log.add(
                section.node.line,
                section.path,
                "needs a key to verify tokens: set one of key_file (a PEM public key or"
                " certificate), jwks_file (a JWK Set) or secret (HS256/384/512);"
                " verify: false takes claims from unverified tokens",
            )
            return None
        return ""
    return present[0]


# --- loading the key material -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A loaded key before the configured algorithms narrow what it verifies."""

    kid: str | None
    key: bytes | PublicKey
    # Every algorithm the key's type allows, narrowed by a JWK's own `alg` if it has one.
    fits: tuple[str, ...]
    # The algorithm used when `algorithms` is not set: the JWK's `alg`, or the usual one.
    usual: str
    label: str  # how messages name it: "key 2 (kid 'a')"


@dataclass(frozen=True, slots=True)
class _Loaded:
    candidates: tuple[_Candidate, ...]
    from_jwks: bool
    notes: tuple[str, ...]
    # How warnings name the source: "identity.jwt.jwks_file 'keys.json'".
    where: str = ""


def _load_source(config: JwtConfig, source: str, section: _Section) -> _Loaded | None:
    if source == "secret":
        return _load_secret(config, section)
    path = getattr(config, source)
    assert isinstance(path, str)
    data = _read(path, source, section)
    if data is None:
        return None
    if source == "key_file":
        return _load_key_file(path, data, section)
    return _load_jwks(path, data, section)


def _read(path: str, key: str, section: _Section) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        hint = "" if os.path.isabs(path) else f"; relative to the current directory {os.getcwd()}"
        section.add(key, f"cannot read {path!r}: {error.strerror or error}{hint}")
        return None


def _load_secret(config: JwtConfig, section: _Section) -> _Loaded | None:
    assert config.secret is not None
    key = config.secret.encode("utf-8")
    try:
        # PyJWT refuses PEM- and SSH-looking HMAC secrets: a public key used as a secret is
        # exactly the algorithm-confusion attack. Say so now rather than on every token.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except PyJWTError:
        section.add("secret", "looks like a PEM or SSH key, which cannot be an HMAC secret")
        return None
    notes: tuple[str, ...] = ()
    entry = section.node.entries["secret"]
    if isinstance(entry.value, RawScalar) and not entry.value.expanded:
        notes = (
            f"{join(section.path, 'secret')} is written into the config file; read it from"
            " the environment instead (secret: ${JWT_SECRET})",
        )
    candidate = _Candidate(None, key, tuple(HMAC_MIN_BYTES), "HS256", "the secret")
    return _Loaded((candidate,), False, notes)


def _load_key_file(path: str, data: bytes, section: _Section) -> _Loaded | None:
    try:
        key = _public_key_from_pem(data)
    except ValueError as error:
        section.add("key_file", f"{path!r} {error}")
        return None
    problem = _weak_key(key)
    if problem:
        section.add("key_file", f"{path!r} {problem}")
        return None
    fits = _fits(key)
    return _Loaded((_Candidate(None, key, fits, fits[0], repr(path)),), False, ())


def _public_key_from_pem(data: bytes) -> PublicKey:
    """The one public key of a PEM file (a public key or a certificate); ValueError if not."""
    blocks = data.count(b"-----BEGIN ")
    if blocks == 0:
        raise ValueError(
            "is not a PEM file (expected -----BEGIN PUBLIC KEY----- or -----BEGIN CERTIFICATE-----)"
        )
    if blocks > 1:
        raise ValueError(f"holds {blocks} PEM blocks; key_file takes one (jwks_file takes several)")
    if b"PRIVATE KEY-----" in data:
        # The sidecar only verifies; a private key has no business in its config.
        raise ValueError("holds a private key; give the public key or certificate instead")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("is not a valid PEM public key or certificate") from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"holds {_describe_type(key)}, which no supported algorithm uses")
    return key


def _load_jwks(path: str, data: bytes, section: _Section) -> _Loaded | None:
    try:
        members = _jwks_members(data)
    except ValueError as error:
        section.add("jwks_file", f"{path!r} {error}")
        return None
    where = f"{join(section.path, 'jwks_file')} {path!r}"
    candidates: list[_Candidate] = []
    notes: list[str] = []
    broken = False
    for index, member in enumerate(members):
        try:
            candidate = _jwk_candidate(index, member)
        except ValueError as error:
            section.add("jwks_file", f"{path!r}: {error}")
            broken = True
            continue
        if isinstance(candidate, str):
            notes.append(f"{where}: {candidate}")
        else:
            candidates.append(candidate)
    if broken or not _unique_kids(candidates, path, section):
        return None
    return _Loaded(tuple(candidates), True, tuple(notes), where)


def _jwks_members(data: bytes) -> list[Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"is not valid JSON ({error})") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise ValueError('is not a JWK Set (expected a JSON object with a "keys" list)')
    if not members:
        raise ValueError("holds an empty JWK Set")
    return members


def _jwk_candidate(index: int, member: object) -> _Candidate | str:
    """A JWKS member as a key, a string saying why it is skipped, or ValueError if broken.

    Members are parsed one by one with PyJWK rather than through PyJWKSet, which drops a
    member it cannot parse without a word: a typo would silently lose a key.
    """
    if not isinstance(member, dict):
        raise ValueError(f"key {index} is not a JSON object")
    kid = member.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError(f"key {index}: kid must be a string")
    label = f"key {index}" + (f" (kid {kid!r})" if kid is not None else "")
    skipped = _skip_reason(member)
    if skipped:
        return f"{label} is not used: {skipped}"
    if "d" in member:
        raise ValueError(f"{label} holds a private key; publish only the public part")
    try:
        key = PyJWK(member).key
    except (PyJWTError, ValueError, TypeError) as error:
        # PyJWT's messages sometimes embed the whole JWK: keep only the reason.
        reason = str(error).split(": {", 1)[0]
        raise ValueError(f"{label} is not a valid JWK ({reason})") from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"{label} holds {_describe_type(key)}")
    problem = _weak_key(key)
    if problem:
        raise ValueError(f"{label} {problem}")
    return _narrow_to_jwk_alg(index, label, kid, key, member.get("alg"))


def _skip_reason(member: Mapping[str, Any]) -> str:
    # A published key set may hold keys that are not for us: encryption keys, symmetric
    # keys (HMAC is verified with `secret`), or algorithms the sidecar does not accept.
    if member.get("use") == "enc":
        return "it is an encryption key (use: enc)"
    if member.get("kty") == "oct":
        return "it is a symmetric key (HS* tokens are verified with secret:)"
    if not member.get("kty"):
        raise ValueError("a key has no kty")
    alg = member.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        return f"its alg {alg!r} is not one of {', '.join(ALGORITHMS)}"
    return ""


def _narrow_to_jwk_alg(
    index: int, label: str, kid: str | None, key: PublicKey, alg: object
) -> _Candidate:
    fits = _fits(key)
    if alg is None:
        return _Candidate(kid, key, fits, fits[0], label)
    assert isinstance(alg, str)
    if alg not in fits:
        raise ValueError(f"{label} has alg {alg}, which {_describe_key(key)} cannot verify")
    return _Candidate(kid, key, (alg,), alg, label)


def _unique_kids(candidates: list[_Candidate], path: str, section: _Section) -> bool:
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.kid is None:
            continue
        if candidate.kid in seen:
            section.add("jwks_file", f"{path!r}: two keys share kid {candidate.kid!r}")
            return False
        seen.add(candidate.kid)
    return True


# --- key types and algorithms -------------------------------------------------------------


def _fits(key: PublicKey) -> tuple[str, ...]:
    """The algorithms a public key's type can verify, the usual one first."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return tuple(alg for alg, curve in EC_ALGORITHMS.items() if curve == key.curve.name)
    return ("EdDSA",)


def _family(key: bytes | PublicKey) -> str:
    if isinstance(key, bytes):
        return "HMAC"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    return "EC" if isinstance(key, ec.EllipticCurvePublicKey) else "OKP"


def _weak_key(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        return (
            f"holds a {key.key_size}-bit RSA key; RSA algorithms need at least"
            f" {RSA_MIN_BITS} bits (RFC 7518 §3.3)"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and not _fits(key):
        curve = key.curve.name
        return f"holds an EC key on curve {curve}; ES256/384/512 need P-256, P-384 or P-521"
    return ""


def _describe_key(key: bytes | PublicKey) -> str:
    if isinstance(key, bytes):
        return "a secret"
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {_CURVE_NAMES.get(key.curve.name, key.curve.name)} key"
    return "an Ed25519 key" if isinstance(key, ed25519.Ed25519PublicKey) else "an Ed448 key"


def _describe_type(key: object) -> str:
    return f"a {type(key).__name__.removeprefix('_').replace('PublicKey', '')} key"


def _needs(algorithm: str) -> str:
    if algorithm in HMAC_MIN_BYTES:
        return "a secret"
    if algorithm in RSA_ALGORITHMS:
        return "an RSA key"
    if algorithm in EC_ALGORITHMS:
        return f"an EC {_CURVE_NAMES[EC_ALGORITHMS[algorithm]]} key"
    return "an Ed25519 or Ed448 key"


def _derived_algorithms(source: str, loaded: _Loaded) -> tuple[str, ...]:
    """`algorithms` when not set: each key's usual one (safe: each stays pinned to its key)."""
    if not source:
        return JwtConfig().algorithms
    usual = {candidate.usual for candidate in loaded.candidates}
    return tuple(alg for alg in ALGORITHMS if alg in usual)


def _check_algorithms_fit(
    config: JwtConfig, source: str, loaded: _Loaded, section: _Section
) -> None:
    if not source:
        return  # verify: false without a key: there is nothing to fit
    for algorithm in config.algorithms:
        if any(algorithm in candidate.fits for candidate in loaded.candidates):
            continue
        section.add_algorithm(algorithm, _misfit(algorithm, source, loaded))


def _misfit(algorithm: str, source: str, loaded: _Loaded) -> str:
    if source == "secret":
        return (
            f"{algorithm} needs {_needs(algorithm)} (key_file or jwks_file);"
            " a secret only verifies HS256, HS384 and HS512"
        )
    if algorithm in HMAC_MIN_BYTES:
        # Never verify HMAC against a public key: anyone holding it could sign tokens.
        return f"{algorithm} needs a secret; {source} holds public keys, for asymmetric algorithms"
    held = sorted({_describe_key(candidate.key) for candidate in loaded.candidates})
    what = " and ".join(held) if held else "no usable key"
    if source == "jwks_file":
        return f"{algorithm} needs {_needs(algorithm)}; no key of jwks_file fits ({what})"
    return f"{algorithm} needs {_needs(algorithm)}; key_file holds {what}"


def _check_secret_length(config: JwtConfig, section: _Section) -> None:
    assert config.secret is not None
    length = len(config.secret.encode("utf-8"))
    short = [alg for alg in config.algorithms if length < HMAC_MIN_BYTES.get(alg, 0)]
    if short:
        strictest = max(short, key=HMAC_MIN_BYTES.__getitem__)
        section.add(
            "secret",
            f"is shorter than the {HMAC_MIN_BYTES[strictest]} bytes {strictest} needs (RFC 7518"
            " §3.2: a key at least as long as the hash); the value is not shown",
        )


def _keys(config: JwtConfig, loaded: _Loaded) -> JwtKeys:
    keys: list[VerificationKey] = []
    notes = list(loaded.notes)
    for candidate in loaded.candidates:
        algorithms = tuple(alg for alg in config.algorithms if alg in candidate.fits)
        if not algorithms:
            notes.append(
                f"{loaded.where}: {candidate.label} is not used: it verifies"
                f" {', '.join(candidate.fits)}, which algorithms does not list"
            )
            continue
        family = _family(candidate.key)
        keys.append(VerificationKey(candidate.kid, family, candidate.key, algorithms))
    by_kid = {key.kid: key for key in keys if key.kid is not None}
    return JwtKeys(tuple(keys), loaded.from_jwks, MappingProxyType(by_kid), tuple(notes))
