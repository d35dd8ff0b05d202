"""Host header handling shared by routing and tracing."""

from __future__ import annotations


def host_without_port(host: str) -> str:
    """Host header value, lower-case, without its port (IPv6 literals keep their brackets)."""
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    # "api.example.com." names the same host as "api.example.com" (a fully qualified name).
    return host.partition(":")[0].rstrip(".")
