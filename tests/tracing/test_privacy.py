"""A planted secret travels in every credential-bearing place of a request — through a 200,
a 404 and a 502 — and must appear in no log line the sidecar writes."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from sidecar.config import ConfigError, ConfigIssue, load_config
from tests.proxy.conftest import wait_until
from tests.support import (
    RawUpstream,
    RunningSidecar,
    SidecarProcess,
    free_port,
    raw_request,
    run_sidecar,
    write_config,
)
from tests.tracing.conftest import (
    TEST_TIMEOUT,
    build_request,
    export_yaml,
    one,
    send,
    tracing_config,
)

PLANTED = "pl4nted-s3cret-" + "q7Zx91Kd"

# Headers the config asks to log, redacted ones included: redaction must win.
LOGGING = (
    "logging:\n"
    "  access:\n"
    "    include_query: false\n"
    "    redact_headers: [X-Api-Key]\n"
    "    headers: [User-Agent, Authorization, Proxy-Authorization, Cookie, X-Api-Key]\n"
    "routes:\n"
    "  - name: api\n"
    "    match: {path_prefix: /api}\n"
)

SECRET_HEADERS = [
    ("User-Agent", "privacy-probe/1"),
    ("Authorization", f"Bearer {PLANTED}"),
    ("Proxy-Authorization", f"Basic {PLANTED}"),
    ("Cookie", f"session={PLANTED}; theme=dark"),
    ("X-Api-Key", PLANTED),
]
QUERY = f"?token={quote(PLANTED)}&page=2"


def serialised(sc: RunningSidecar) -> list[bytes]:
    return [orjson.dumps(record) for record in sc.log.records]


async def send_planted(sc: RunningSidecar, path: str, status: int) -> str:
    response = await send(sc.port, path + QUERY, headers=SECRET_HEADERS)
    assert response.status == status, response.body
    request_id = one(response.header("X-Request-Id"))
    await wait_until(
        lambda: any(
            r.get("event") == "access" and r.get("request_id") == request_id for r in sc.log.records
        ),
        timeout=3.0,
    )
    return request_id


def assert_not_logged(sc: RunningSidecar) -> None:
    needle = PLANTED.encode()
    leaks = [line for line in serialised(sc) if needle in line]
    assert leaks == []


async def test_planted_secret_is_never_logged(upstream: RawUpstream) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        run_sidecar(tracing_config(upstream.url, LOGGING)) as sc,
    ):
        ok = await send_planted(sc, "/api/orders", 200)
        missing = await send_planted(sc, "/elsewhere", 404)
        # The secret really went through: the app got the credentials and the query.
        (received,) = upstream.exchanges
        assert PLANTED.encode() in received.head
        assert quote(PLANTED).encode() in received.request_line
        # Header logging is on, so a leak would show: the harmless header is there.
        lines = {str(r.get("request_id")): r for r in sc.log.records if r.get("event") == "access"}
        for request_id in (ok, missing):
            assert lines[request_id]["req_headers"] == {"user-agent": "privacy-probe/1"}
            assert lines[request_id]["path"] in ("/api/orders", "/elsewhere")
        assert_not_logged(sc)


async def test_planted_secret_is_never_logged_on_upstream_failure() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with asyncio.timeout(TEST_TIMEOUT), run_sidecar(tracing_config(closed, LOGGING)) as sc:
        request_id = await send_planted(sc, "/api/orders", 502)
        events = {str(r.get("event")) for r in sc.log.records if r.get("request_id") == request_id}
        assert events == {"access", "upstream.error"}
        assert_not_logged(sc)


async def test_planted_secret_in_the_export_endpoint_is_refused_and_never_printed(
    tmp_path: Path,
) -> None:
    """The export endpoint is logged when an export fails, so the loader refuses one that
    carries credentials (as it does for upstream.url), at FILE:LINE: key, without echoing
    them; `sidecar run` prints just that line and exits 1."""
    endpoint = f"http://otel:{PLANTED}@127.0.0.1:{free_port()}/v1/traces"
    path = tmp_path / "sidecar.yaml"
    port, admin_port = free_port(), free_port()
    write_config(str(path), "http://127.0.0.1:8080", port, admin_port, extra=export_yaml(endpoint))
    lines = path.read_text().splitlines()
    [line] = [number for number, text in enumerate(lines, start=1) if "endpoint:" in text]
    refused = ConfigIssue(
        str(path), line, "tracing.export.endpoint", "credentials in the URL are not supported"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.issues == (refused,)
    assert PLANTED not in str(caught.value)

    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sidecar", "run", "--config", str(path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1
    assert stdout == b""
    assert stderr.decode().splitlines() == [str(refused)]


async def test_planted_secret_in_a_malformed_request_never_reaches_the_process_output(
    upstream: RawUpstream, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    config_path = str(tmp_path / "sidecar.yaml")
    server = {"drain": "0s", "shutdown_grace": "1s", "reload_interval": "0s"}
    write_config(config_path, upstream.url, port, admin_port, server=server)
    process = SidecarProcess(config_path, port, admin_port)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            await process.start()
            secret = PLANTED.encode()
            bad_header = b"GET /api HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + secret
            bad_query = b"GET /api?token=" + secret + b"\x7f HTTP/1.1\r\nHost: a\r\n\r\n"
            for request in (bad_header + b"\x01\r\n\r\n", bad_query):
                reply = await raw_request(port, request)
                assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
            # A well-formed request logs its access line: the output is being captured.
            ok = await raw_request(port, build_request("/api", headers=SECRET_HEADERS))
            assert b" 200 " in ok.split(b"\r\n")[0]
            process.signal(signal.SIGTERM)
            assert await process.wait_exit() == 0
        output = b"".join(process.stdout)
        assert b'"event":"access"' in output
        assert secret not in output
    finally:
        await process.stop()
