"""A real `prometheus` server for tests: its own config, TSDB directory and loopback port,
started as a child process and stopped by its PID (SIGTERM, then SIGKILL on a timeout).

Nothing here sleeps for a fixed time: readiness is polled on /-/ready with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import free_port

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


def prometheus_executable() -> str:
    executable = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )
    if executable is None:
        # A failure, not a skip: a run without it would not check the dashboard at all.
        pytest.fail("prometheus is not on PATH (Debian package prometheus)")
    return executable


def scrape_config(target: str, labels: dict[str, str], *, interval: str = "1s") -> str:
    """A prometheus.yml scraping one target's /metrics every `interval`, with `labels`
    attached to every series (as a PodMonitor attaches namespace, pod, container...)."""
    label_lines = "".join(f"          {key}: {value!r}\n" for key, value in labels.items())
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  scrape_timeout: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        "scrape_configs:\n"
        "  - job_name: sidecar\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: [{target!r}]\n"
        "        labels:\n"
        f"{label_lines}"
    )


class PrometheusServer:
    """`prometheus --config.file ... --storage.tsdb.path ...` on 127.0.0.1:<free port>."""

    def __init__(self, directory: Path, config_text: str) -> None:
        self.directory = directory
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(config_text)
        self.port = free_port()
        self.log_path = directory / "prometheus.log"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def command(self) -> list[str]:
        return [
            prometheus_executable(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    async def start(self) -> PrometheusServer:
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(), stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=self.directory
            )
        await self._wait_ready()
        return self

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise RuntimeError(f"prometheus exited at start:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/-/ready") as response:
                        if response.status == 200:
                            return
                if loop.time() > deadline:
                    raise RuntimeError(
                        f"prometheus not ready in {START_TIMEOUT}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(POLL_INTERVAL)

    async def api(self, session: aiohttp.ClientSession, path: str, **params: Any) -> Any:
        """GET /api/v1/<path> and return its `data` (the request fails on a non-success)."""
        async with session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body.get("status") == "success", body
        return body["data"]

    async def stop(self) -> None:
        """SIGTERM by PID and wait; SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
