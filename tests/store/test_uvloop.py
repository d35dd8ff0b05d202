"""The Redis store on uvloop, the event loop the sidecar runs on in production."""

from __future__ import annotations

import uvloop

from sidecar.config import StateConfig
from sidecar.store import ScriptCall, open_store
from tests.store.twins import INCR_TTL


def test_redis_store_runs_scripts_and_pings_on_uvloop(redis_url: str) -> None:
    async def exercise() -> list[object]:
        store = open_store(StateConfig(url=redis_url, timeout=1.0))
        try:
            call = ScriptCall(INCR_TTL, ("uv",), (1, 60_000))
            first = await store.execute([call])
            both = await store.execute([call, call])
            rtt = await store.ping()
            assert rtt > 0
            return [*first, *both]
        finally:
            await store.close()

    assert uvloop.run(exercise()) == [1, 2, 3]
