"""What the docs promise about the admin listener: `/ready` follows the upstream (a TCP
connect, or `GET upstream.health_path` below 500) and, with `server.ready_requires_state`,
the state store; `/health` has every field the README's table lists, with its type.

Real sidecars in-process, real aiohttp apps and a real redis-server, all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.redis_fixture import RedisServer
from tests.support import RunningSidecar, app_with, free_port, run_app, run_sidecar, sidecar_config

ROOT = Path(__file__).resolve().parents[2]
# Every test body runs under this bound, so a hang fails instead of blocking the suite.
TEST_TIMEOUT = 20.0
# Probes are cached for 1 s: a change is seen by polling, within this bound.
CHANGE_SEEN_WITHIN = 10.0


async def admin_get(sc: RunningSidecar, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(sc.admin_url + path) as response:
        return response.status, await response.json()


async def wait_ready_status(sc: RunningSidecar, status: int) -> dict[str, Any]:
    """Poll /ready until it answers `status`; returns that answer's body."""
    async with asyncio.timeout(CHANGE_SEEN_WITHIN):
        while True:
            got, body = await admin_get(sc, "/ready")
            if got == status:
                return body
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def ok_app() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with run_app(app_with({"/{tail:.*}": ok})) as url:
        yield url


def closed_url() -> str:
    """An upstream URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


# --- /ready and the upstream ----------------------------------------------------------------


async def test_ready_is_200_with_the_upstream_up_and_503_with_it_down() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        ok_app() as url,
        run_sidecar(sidecar_config(url)) as sc,
    ):
        status, body = await admin_get(sc, "/ready")
        assert (status, body) == (200, {"status": "ready"})

    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(closed_url())) as sc:
        status, body = await admin_get(sc, "/ready")
        assert status == 503
        assert body["status"] == "not ready"
        assert any(reason.startswith("upstream unreachable") for reason in body["reasons"])
        # Liveness never looks at the upstream.
        assert (await admin_get(sc, "/live"))[0] == 200


async def test_ready_turns_503_when_a_running_upstream_goes_away() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), contextlib.AsyncExitStack() as app:
        url = await app.enter_async_context(ok_app())
        async with run_sidecar(sidecar_config(url)) as sc:
            assert (await admin_get(sc, "/ready"))[0] == 200
            await app.aclose()  # the app stops listening
            body = await wait_ready_status(sc, 503)
            assert any(reason.startswith("upstream unreachable") for reason in body["reasons"])


@pytest.mark.parametrize(
    ("app_status", "ready"),
    [(200, 200), (204, 200), (404, 200), (499, 200), (500, 503), (503, 503)],
)
async def test_health_path_is_probed_with_a_get_and_a_status_below_500_is_ready(
    app_status: int, ready: int
) -> None:
    seen: list[tuple[str, str]] = []

    async def health(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs))
        return web.Response(status=app_status)

    async def other(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs))
        return web.Response(text="not the health path")

    app = app_with({"/base/healthz": health, "/{tail:.*}": other})
    async with asyncio.timeout(TEST_TIMEOUT), run_app(app) as url:
        # The probe goes under the upstream's base path, like every request.
        config = sidecar_config(f"{url}/base", "  health_path: /healthz\n")
        async with run_sidecar(config) as sc:
            status, body = await admin_get(sc, "/ready")
            assert status == ready, body
            if ready == 503:
                (reason,) = body["reasons"]
                assert reason == f"upstream unreachable: GET /healthz -> {app_status}"
            _, health_body = await admin_get(sc, "/health")
    assert seen and set(seen) == {("GET", "/base/healthz")}
    assert health_body["upstream"]["status"] == ("up" if ready == 200 else "down")
    assert health_body["upstream"]["detail"] == f"GET /healthz -> {app_status}"


async def test_ready_excluding_the_upstream_is_200_before_the_app_listens() -> None:
    """`?exclude=upstream` is the startup probe of a native sidecar: the kubelet starts the
    app only once it passes, so it must not wait for the app (kube-apiserver's `/readyz`
    takes `exclude` the same way)."""
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(sidecar_config(closed_url())) as sc:
        assert (await admin_get(sc, "/ready"))[0] == 503
        status, body = await admin_get(sc, "/ready?exclude=upstream")
        assert (status, body) == (200, {"status": "ready"})
        # A typo in a probe must fail loudly, not check less than it says.
        async with (
            aiohttp.ClientSession() as session,
            session.get(sc.admin_url + "/ready?exclude=upstrem") as response,
        ):
            assert response.status == 400
            assert response.content_type == "application/problem+json"
            problem = await response.json()
        assert "upstrem" in problem["detail"] and "upstream" in problem["detail"]


async def test_ready_excluding_the_upstream_still_checks_the_store_when_required(
    redis_url: str,
) -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    async with asyncio.timeout(TEST_TIMEOUT):
        config = sidecar_config(closed_url(), state_yaml(nobody, requires=True))
        async with run_sidecar(config) as sc:
            status, body = await admin_get(sc, "/ready?exclude=upstream")
            assert status == 503
            (reason,) = body["reasons"]
            assert reason.startswith("state store unavailable")
            both = "/ready?exclude=upstream&exclude=state"
            assert await admin_get(sc, both) == (200, {"status": "ready"})


# --- /ready and the state store ---------------------------------------------------------------


def state_yaml(url: str, requires: bool) -> str:
    return f"state:\n  url: {url}\n" + (
        "server:\n  ready_requires_state: true\n" if requires else ""
    )


async def test_ready_requires_state_fails_readiness_while_the_store_is_unreachable() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    async with asyncio.timeout(TEST_TIMEOUT), ok_app() as url:
        async with run_sidecar(sidecar_config(url, state_yaml(nobody, requires=True))) as sc:
            status, body = await admin_get(sc, "/ready")
            assert status == 503, body
            (reason,) = body["reasons"]
            assert reason.startswith("state store unavailable")
        # Without the setting the same store is only reported.
        async with run_sidecar(sidecar_config(url, state_yaml(nobody, requires=False))) as sc:
            assert (await admin_get(sc, "/ready"))[0] == 200
            _, health = await admin_get(sc, "/health")
            assert health["status"] == "ready"
            assert health["state"]["status"] == "down"
            assert health["state"]["backend"] == "redis"


async def test_ready_requires_state_follows_a_real_redis_going_down_and_up(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT * 2),
        ok_app() as url,
        run_sidecar(sidecar_config(url, state_yaml(redis_url, requires=True))) as sc,
    ):
        try:
            await wait_ready_status(sc, 200)
            redis_server.stop()
            body = await wait_ready_status(sc, 503)
            (reason,) = body["reasons"]
            assert reason.startswith("state store unavailable")
            redis_server.start()
            await wait_ready_status(sc, 200)
        finally:
            redis_server.start()


# --- /health ------------------------------------------------------------------------------


def documented_health_fields() -> dict[str, str]:
    """The README's `/health` table: field path (`config.sha256`, `routes[].name`) -> type."""
    text = (ROOT / "README.md").read_text()
    start = text.index("### `/health`")
    end = text.index("\n#", start + 1)
    fields = {}
    for match in re.finditer(
        r"^\| `([a-z0-9_.\[\]]+)` \| ([^|]+) \|", text[start:end], re.MULTILINE
    ):
        fields[match.group(1)] = match.group(2).strip()
    assert fields, "no field table under README's ### `/health`"
    return fields


