"""What the docs promise about hot reload: a new upstream applies to new requests while the
requests under way finish on the old one; a change to a restart-only key is named in the
`config.reloaded` event's `needs_restart` (null otherwise) and the old value stays in force.

An in-process sidecar watches a real config file (every 50 ms); each change is written
atomically, as a ConfigMap update is, and the test waits for the reload event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import load_config
from tests.support import RunningSidecar, app_with, free_port, run_app, run_sidecar

TEST_TIMEOUT = 20.0

SERVER = {
    "listen": "127.0.0.1:0",
    "admin_listen": "127.0.0.1:0",
    "drain": "0s",
    "shutdown_grace": "30s",
    "reload_interval": "50ms",
}


def write(path: Path, upstream_url: str, extra: str = "", **server: str) -> None:
    """The config file: SERVER with `server`'s keys changed, the upstream, then `extra`."""
    lines = ["server:"] + [f"  {key}: {value}" for key, value in (SERVER | server).items()]
    text = "\n".join(lines) + f"\nupstream:\n  url: {upstream_url}\n" + extra
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def watching(path: Path) -> AsyncIterator[RunningSidecar]:
    """A sidecar serving `path`'s config and watching it."""
    async with run_sidecar(load_config(path), str(path)) as sc:
        yield sc


def reloads(sc: RunningSidecar) -> list[dict[str, object]]:
    return [
        r for r in sc.log.records if r.get("event") in ("config.reloaded", "config.reload_failed")
    ]


async def rewrite_and_wait(
    sc: RunningSidecar, path: Path, *args: str, **kwargs: str
) -> dict[str, object]:
    """Write a new config and return the reload event it causes (bounded wait)."""
    before = len(reloads(sc))
    write(path, *args, **kwargs)
    async with asyncio.timeout(10):
        while len(reloads(sc)) == before:
            await asyncio.sleep(0.02)
    event = reloads(sc)[before]
    assert event["event"] == "config.reloaded", event
    return event


async def text_of(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def test_a_change_written_before_the_watcher_first_runs_is_applied(
    tmp_path: Path, app_url: str
) -> None:
    path = tmp_path / "sidecar.yaml"
    write(path, app_url)
    async with watching(path) as sc:
        # Nothing has been awaited since start(): the watcher task has not run yet.
        write(path, app_url, "routes:\n  - name: late\n    match: {path_prefix: /}\n")
        async with asyncio.timeout(10):
            while not reloads(sc):
                await asyncio.sleep(0.02)
        assert reloads(sc)[0]["event"] == "config.reloaded"
        assert [r.name for r in sc.sidecar.holder.runtime.config.routes] == ["late"]


# --- a new upstream -----------------------------------------------------------------------


async def test_a_new_upstream_takes_new_requests_while_requests_under_way_finish_on_the_old(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()
    slow_arrived = asyncio.Event()
    stream_started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        slow_arrived.set()
        await release.wait()
        return web.Response(text="old slow")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"old first;")
        stream_started.set()
        await release.wait()
        await response.write(b"old second")
        await response.write_eof()
        return response

    async def old_default(request: web.Request) -> web.Response:
        return web.Response(text="old")

    async def new_default(request: web.Request) -> web.Response:
        return web.Response(text="new")

    old_app = app_with({"/slow": slow, "/stream": stream, "/{tail:.*}": old_default})
    path = tmp_path / "sidecar.yaml"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_app(old_app) as old_url,
        run_app(app_with({"/{tail:.*}": new_default})) as new_url,
    ):
        write(path, old_url)
        async with watching(path) as sc, aiohttp.ClientSession() as session:
            try:
                assert await text_of(session, sc.url + "/x") == (200, b"old")
                in_flight = [
                    asyncio.create_task(text_of(session, sc.url + "/slow")),
                    asyncio.create_task(text_of(session, sc.url + "/stream")),
                ]
                await slow_arrived.wait()
                await stream_started.wait()

                event = await rewrite_and_wait(sc, path, new_url)
                assert event["needs_restart"] is None
                for _ in range(5):
                    assert await text_of(session, sc.url + "/x") == (200, b"new")

                release.set()
                slow_result, stream_result = await asyncio.gather(*in_flight)
                assert slow_result == (200, b"old slow")
                assert stream_result == (200, b"old first;old second")
            finally:
                release.set()


# --- restart-only keys --------------------------------------------------------------------

RESTART_ONLY: dict[str, tuple[dict[str, str], str, list[str] | None]] = {
    "server.workers": ({"workers": "2"}, "", ["server.workers"]),
    "server.keepalive_timeout": ({"keepalive_timeout": "10s"}, "", ["server.keepalive_timeout"]),
    "server.reload_interval": ({"reload_interval": "60ms"}, "", ["server.reload_interval"]),
    "state": ({}, "state:\n  timeout: 50ms\n", ["state"]),
    "logging.level": ({}, "logging:\n  level: warning\n", ["logging.level"]),
    "tracing.export": ({}, "tracing:\n  export:\n    service_name: other\n", ["tracing.export"]),
    "several": ({"workers": "3"}, "state:\n  key_prefix: 'other:'\n", ["server.workers", "state"]),
    "none (a hot key)": ({"max_body": "1MiB"}, "", None),
}


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with run_app(app_with({"/{tail:.*}": ok})) as url:
        yield url


@pytest.mark.parametrize("change", RESTART_ONLY, ids=str)
async def test_a_restart_only_change_is_named_in_needs_restart(
    tmp_path: Path, app_url: str, change: str
) -> None:
    server, extra, expected = RESTART_ONLY[change]
    path = tmp_path / "sidecar.yaml"
    write(path, app_url)
    async with asyncio.timeout(TEST_TIMEOUT), watching(path) as sc:
        event = await rewrite_and_wait(sc, path, app_url, extra, **server)
        assert "needs_restart" in event
        assert event["needs_restart"] == expected


async def test_listeners_keep_their_old_address_after_a_reload_that_moves_them(
    tmp_path: Path, app_url: str
) -> None:
    path = tmp_path / "sidecar.yaml"
    write(path, app_url)
    new_port, new_admin_port = free_port(), free_port()
    async with asyncio.timeout(TEST_TIMEOUT), watching(path) as sc:
        moved = {"listen": f"127.0.0.1:{new_port}", "admin_listen": f"127.0.0.1:{new_admin_port}"}
        event = await rewrite_and_wait(sc, path, app_url, **moved)
        assert event["needs_restart"] == ["server.listen", "server.admin_listen"]
        async with aiohttp.ClientSession() as session:
            assert await text_of(session, sc.url + "/x") == (200, b"ok")
            assert (await text_of(session, sc.admin_url + "/live"))[0] == 200
        for port in (new_port, new_admin_port):
            with pytest.raises(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()


async def test_a_reloaded_state_section_keeps_the_old_store(tmp_path: Path, app_url: str) -> None:
    path = tmp_path / "sidecar.yaml"
    write(path, app_url)
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    async with asyncio.timeout(TEST_TIMEOUT), watching(path) as sc:
        event = await rewrite_and_wait(sc, path, app_url, f"state:\n  url: {nobody}\n")
        assert event["needs_restart"] == ["state"]
        async with aiohttp.ClientSession() as session, session.get(sc.admin_url + "/health") as r:
            health = await r.json()
        assert health["state"]["backend"] == "memory" and health["state"]["status"] == "up"
        assert health["config"]["reloads"] == 1
