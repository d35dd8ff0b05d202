"""Opening a state store from `state.url`, and the observer hook both backends report to."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeAlias
from urllib.parse import urlsplit

from sidecar.config.model import StateConfig
from sidecar.store.base import ScriptCall, StateStore, StoreError

# Called after every execute/ping with (operation label, seconds, error kind or None).
# The label is the script name, "a+b" for a batch (in call order), or "ping". Scripts are a
# static set, so labels stay bounded and are safe as metric labels. Must not raise.
StoreObserver: TypeAlias = Callable[[str, float, str | None], None]

MEMORY_SCHEMES = frozenset({"memory"})
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+sentinel"})
SUPPORTED_SCHEMES = MEMORY_SCHEMES | REDIS_SCHEMES


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


def batch_label(calls: Sequence[ScriptCall]) -> str:
    if len(calls) == 1:
        return calls[0].script.name
    return "+".join(call.script.name for call in calls)


def report(
    observe: StoreObserver | None, label: str, started: float, error: StoreError | None
) -> None:
    """Tell the observer how an operation that began at perf_counter() `started` went."""
    if observe is not None:
        observe(label, time.perf_counter() - started, None if error is None else error.kind)
