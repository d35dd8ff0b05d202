"""Parsers for the string-valued settings; each ValueError's text is the user-facing message."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.config.describe import mask_url
from sidecar.config.model import Address, IPNetwork

__all__ = [
    "ADDRESS_EXPECTED",
    "STATE_SCHEMES",
    "UpstreamTarget",
    "parse_address",
    "parse_header_name",
    "parse_host",
    "parse_key_prefix",
    "parse_method",
    "parse_network",
    "parse_path",
    "parse_path_regex",
    "parse_route_name",
    "parse_state_url",
    "parse_upstream_url",
]

ADDRESS_EXPECTED = "an address like 0.0.0.0:8000 or '[::]:8000'"
# The one list of state URL schemes, in the order error messages give them. The store
# (sidecar/store/factory.py) imports it and sends memory:// in-process, the rest to Redis.
STATE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "unix")
UPSTREAM_SCHEMES = ("http", "https")

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# RFC 9110 token characters: what header names and method names are made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Route names become Prometheus label values and log fields: keep them boring.
_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_hostname(host: str) -> None:
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a valid host name")
    if all(label.isdigit() for label in host.rstrip(".").split(".")):
        ipaddress.IPv4Address(host)  # 999.1.1.1 looks like a name but is a broken address


def parse_address(text: str) -> Address:
    """`host:port`, with IPv6 hosts in brackets: `0.0.0.0:8000`, `[::]:8000`."""
    host, colon, port = text.rpartition(":")
    try:
        if not colon or not host:
            raise ValueError("host and port are both required")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            ipaddress.IPv6Address(host)
        elif ":" in host:
            raise ValueError("IPv6 addresses go in brackets, e.g. '[::]:8000'")
        else:
            _check_hostname(host)
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be a number from 0 to 65535, got {port!r}")
    except ValueError as error:
        raise ValueError(f"expected {ADDRESS_EXPECTED}, got {text!r} ({error})") from None
    return Address(host.lower(), int(port))


def parse_network(text: str) -> IPNetwork:
    """An IP address (a /32 or /128) or a CIDR block without host bits set."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise ValueError(
            f"expected an IP address or CIDR like 10.0.0.0/8, got {text!r} ({error})"
        ) from None


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    url: str
    scheme: str
    host: str
    port: int
    base_path: str


def parse_upstream_url(text: str) -> UpstreamTarget:
    """`http://host[:port][/base/path]`: where and under which path prefix requests go."""
    try:
        return _upstream_target(text)
    except ValueError as error:
        raise ValueError(
            f"expected a URL like http://127.0.0.1:8080 or http://app:8080/api, got {text!r}"
            f" ({error})"
        ) from None


def _upstream_target(text: str) -> UpstreamTarget:
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in UPSTREAM_SCHEMES:
        raise ValueError(f"the scheme must be {' or '.join(UPSTREAM_SCHEMES)}")
    if not parts.hostname:
        raise ValueError("a host is required")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported")
    if "?" in text or "#" in text:
        raise ValueError("a query or fragment is not allowed")
    port = parts.port  # raises ValueError for a malformed or out-of-range port
    default_port = 443 if scheme == "https" else 80
    return UpstreamTarget(
        url=text,
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else default_port,
        base_path=parts.path.rstrip("/"),
    )


def parse_state_url(text: str) -> str:
    """Only the scheme is checked: the store backend owns the rest of the URL's meaning."""
    scheme, separator, _ = text.partition("://")
    if not separator or scheme.lower() not in STATE_SCHEMES:
        # Masked: this URL usually carries the Redis password, and errors get logged.
        raise ValueError(
            f"expected a URL like memory:// or redis://host:6379/0, got {mask_url(text)!r}"
            f" (the scheme must be one of {', '.join(STATE_SCHEMES)})"
        )
    return text


def parse_header_name(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"expected a header name like X-Org-Id, got {text!r}")
    return text.lower()


def parse_header_name_as_written(text: str) -> str:
    """A header name the sidecar writes: validated, its case kept for readability."""
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"expected a header name like X-Request-Id, got {text!r}")
    return text


def parse_otlp_endpoint(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError(
            f"expected an OTLP/HTTP URL like http://otel-collector:4318/v1/traces,"
            f" got {mask_url(text)!r}"
        )
    if "@" in rest.partition("/")[0]:
        # The endpoint is logged when export fails: it must never hold a secret.
        raise ValueError("credentials in the URL are not supported")
    return text


def parse_method(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"expected an HTTP method like GET, got {text!r}")
    return text.upper()


def parse_route_name(text: str) -> str:
    if not _ROUTE_NAME.fullmatch(text):
        raise ValueError(
            f"expected a name of 1 to 64 letters, digits, '_', '.' or '-', got {text!r}"
        )
    return text


def parse_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {text!r}")
    if any(char in text for char in "?# \t"):
        raise ValueError(f"a path cannot contain '?', '#' or whitespace, got {text!r}")
    return text


def parse_key_prefix(text: str) -> str:
    # Redis Cluster hashes only the first {...} of a key: braces in the prefix would put
    # every key in one slot and defeat the per-organisation {o:ORG} hash tags.
    if "{" in text or "}" in text:
        raise ValueError(f"a key prefix cannot contain '{{' or '}}', got {text!r}")
    return text


def parse_path_regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as error:
        where = f" at position {error.pos}" if error.pos is not None else ""
        raise ValueError(f"invalid regular expression {text!r}: {error.msg}{where}") from None


def parse_host(text: str) -> str:
    """An exact host or a `*.example.com` wildcard, lower-case; ports are never part of it."""
    host = text.lower().removesuffix(".")  # "example.com." is the same host, fully qualified
    name = host.removeprefix("*.")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as error:
            raise ValueError(
                f"expected a host like api.example.com, got {text!r} ({error})"
            ) from None
        return host
    if ":" in host:
        raise ValueError(
            f"expected a host without a port, got {text!r} (host matching ignores the port)"
        )
    try:
        _check_hostname(name)
    except ValueError as error:
        raise ValueError(
            f"expected a host like api.example.com or *.example.com, got {text!r} ({error})"
        ) from None
    return host
