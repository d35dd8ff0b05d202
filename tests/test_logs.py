"""Log lines: valid JSON whatever the client sends, secrets never written, costs nothing off."""

from __future__ import annotations

import io

import orjson
import pytest

from sidecar.config import AccessLogConfig
from sidecar.logs import AccessLog, LogSink, sanitise


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain/path", "plain/path"),
        ("tab\there", "tab\\x09here"),
        ("line\r\nbreak", "line\\x0d\\x0abreak"),
        # aiohttp decodes invalid UTF-8 with surrogateescape: byte 0xff becomes U+DCFF.
        ("bad\udcffbyte", "bad\\xffbyte"),
        ("caf\u00e9", "caf\u00e9"),
    ],
)
def test_sanitise_makes_client_text_printable_and_encodable(raw: str, expected: str) -> None:
    assert sanitise(raw) == expected
    orjson.dumps(sanitise(raw))  # never raises


def test_sanitise_bounds_the_length() -> None:
    assert sanitise("x" * 10_000, limit=16) == "x" * 16 + "..."


def write_one(config: AccessLogConfig, headers: dict[str, str]) -> dict[str, object]:
    stream = io.BytesIO()
    sink = LogSink(stream=stream)  # type: ignore[arg-type]
    AccessLog(config, sink).write(
        route="r",
        method="GET",
        target="/p?secret=1",
        status=200,
        duration=0.001,
        upstream_duration=None,
        bytes_in=0,
        bytes_out=2,
        client="127.0.0.1",
        request_id="id",
        headers=headers,
    )
    sink.flush()
    record: dict[str, object] = orjson.loads(stream.getvalue())
    return record


def test_redacted_headers_are_never_logged_even_when_asked_for() -> None:
    config = AccessLogConfig(
        headers=("authorization", "cookie", "user-agent", "x-api-key"),
        redact_headers=AccessLogConfig().redact_headers | {"x-api-key"},
    )
    record = write_one(
        config,
        {
            "authorization": "Bearer s3cret",
            "cookie": "s=s3cret",
            "x-api-key": "s3cret",
            "user-agent": "ua",
        },
    )
    assert record["req_headers"] == {"user-agent": "ua"}
    assert b"s3cret" not in orjson.dumps(record)


def test_the_query_string_is_left_out_unless_configured() -> None:
    assert write_one(AccessLogConfig(), {})["path"] == "/p"
    assert write_one(AccessLogConfig(include_query=True), {})["path"] == "/p?secret=1"


def test_sampling_keeps_server_errors() -> None:
    log = AccessLog(AccessLogConfig(sample=0.0), LogSink(stream=io.BytesIO()))  # type: ignore[arg-type]
    assert log.wanted(502)
    assert not any(log.wanted(200) for _ in range(100))
