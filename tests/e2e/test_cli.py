"""The `sidecar` command line, driven as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from sidecar import __version__
from tests.support import free_port


def sidecar_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    result = sidecar_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sidecar {__version__}"


def test_check_config_prints_the_resolved_routes(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "upstream:\n  url: http://127.0.0.1:8080\n"
        "routes:\n"
        "  - name: orders-create\n"
        "    match: {path_prefix: /orders, methods: [POST]}\n"
        "    timeout: 12s\n"
        "  - name: default\n"
        "    match: {path_prefix: /}\n"
    )
    result = sidecar_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "orders-create" in line)
    assert "12s" in lines[first]
    assert "default" in lines[first + 1]


def test_check_config_reports_every_error_with_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "server:\n"
        "  max_body: lots\n"
        "routes:\n"
        "  - name: a\n"
        "    match: {path_regex: '(unclosed'}\n"
        "    timeoutt: 1s\n"
    )
    result = sidecar_cli("check-config", str(path))
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3, errors
    assert errors[0].startswith(f"{path}:2: server.max_body: ")
    assert any(e.startswith(f"{path}:5: routes[0].match.path_regex: ") for e in errors)
    assert any(e.startswith(f"{path}:6: routes[0].timeoutt: ") for e in errors)


def test_run_refuses_an_invalid_config_and_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstream:\n  url: ftp://nope\n")
    result = sidecar_cli("run", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:2: upstream.url: ")


def test_run_reads_the_config_path_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("nonsense: true\n")
    env = dict(os.environ, SIDECAR_CONFIG=str(path))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:1: nonsense: ")


async def test_demo_serves_the_echo_app_through_the_sidecar() -> None:
    port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "demo",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            banner = b""
            while b"Ctrl-C" not in banner:
                banner += await process.stdout.readline()
        assert f"curl -i http://127.0.0.1:{port}/hello".encode() in banner
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/orders?x=1", data=b'{"amount": 42}') as r,
        ):
            echoed = await r.json()
        assert r.status == 200
        assert echoed["method"] == "POST"
        assert echoed["target"] == "/orders?x=1"
        assert echoed["body"] == '{"amount": 42}'
        assert r.headers["X-Request-Id"]
        # The demo's POST /orders route is idempotent: the same key twice is one execution.
        replies = []
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(
                    f"http://127.0.0.1:{port}/orders",
                    data=b"{}",
                    # A key is scoped to its caller: an identity header, or credentials.
                    headers={"Idempotency-Key": "demo-1", "X-Org-Id": "demo"},
                ) as reply:
                    replies.append((reply.headers["Idempotent-Replayed"], await reply.read()))
        assert [flag for flag, _ in replies] == ["false", "true"]
        assert replies[0][1] == replies[1][1]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_check_config_applies_the_stores_own_url_checks(tmp_path: Path) -> None:
    path = tmp_path / "bad-state.yaml"
    path.write_text("state:\n  url: redis://:pw@redis:6379/0?no_such_option=1\n")
    result = sidecar_cli("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:2: state.url: unsupported option")
    assert ":pw@" not in result.stderr  # the password is masked
