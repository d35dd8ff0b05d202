"""Fixtures for the state-store contract tests: every `store` test runs on both backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from sidecar.config.model import StateConfig
from sidecar.store import MemoryStore, ScriptCall, StateStore, StoreError, open_store
from tests.redis_fixture import RedisServer
from tests.store import twins
from tests.store.servers import SecureServers, secure_servers

PREFIX = "test:"
# Generous: contract tests are about semantics; timeouts have their own tests.
CONTRACT_TIMEOUT = 2.0
# Upper bound for polling loops (expiry on a real Redis, recovery after a restart).
POLL_DEADLINE = 5.0
POLL_INTERVAL = 0.005

Observation = tuple[str, float, str | None]


class FakeClock:
    """The memory store's clock, moved by hand: expiry tests never sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: int) -> None:
        self.now += ms / 1000


@dataclass
class Harness:
    """One backend under test, with the backend-specific ways to look behind the store."""

    backend: str
    store: StateStore
    observed: list[Observation] = field(default_factory=list)
    clock: FakeClock | None = None
    raw: redis.Redis | None = None

    def stored_keys(self) -> set[str]:
        """Every key the backend holds, as stored (with the prefix)."""
        if self.raw is not None:
            return {key.decode() for key in self.raw.scan_iter()}
        assert isinstance(self.store, MemoryStore)
        return set(self.store.keyspace.live_keys())

    async def run(self, script: object, *keys: str, args: tuple[object, ...] = ()) -> object:
        [result] = await self.store.execute([ScriptCall(script, keys, args)])  # type: ignore[arg-type]
        return result

    async def pttl(self, key: str) -> int:
        result = await self.run(twins.OP, key, args=("PTTL",))
        assert isinstance(result, int)
        return result

    async def until_expired(self, key: str) -> None:
        """Let `key` expire: move the fake clock past it, or poll a real Redis until gone."""
        remaining = await self.pttl(key)
        assert remaining >= 0, f"{key} has no expiry (pttl {remaining})"
        if self.clock is not None:
            self.clock.advance_ms(remaining + 1)
            return
        await poll_until(lambda: self._gone(key), f"{key} to expire")

    async def _gone(self, key: str) -> bool:
        return await self.pttl(key) == -2


async def poll_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Await `check` until true; a bounded poll, never a sleep standing in for an event."""
    deadline = time.monotonic() + POLL_DEADLINE
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {POLL_DEADLINE}s")
        await asyncio.sleep(POLL_INTERVAL)


def raw_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=10)


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    observed: list[Observation] = []

    def observe(label: str, seconds: float, kind: str | None) -> None:
        observed.append((label, seconds, kind))

    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(PREFIX, observe=observe, clock=clock)
        yield Harness("memory", memory, observed, clock=clock)
        await memory.close()
        return
    url = request.getfixturevalue("redis_url")
    server: RedisServer = request.getfixturevalue("redis_server")
    raw = raw_client(server)
    config = StateConfig(url=url, key_prefix=PREFIX, timeout=CONTRACT_TIMEOUT)
    store = open_store(config, observe)
    try:
        yield Harness("redis", store, observed, raw=raw)
    finally:
        await store.close()
        raw.close()


@pytest.fixture
def store(harness: Harness) -> StateStore:
    """An open store, once per backend ("memory" and "redis")."""
    return harness.store


@pytest.fixture
def raw_redis(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test server, to look behind the store's back."""
    client = raw_client(redis_server)
    yield client
    client.close()


@pytest.fixture
async def redis_stores(
    redis_url: str,
) -> AsyncIterator[Callable[..., tuple[StateStore, list[Observation]]]]:
    """Open Redis stores with custom settings; all are closed after the test."""
    opened: list[StateStore] = []

    def open_(url: str = redis_url, **settings: object) -> tuple[StateStore, list[Observation]]:
        observed: list[Observation] = []
        settings.setdefault("key_prefix", PREFIX)
        settings.setdefault("timeout", CONTRACT_TIMEOUT)
        config = StateConfig(url=url, **settings)  # type: ignore[arg-type]
        store = open_store(config, lambda *event: observed.append(event))
        opened.append(store)
        return store, observed

    yield open_
    for store in opened:
        await store.close()


async def expect_error(operation: Awaitable[object]) -> StoreError:
    with pytest.raises(StoreError) as caught:
        await operation
    return caught.value


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServers]:
    """A password + TLS Redis and a password-protected Sentinel watching it."""
    yield from secure_servers(tmp_path_factory.mktemp("secure"))
