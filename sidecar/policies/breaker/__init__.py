"""The circuit breaker policy (docs/breakers.md)."""
