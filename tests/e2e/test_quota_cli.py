"""`sidecar quota` against real sidecar processes sharing one Redis."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import SidecarProcess, free_port, write_config

TOKEN = "e2e-admin-token"


def extra(redis_url: str) -> str:
    return (
        f'state:\n  url: "{redis_url}"\n  timeout: 1s\n'
        "routes:\n  - name: r\n    match: {path_prefix: /}\n"
        "    quotas: {limits: [{name: hourly, kind: rate, limit: 10, window: 1h}]}\n"
    )


async def start(tmp_path: Path, name: str, redis_url: str) -> SidecarProcess:
    path = str(tmp_path / f"{name}.yaml")
    port, admin = free_port(), free_port()
    write_config(path, f"http://127.0.0.1:{free_port()}", port, admin, extra=extra(redis_url))
    return await SidecarProcess(path, port, admin).start()


@pytest.fixture
async def sidecars(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[SidecarProcess, SidecarProcess]]:
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", TOKEN)
    first = await start(tmp_path, "a", redis_url)
    try:
        second = await start(tmp_path, "b", redis_url)
        try:
            yield first, second
        finally:
            await second.stop()
    finally:
        await first.stop()


async def cli(admin: str, *args: str, token: str = TOKEN) -> tuple[int, str, str]:
    env = {"SIDECAR_ADMIN_TOKEN": token, "PATH": "/usr/bin:/bin"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "quota",
        "--admin",
        admin,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def hourly(output: str) -> dict[str, object]:
    limit: dict[str, object] = json.loads(output)["routes"][0]["limits"][0]
    return limit


async def test_set_get_delete_through_the_cli_across_replicas(
    sidecars: tuple[SidecarProcess, SidecarProcess],
) -> None:
    first, second = sidecars
    code, out, _ = await cli(first.admin_url, "set", "acme", "hourly", "3")
    assert code == 0 and hourly(out)["limit"] == 3 and hourly(out)["overridden"] is True
    # The other replica reads the same Redis: the override applies there too.
    code, out, _ = await cli(second.admin_url, "get", "acme")
    assert code == 0 and json.loads(out)["overrides"] == {"hourly": 3}
    assert hourly(out)["limit"] == 3
    code, out, _ = await cli(second.admin_url, "delete", "acme", "hourly")
    assert code == 0 and hourly(out)["limit"] == 10
    code, _, err = await cli(first.admin_url, "delete", "acme", "hourly")
    assert code == 1 and "no override" in err
    code, _, err = await cli(first.admin_url, "set", "acme", "nope", "3")
    assert code == 1 and "limit" in err


async def test_refusals_usage_errors_and_unreachable(
    sidecars: tuple[SidecarProcess, SidecarProcess],
) -> None:
    first, _ = sidecars
    code, _, err = await cli(first.admin_url, "get", "acme", token="wrong")
    assert code == 1 and "401" in err
    code, _, _ = await cli(first.admin_url, "set", "acme", "hourly", "-3")
    assert code == 2
    code, _, err = await cli(f"http://127.0.0.1:{free_port()}", "get", "acme")
    assert code == 3 and "cannot reach" in err
