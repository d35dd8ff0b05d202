"""Shared fixtures. Other fixture groups go in their own delimited blocks below."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# --- Redis (a real redis-server; implementation in tests/redis_fixture.py) -------------
from tests.redis_fixture import RedisServer, redis_server_session, redis_url_for_test


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free 127.0.0.1 port for the whole session.

    Has `.url`, `.port`, `.pid`, `.unix_socket`, and `stop()` / `start()` for "Redis down"
    tests (same port, PING-ready when start() returns). Skips if redis-server is missing.
    """
    yield from redis_server_session()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, running and FLUSHALLed for this test."""
    yield from redis_url_for_test(redis_server)


# --- end Redis ---------------------------------------------------------------------------
