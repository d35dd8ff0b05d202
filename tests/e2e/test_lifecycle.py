"""Lifecycle of a real `sidecar run` process: drain on SIGTERM, hot reload, workers, rollouts."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import SidecarProcess, app_with, free_port, run_app, write_config

IN_FLIGHT = "sidecar_in_flight_requests"
ROUTE_A_ONLY = "routes:\n  - name: a\n    match: {path_prefix: /a}\n"
CATCH_ALL = ROUTE_A_ONLY + "  - name: rest\n    match: {path_prefix: /}\n"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An app answering /slow only once the test sets the event, everything else at once."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text=f"fast {request.path}")

    async with run_app(app_with({"/slow": slow, "/{tail:.*}": fast})) as url:
        yield url, release


async def start_process(
    tmp_path: Path, upstream_url: str, *, server: dict[str, str] | None = None, extra: str = ""
) -> SidecarProcess:
    path = str(tmp_path / "sidecar.yaml")
    port, admin_port = free_port(), free_port()
    write_config(path, upstream_url, port, admin_port, server=server, extra=extra)
    return await SidecarProcess(path, port, admin_port).start()


async def metric_value(
    session: aiohttp.ClientSession, admin_url: str, name: str, **labels: str
) -> float:
    async with session.get(admin_url + "/metrics") as response:
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def get_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


async def wait_for_status(session: aiohttp.ClientSession, url: str, status: int) -> None:
    async with asyncio.timeout(10):
        while await get_status(session, url) != status:
            await asyncio.sleep(0.02)


async def test_sigterm_drains_then_finishes_in_flight_requests_and_exits_zero(
    tmp_path: Path, upstream: tuple[str, asyncio.Event]
) -> None:
    url, release = upstream
    proc = await start_process(tmp_path, url, server={"drain": "3s", "shutdown_grace": "10s"})
    try:
        async with aiohttp.ClientSession() as session:
            await proc.wait_admin("/ready", 200)
            slow = asyncio.create_task(session.get(proc.url + "/slow"))
            # SIGTERM only once the sidecar has the request in flight.
            async with asyncio.timeout(10):
                while await metric_value(session, proc.admin_url, IN_FLIGHT) < 1:
                    await asyncio.sleep(0.02)
            proc.signal(signal.SIGTERM)
            # Readiness fails at once, while traffic is still served (with Connection: close).
            await proc.wait_admin("/ready", 503, timeout=2)
            async with session.get(proc.url + "/during-drain") as response:
                assert response.status == 200
                assert await response.text() == "fast /during-drain"
                assert response.headers["Connection"].lower() == "close"
            # After the drain the listener closes: new connections are refused.
            async with asyncio.timeout(10):
                while True:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", proc.port)
                        writer.close()
                    except OSError:
                        break
                    await asyncio.sleep(0.05)
            assert proc.process is not None and proc.process.returncode is None
            # The request that was in flight all along still completes.
            release.set()
            async with await slow as response:
                assert response.status == 200
                assert await response.text() == "slow done"
        assert await proc.wait_exit(timeout=15) == 0
        events = [e["event"] for e in proc.events()]
        assert events.index("sidecar.draining") < events.index("sidecar.stopped")
    finally:
        await proc.stop()


async def test_config_file_change_is_applied_and_invalid_change_keeps_the_old_config(
    tmp_path: Path, upstream: tuple[str, asyncio.Event]
) -> None:
    url, _ = upstream
    proc = await start_process(
        tmp_path, url, server={"reload_interval": "100ms"}, extra=ROUTE_A_ONLY
    )
    path = proc.config_path
    try:
        async with aiohttp.ClientSession() as session:
            assert await get_status(session, proc.url + "/b") == 404
            write_config(
                path,
                url,
                proc.port,
                proc.admin_port,
                server={"reload_interval": "100ms"},
                extra=CATCH_ALL,
            )
            await wait_for_status(session, proc.url + "/b", 200)
            assert (
                await metric_value(
                    session, proc.admin_url, "sidecar_config_reloads_total", result="success"
                )
                == 1
            )

            with open(path, "a") as f:
                f.write("  - name: rest\n    match: {path_prefix: /}\n")  # duplicate route name
            failed = await proc.wait_event("config.reload_failed")
            assert any("routes[2].name" in e for e in failed["errors"])  # type: ignore[union-attr]
            assert await get_status(session, proc.url + "/b") == 200
            assert (
                await metric_value(
                    session, proc.admin_url, "sidecar_config_reloads_total", result="error"
                )
                == 1
            )
            async with session.get(proc.admin_url + "/health") as response:
                health = await response.json()
            assert "routes[2].name" in health["config"]["last_reload_error"]
    finally:
        await proc.stop()


async def test_configmap_symlink_swap_is_detected(
    tmp_path: Path, upstream: tuple[str, asyncio.Event]
) -> None:
    """Kubernetes updates a mounted ConfigMap by swapping the `..data` symlink atomically."""
    url, _ = upstream
    port, admin_port = free_port(), free_port()
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_11_22_v1"
    first.mkdir()
    server = {"reload_interval": "100ms"}
    write_config(
        str(first / "sidecar.yaml"), url, port, admin_port, server=server, extra=ROUTE_A_ONLY
    )
    os.symlink(first.name, mount / "..data")
    os.symlink("..data/sidecar.yaml", mount / "sidecar.yaml")
    proc = await SidecarProcess(str(mount / "sidecar.yaml"), port, admin_port).start()
    try:
        async with aiohttp.ClientSession() as session:
            assert await get_status(session, proc.url + "/b") == 404
            second = mount / "..2026_11_22_v2"
            second.mkdir()
            write_config(
                str(second / "sidecar.yaml"), url, port, admin_port, server=server, extra=CATCH_ALL
            )
            os.symlink(second.name, mount / "..data_tmp")
            os.replace(mount / "..data_tmp", mount / "..data")
            await wait_for_status(session, proc.url + "/b", 200)
    finally:
        await proc.stop()


async def test_sighup_reloads_when_watching_is_off(
    tmp_path: Path, upstream: tuple[str, asyncio.Event]
) -> None:
    url, _ = upstream
    server = {"reload_interval": "0s"}
    proc = await start_process(tmp_path, url, server=server, extra=ROUTE_A_ONLY)
    try:
        async with aiohttp.ClientSession() as session:
            write_config(
                proc.config_path, url, proc.port, proc.admin_port, server=server, extra=CATCH_ALL
            )
            # Watching is off: nothing changes until SIGHUP.
            assert await get_status(session, proc.url + "/b") == 404
            proc.signal(signal.SIGHUP)
            await proc.wait_event("config.reloaded")
            assert await get_status(session, proc.url + "/b") == 200
    finally:
        await proc.stop()


async def test_two_workers_share_the_port_and_metrics_add_up(
    tmp_path: Path, upstream: tuple[str, asyncio.Event]
) -> None:
    url, _ = upstream
    proc = await start_process(tmp_path, url, server={"workers": "2", "drain": "0s"})
    try:
        async with aiohttp.ClientSession() as session:
            # Both workers answer once both are up (fresh connections spread over them).
            pids: set[int] = set()
            async with asyncio.timeout(15):
                while len(pids) < 2:
                    pids.add(await worker_pid(proc))
            sent = 0
            for _ in range(40):
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)
                ) as one:
                    assert await get_status(one, proc.url + "/x") == 200
                    sent += 1
            for _ in range(4):  # whichever worker answers the scrape, the total is the same
                total = await metric_value(
                    session, proc.admin_url, "sidecar_requests_total", route="default"
                )
                assert total == sent
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=20) == 0
    finally:
        await proc.stop()


async def worker_pid(proc: SidecarProcess) -> int:
    """The pid of whichever worker takes a fresh admin connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as one,
        one.get(proc.admin_url + "/health") as response,
    ):
        pid: int = (await response.json())["pid"]
        return pid


