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
    tests (same port, PING-ready when start() returns). Fails if redis-server is missing.
    """
    yield from redis_server_session()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, running and FLUSHALLed for this test."""
    yield from redis_url_for_test(redis_server)


# --- end Redis ---------------------------------------------------------------------------


# --- Privacy: no test's log output may contain the planted secret ------------------------
from tests.support import LOG_OUTPUT, PLANTED_SECRET  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_planted_secret_in_any_log() -> Iterator[None]:
    """Fails the session if any log line of any test (in-process or a sidecar subprocess)
    contains the planted secret that privacy tests send in credentials and queries."""
    yield
    planted = PLANTED_SECRET.encode()
    leaks = [chunk[:300] for chunk in LOG_OUTPUT if planted in chunk]
    assert not leaks, f"the planted secret reached the logs: {leaks[:3]}"


# --- end privacy -------------------------------------------------------------------------
