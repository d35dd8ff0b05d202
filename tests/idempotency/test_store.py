"""The records as stored (Redis key layout, fields, TTLs), the store going away, and what
the sidecar reports: sidecar_idempotency_total outcomes and idempotency.* log events."""

from __future__ import annotations

import asyncio
import re
import time
from email.utils import parsedate_to_datetime

import orjson
import pytest

from sidecar.policies.idempotency.records import REPLAYED_HEADERS
from tests.idempotency.conftest import TEST_TIMEOUT, EnvFactory, eventually
from tests.proxy.conftest import metric_samples

redis_only = pytest.mark.parametrize("backend", ["redis"], indirect=True)

HEX64 = "[0-9a-f]{64}"


# --- Redis data layout ----------------------------------------------------------------------


@redis_only
async def test_completed_record_layout_in_redis(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{ttl: 1h, lease: 1s}")
        first = await env.send(key="layout")
        assert first.status == 201
        assert await env.records.settled() == [b"c"]
        [(key, fields)] = (await env.records.all()).items()
        assert re.fullmatch(r"sidecar:idem:\{o:acme\}:" + HEX64, key), key
        # t (the owner token) may stay after completion (docs/idempotency.md).
        assert set(fields) - {"t"} == {"s", "c", "h", "b", "e", "f", "v"}
        assert fields["v"] == b"1"
        assert fields["s"] == b"c"
        assert fields["c"] == b"201"
        assert fields["b"] == first.body
        assert re.fullmatch(HEX64, fields["f"].decode())
        stored = orjson.loads(fields["h"])
        assert {name.lower() for name, _ in stored} <= REPLAYED_HEADERS
        assert ["Location", "/orders/1"] in stored
        replay = await env.send(key="layout")
        expires = parsedate_to_datetime(replay.headers["Idempotency-Expires"]).timestamp()
        assert int(fields["e"]) // 1000 == int(expires)
        assert 3_595_000 < await env.records.pttl(key) <= 3_600_000


@redis_only
async def test_in_progress_record_layout_in_redis(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{ttl: 1h, lease: 1s}")
        running = asyncio.create_task(env.send("/slow", key="running"))
        await env.wait_executions(1)
        [(key, fields)] = (await env.records.all()).items()
        assert re.fullmatch(r"sidecar:idem:\{o:acme\}:" + HEX64, key), key
        assert set(fields) == {"s", "t", "f", "v"}
        assert fields["s"] == b"p"
        # The claim token: the store's clock in microseconds, then the owner's random id.
        assert re.fullmatch(rb"[0-9]{16}-[0-9a-f]{32}", fields["t"]), fields["t"]
        assert abs(int(fields["t"][:16]) / 1e6 - time.time()) < 60
        assert 0 < await env.records.pttl(key) <= 1000
        env.upstream.gate.set()
        assert (await running).status == 201
        assert await env.records.settled() == [b"c"]
        completed = (await env.records.all())[key]
        assert completed["t"] == fields["t"]
        assert 3_595_000 < await env.records.pttl(key) <= 3_600_000


@redis_only
@pytest.mark.parametrize("org", ["{evil}", "a}b{c", "two words", "x" * 65, "", "{o:acme}"])
async def test_odd_org_ids_get_a_hashed_hash_tag(make_env: EnvFactory, org: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        for key in ("one", "two"):
            assert (await env.send(key=key, org=org)).status == 201
        assert (await env.send(key="one", org="acme")).status == 201
        assert await env.records.settled() == [b"c"] * 3
        keys = sorted(await env.records.all())
        plain = [k for k in keys if k.startswith("sidecar:idem:{o:acme}:")]
        hashed = [k for k in keys if k not in plain]
        assert len(plain) == 1 and len(hashed) == 2
        tags = set()
        for key in hashed:
            match = re.fullmatch(r"sidecar:idem:(\{o:h[0-9a-f]{24}\}):" + HEX64, key)
            assert match, key
            # The tag is the only brace pair: Redis Cluster would hash exactly it.
            assert key.count("{") == key.count("}") == 1
            tags.add(match.group(1))
        assert len(tags) == 1  # one org, one slot


# --- the store going away -------------------------------------------------------------------

CLOSED_AND_OPEN = (
    "  - name: closed\n    match: {path_prefix: /closed}\n"
    "    idempotency: {on_store_error: closed}\n"
    "  - name: open\n    match: {path_prefix: /open}\n"
    "    idempotency: {on_store_error: open}\n"
)


@redis_only
async def test_store_down_fails_closed_or_open_as_configured(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env(routes=CLOSED_AND_OPEN)
        server = env.backend.server
        assert server is not None
        server.stop()
        try:
            closed = await env.send("/closed", key="k")
            assert closed.status == 503
            assert closed.problem == "idempotency-unavailable"
            assert int(closed.headers["Retry-After"]) >= 1
            assert env.upstream.executions == 0
            opened = [await env.send("/open", key="k") for _ in range(2)]
            # Forwarded unprotected: the app runs every time.
            assert [r.status for r in opened] == [201, 201]
            assert [r.n for r in opened] == [1, 2]
            assert all(r.replayed is None for r in opened)
            assert env.upstream.executions == 2
            assert await env.outcome("store_error", route="closed") == 1
            assert await env.outcome("store_error", route="open") == 2
            events = env.events("idempotency.store_error")
            assert [e["route"] for e in events] == ["closed", "open", "open"]
            assert events[0]["request_id"] == closed.headers["X-Request-Id"]
            assert events[0]["trace_id"] == closed.headers["X-Trace-Id"]
        finally:
            server.start()
        after = await env.send("/closed", key="k")
        assert (after.status, after.replayed, after.n) == (201, "false", 3)
        assert await env.records.settled() == [b"c"]
        again = await env.send("/closed", key="k")
        assert (again.replayed, again.body) == ("true", after.body)
        assert env.upstream.executions == 3


# --- metrics and log events -----------------------------------------------------------------


async def test_every_outcome_is_counted_per_route(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        assert await env.outcomes() == {}
        await env.send(key="k1")  # claimed
        assert await env.records.settled() == [b"c"]
        await env.send(key="k1")  # replayed
        await env.send(key="k1", body=b"{}")  # mismatch
        slow = asyncio.create_task(env.send("/slow", key="k2"))  # claimed
        await env.wait_executions(2)
        await env.send("/slow", key="k2")  # conflict
        env.upstream.gate.set()
        await slow
        await env.send(key=None)  # bypassed
        await env.send("/sse", key="k3")  # claimed
        assert b"n" in await env.records.settled()
        counts = await env.outcomes()
        assert {name: counts.get(name) for name in ("claimed", "replayed", "mismatch")} == {
            "claimed": 3,
            "replayed": 1,
            "mismatch": 1,
        }
        assert (counts.get("conflict"), counts.get("bypassed")) == (1, 1)
        assert "store_error" not in counts
        before = counts.get("not_replayable", 0)
        assert (await env.send("/sse", key="k3")).status == 409  # not_replayable
        assert await env.outcome("not_replayable") == before + 1


def _traced(name: str) -> dict[str, str]:
    trace_id = f"{name:0>32}"[:32]
    return {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-Id": f"req-{name}"}


async def test_replayed_conflict_and_mismatch_events_carry_trace_and_request_ids(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        await env.send(key="k1")
        assert await env.records.settled() == [b"c"]
        replies = {"replayed": await env.send(key="k1", headers=_traced("a1"))}
        replies["mismatch"] = await env.send(key="k1", body=b"{}", headers=_traced("b2"))
        slow = asyncio.create_task(env.send("/slow", key="k2"))
        await env.wait_executions(2)
        replies["conflict"] = await env.send("/slow", key="k2", headers=_traced("c3"))
        env.upstream.gate.set()
        await slow
        for outcome, ids in (("replayed", "a1"), ("mismatch", "b2"), ("conflict", "c3")):
            reply = replies[outcome]
            [event] = env.events(f"idempotency.{outcome}")
            assert event["trace_id"] == f"{ids:0>32}" == reply.headers["X-Trace-Id"]
            assert event["request_id"] == f"req-{ids}" == reply.headers["X-Request-Id"]
            assert event["route"] == "orders"
            assert isinstance(event["span_id"], str) and len(event["span_id"]) == 16


@redis_only
async def test_a_failed_completion_write_still_answers_the_first_caller(
    make_env: EnvFactory,
) -> None:
    """Redis goes away while the app runs: the completion write fails (retried for one
    lease), the caller still gets the app's response, and the failure is logged and
    counted."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 1s}")
        server = env.backend.server
        assert server is not None
        first = asyncio.create_task(env.send("/slow", key="lost"))
        await env.wait_executions(1)
        server.stop()
        try:
            env.upstream.gate.set()
            reply = await first
            assert (reply.status, reply.replayed, reply.n) == (201, "false", 1)

            async def logged() -> bool:
                return bool(env.events("idempotency.finish_failed"))

            await eventually(logged, "idempotency.finish_failed")
            [event] = env.events("idempotency.finish_failed")
            assert event["request_id"] == reply.headers["X-Request-Id"]
            assert event["trace_id"] == reply.headers["X-Trace-Id"]
            # Counted once, as the request's outcome (claimed), with the failed write in the
            # store's own error counter.
            assert await env.outcome("store_error") == 0
            errors = await metric_samples(env.sidecar.admin_url, "sidecar_store_errors_total")
            failed = sum(
                value
                for labels, value in errors.items()
                if dict(labels)["operation"] == "idempotency_finish"
            )
            assert failed >= 1
        finally:
            server.start()
