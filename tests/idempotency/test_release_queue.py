"""Claims given back after a store outage: every one released once the store answers,
in batches, so a recovering Redis is not met by one retry loop per failed request."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from tests.fault_proxy import FaultProxy
from tests.idempotency.conftest import (
    RECORD_PREFIX,
    Upstream,
    config_text,
    eventually,
    send,
)
from tests.proxy.conftest import config_from_yaml, metric_samples, metric_value
from tests.redis_fixture import RedisServer
from tests.support import run_app, run_sidecar

CLAIMS = 10


async def test_claims_whose_replies_were_lost_are_all_released_in_batches(
    redis_server: RedisServer,
) -> None:
    async with asyncio.timeout(20):
        upstream = Upstream()
        raw = aioredis.Redis(port=redis_server.port)
        async with FaultProxy(redis_server.port) as proxy, run_app(upstream.app()) as app_url:
            config = config_from_yaml(
                config_text(proxy.redis_url(), app_url, "{lease: 30s}", state_timeout="100ms")
            )
            async with run_sidecar(config) as sidecar, aiohttp.ClientSession() as session:
                await raw.flushall()
                # Scripts loaded beforehand: a NOSCRIPT answer would mean nothing ran.
                assert (await send(session, sidecar.url, key="warm-up")).status == 201
                # Redis tells us of every claim written (an HSET on a record), whatever
                # happens to its reply.
                await raw.config_set("notify-keyspace-events", "Eh")
                events = raw.pubsub()
                await events.subscribe("__keyevent@0__:hset")
                await events.get_message(timeout=1)  # the subscription's confirmation
                proxy.drop_replies()
                # One after another: each claim lands on a fresh connection (the last one
                # went silent and was dropped), and each reply is lost.
                for i in range(CLAIMS):
                    reply = await send(session, sidecar.url, key=f"k{i}")
                    assert reply.status == 503
                assert upstream.executions == 1  # the warm-up only

                claimed: set[bytes] = set()

                async def all_claimed() -> bool:
                    message = await events.get_message(timeout=0.05)
                    if message is not None and message["type"] == "message":
                        claimed.add(message["data"])
                    return len(claimed) == CLAIMS

                # The claims reached Redis; only their replies were lost. (Releases sent
                # meanwhile may land too: only their replies are lost, and they are sent
                # again until one is answered.)
                await eventually(all_claimed, f"{CLAIMS} claims written in Redis")
                await events.aclose()
                proxy.resume()

                async def all_released() -> bool:
                    records = await raw.keys(RECORD_PREFIX + "*")
                    states = [await raw.hget(record, "s") for record in records]
                    return states == [b"c"]  # only the warm-up's completed record

                await eventually(all_released, "every lost claim released", timeout=8)
                tried = await metric_value(
                    sidecar.admin_url,
                    "sidecar_store_request_duration_seconds_count",
                    operation="idempotency_release",
                )
                errors = await metric_samples(sidecar.admin_url, "sidecar_store_errors_total")
                failed = sum(
                    value
                    for labels, value in errors.items()
                    if dict(labels)["operation"] == "idempotency_release"
                )
                # They went out together: one round trip that landed released them all.
                assert tried - failed == 1, (tried, failed)
                retry = await send(session, sidecar.url, key="k0")
                assert (retry.status, retry.n) == (201, 2)
        await raw.aclose()
        upstream.release_all()
