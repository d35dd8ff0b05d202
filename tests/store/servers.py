"""Extra real servers for URL-scheme tests: Redis with TLS + password, and a Sentinel."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_fixture import RedisServer, free_port, redis_executable

MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"
SERVICE = "mymaster"


class SentinelServer(RedisServer):
    """redis-server in sentinel mode, watching one master, with its own password."""

    def __init__(self, executable: str, master: RedisServer) -> None:
        super().__init__(executable)
        self.config = self.dir / "sentinel.conf"
        self.config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {self.dir}",
                    f"requirepass {SENTINEL_PASSWORD}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1",
                    f"sentinel auth-pass {SERVICE} {MASTER_PASSWORD}",
                    f"sentinel down-after-milliseconds {SERVICE} 60000",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return [self.executable, str(self.config), "--sentinel"]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (also its own CA)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH; cannot make a certificate for the TLS test")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class SecureServers:
    """A password-protected Redis that also speaks TLS, and a Sentinel watching it."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.cert, key = make_certificate(directory)
        self.tls_port = free_port()
        self.master = RedisServer(
            executable,
            extra_args=(
                "--requirepass", MASTER_PASSWORD,
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(key),
                "--tls-auth-clients", "no",
            ),
        )  # fmt: skip
        self.sentinel = SentinelServer(executable, self.master)

    def start(self) -> None:
        try:
            self.master.start()
        except RuntimeError as exc:
            if "tls" in str(exc).lower():
                pytest.skip(f"this redis-server was built without TLS: {exc}")
            raise
        self.sentinel.start()

    def cleanup(self) -> None:
        self.sentinel.cleanup()
        self.master.cleanup()


def secure_servers(tmp_path: Path) -> Iterator[SecureServers]:
    servers = SecureServers(redis_executable(), tmp_path)
    try:
        servers.start()
        yield servers
    finally:
        servers.cleanup()
