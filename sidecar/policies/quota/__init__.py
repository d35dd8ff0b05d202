"""Per-organisation rate limits and quotas (see docs/quotas.md)."""
