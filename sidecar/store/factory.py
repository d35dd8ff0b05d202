"""Opening a state store from `state.url` (the backends' shared observer hook is observe.py)."""

from __future__ import annotations

from urllib.parse import urlsplit

from sidecar.config.model import StateConfig
from sidecar.config.values import STATE_SCHEMES
from sidecar.store.base import StateStore
from sidecar.store.observe import StoreObserver

# The config owns the list of state URL schemes (it checks them without loading the store);
# here they are only split by backend: memory:// is in-process, every other one is Redis.
SUPPORTED_SCHEMES = frozenset(STATE_SCHEMES)
MEMORY_SCHEMES = frozenset({"memory"})
REDIS_SCHEMES = SUPPORTED_SCHEMES - MEMORY_SCHEMES


def open_store(config: StateConfig, observe: StoreObserver | None = None) -> StateStore:
    """Build the store `config.url` names. No network I/O: Redis is dialled on first use.

    Raises ValueError for an unknown scheme or a key prefix that would break hash tags.
    """
    scheme = url_scheme(config.url)
    check_key_prefix(config.key_prefix)
    if scheme in MEMORY_SCHEMES:
        from sidecar.store.memory import MemoryStore

        return MemoryStore(config.key_prefix, observe)
    if scheme in REDIS_SCHEMES:
        # Imported here so a memory:// sidecar never loads redis-py at all.
        from sidecar.store.redis import RedisStore

        return RedisStore(config, observe)
    supported = ", ".join(f"{name}://" for name in sorted(SUPPORTED_SCHEMES))
    raise ValueError(f"state.url: unsupported scheme {scheme!r} (use one of {supported})")


def check_state_config(config: StateConfig) -> None:
    """Everything open_store would reject, without building anything (for config loading)."""
    scheme = url_scheme(config.url)
    check_key_prefix(config.key_prefix)
    if scheme in REDIS_SCHEMES:
        from sidecar.store.redis import check_url

        check_url(config.url)
    elif scheme not in MEMORY_SCHEMES:
        supported = ", ".join(f"{name}://" for name in sorted(SUPPORTED_SCHEMES))
        raise ValueError(f"state.url: unsupported scheme {scheme!r} (use one of {supported})")


def url_scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def check_key_prefix(prefix: str) -> None:
    """Reject braces: Redis Cluster hashes the first {...} of a key, so a prefix holding one
    would put every key in one slot and defeat the per-organisation `{o:ORG}` tags."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"state.key_prefix must not contain '{{' or '}}': {prefix!r}")