async def test_rolling_restart_under_load_loses_no_request(
    tmp_path: Path, upstream: tuple[str, asyncio.Event]
) -> None:
    """Two replicas behind a balancer that follows /ready, as Kubernetes endpoints do."""
    url, _ = upstream
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = await start_process(tmp_path / "old", url, server={"drain": "1s"})
    new = await start_process(tmp_path / "new", url, server={"drain": "1s"})
    endpoints = [old, new]
    statuses: list[int] = []
    warmed_up = asyncio.Event()

    async def follow_readiness(session: aiohttp.ClientSession) -> None:
        while old in endpoints:
            try:
                if await get_status(session, old.admin_url + "/ready") != 200:
                    endpoints.remove(old)
            except aiohttp.ClientError:
                endpoints.remove(old)
            await asyncio.sleep(0.05)

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        for i in range(n):
            target = endpoints[i % len(endpoints)]
            statuses.append(await get_status(session, target.url + f"/load/{i}"))
            if len(statuses) >= 200:
                warmed_up.set()

    try:
        async with aiohttp.ClientSession() as session:
            watcher = asyncio.create_task(follow_readiness(session))
            load = [asyncio.create_task(client(session, 150)) for _ in range(8)]
            await warmed_up.wait()
            old.signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                await asyncio.gather(*load)
            assert old not in endpoints
            watcher.cancel()
        assert statuses == [200] * 1200
        assert await old.wait_exit(timeout=20) == 0
    finally:
        await old.stop()
        await new.stop()