def flatten(value: object, path: str = "") -> dict[str, list[object]]:
    """Field path -> every value found there (a list of objects adds `[]` to the path)."""
    out: dict[str, list[object]] = {}
    if isinstance(value, dict):
        for key, inner in value.items():
            for name, values in flatten(inner, f"{path}.{key}" if path else key).items():
                out.setdefault(name, []).extend(values)
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for item in value:
            for name, values in flatten(item, f"{path}[]").items():
                out.setdefault(name, []).extend(values)
    else:
        out[path] = [value]
    return out


def has_type(value: object, documented: str) -> bool:
    kinds = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "list of strings": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "null": lambda v: v is None,
    }
    options = [option.strip() for option in documented.split(" or ")]
    assert all(option in kinds for option in options), f"unknown type {documented!r}"
    return any(kinds[option](value) for option in options)


def assert_health_matches_the_docs(body: dict[str, Any]) -> None:
    documented = documented_health_fields()
    found = flatten(body)
    assert set(found) == set(documented)
    wrong = {
        name: values
        for name, values in found.items()
        if not all(has_type(value, documented[name]) for value in values)
    }
    assert wrong == {}


ROUTES = """\
routes:
  - name: orders
    match: {path_prefix: /orders}
    timeout: 12s
  - name: rest
    match: {path_prefix: /}
"""


async def test_health_has_every_documented_field_with_its_type_when_ready() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        ok_app() as url,
        run_sidecar(sidecar_config(url, ROUTES)) as sc,
    ):
        status, body = await admin_get(sc, "/health")
    assert status == 200
    assert_health_matches_the_docs(body)
    assert (body["status"], body["reasons"], body["draining"]) == ("ready", [], False)
    assert body["routes"] == [
        {"name": "orders", "timeout": 12.0},
        {"name": "rest", "timeout": 15.0},
    ]
    assert body["upstream"]["url"] == url and body["upstream"]["status"] == "up"
    assert body["upstream"]["detail"] == "tcp connect ok"
    assert body["state"]["backend"] == "memory" and body["state"]["status"] == "up"
    assert body["config"]["source"] == "<test>"
    assert body["config"]["reloads"] == 0 and body["config"]["last_reload_error"] is None


async def test_health_has_every_documented_field_with_its_type_when_not_ready() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    upstream = closed_url()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_sidecar(sidecar_config(upstream, state_yaml(nobody, requires=True))) as sc,
    ):
        status, body = await admin_get(sc, "/health")
    assert status == 200  # always, ready or not
    assert_health_matches_the_docs(body)
    assert body["status"] == "not ready" and len(body["reasons"]) == 2
    assert body["upstream"]["status"] == "down" and body["upstream"]["rtt_ms"] is None
    assert body["state"]["status"] == "down" and body["state"]["rtt_ms"] is None
