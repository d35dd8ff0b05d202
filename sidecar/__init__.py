"""sidecar: a reverse-proxy sidecar for idempotency, tracing, quotas and circuit breaking."""

__version__ = "0.1.0"
__all__ = ["__version__"]
