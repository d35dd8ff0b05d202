"""A real redis-server for tests: its own port, directory and process, stoppable at will.

Used by the `redis_server` / `redis_url` fixtures in tests/conftest.py. Nothing here sleeps
for a fixed time: readiness is polled with a PING, shutdown is waited for by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.005


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers_ping(port: int | None = None, unix_socket: str | None = None) -> bool:
    """True when a Redis at this address answers an inline PING (+PONG, or -NOAUTH when
    it wants a password: either way it is up and serving commands)."""
    family = socket.AF_UNIX if unix_socket else socket.AF_INET
    address: str | tuple[str, int] = unix_socket or ("127.0.0.1", port or 0)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(1.0)
            conn.connect(address)
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1:`port` (and a unix socket), restartable."""

    def __init__(self, executable: str, extra_args: tuple[str, ...] = ()) -> None:
        self.executable = executable
        self.extra_args = extra_args
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-redis-"))
        self.unix_socket = str(self.dir / "redis.sock")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_socket}?db=0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--unixsocket", self.unix_socket,
            "--unixsocketperm", "700",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start (again, on the same port) and return once it answers PING."""
        if self.running:
            return
        log = (self.dir / "redis.log").open("ab")
        with log:
            self._process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not answers_ping(self.port):
            if not self.running:
                raise RuntimeError(f"redis-server exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server not ready in {START_TIMEOUT}s:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """Shut it down (SIGTERM, as an orchestrator would) and wait until it has exited."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL by PID, for the end of the session or a wedged server."""
        if self._process is None:
            return
        process, self._process = self._process, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def redis_executable() -> str:
    executable = shutil.which("redis-server")
    if executable is None:
        # A failure, not a skip: skipped Redis tests would let a run without them look green.
        pytest.fail("redis-server is not on PATH: scripts/test installs it (Debian redis-server)")
    return executable


def redis_server_session() -> Iterator[RedisServer]:
    """Body of the session fixture: one server for the whole run, killed at the end."""
    server = RedisServer(redis_executable())
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def redis_url_for_test(server: RedisServer) -> Iterator[str]:
    """Body of the per-test fixture: a running server with an empty keyspace."""
    import redis  # tests only; the sidecar itself imports redis in sidecar/store/redis.py

    # A test that stopped the server and failed before restarting it must not break
    # the next one.
    server.start()
    client = redis.Redis(port=server.port, socket_timeout=10)
    try:
        client.flushall()
    finally:
        client.close()
    yield server.url
