"""JSON log lines on stdout: the access log and lifecycle/config events.

Lines are encoded with orjson and written in batches, once per event-loop turn, so a busy
sidecar makes one write() per batch instead of one per request. When the access log is off
the handler never builds a line at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import sys
import time
from collections.abc import Mapping
from typing import BinaryIO

import orjson

from sidecar.chain import ProxyRequest, SpanEvent
from sidecar.config import AccessLogConfig, IdentityConfig

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Header values are client input: bounded and made printable before they reach a log line.
MAX_LOGGED_VALUE = 512


def sanitise(value: str, limit: int = MAX_LOGGED_VALUE) -> str:
    """Make client-supplied text safe for a JSON log line: printable, valid UTF-8, bounded."""
    if len(value) > limit:
        value = value[:limit] + "..."
    if value.isascii() and value.isprintable():
        return value
    # aiohttp decodes headers with surrogateescape; orjson would reject lone surrogates.
    out = []
    for ch in value:
        code = ord(ch)
        if ch.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def utc_timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-22T14:39:59.123Z."""
    whole = int(now)
    millis = int((now - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class LogSink:
    """Buffers encoded lines and writes them once per loop turn (or at once with no loop)."""

    def __init__(self, stream: BinaryIO | None = None, level: str = "info") -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._pending: list[bytes] = []
        self._scheduled = False
        self.min_level = LEVELS.get(level, 20)

    def emit(self, record: dict[str, object]) -> None:
        self._pending.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write(b"".join(lines))
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not take the proxy down with it.
            pass

    def event(self, event: str, level: str = "info", **fields: object) -> None:
        """A structured event line: `event` names what happened (config.reloaded, ...)."""
        if LEVELS.get(level, 20) < self.min_level:
            return
        record: dict[str, object] = {
            "ts": utc_timestamp(time.time()),
            "level": level,
            "event": event,
        }
        record.update(fields)
        self.emit(record)

    def request_event(
        self, request: ProxyRequest, event: str, level: str = "info", **fields: object
    ) -> None:
        """A policy decision about one request: logged with the request's ids and trace
        fields, and attached to its span as an event when the span is exported."""
        if request.span_events is not None:
            attributes = tuple(
                (key, value)
                for key, value in fields.items()
                if isinstance(value, str | int | float | bool)
            )
            request.span_events.append(SpanEvent(event, time.time_ns(), attributes))
        self.event(event, level, request_id=request.request_id, **request.log_fields, **fields)


class LibraryLogHandler(logging.Handler):
    """Turns the `logging` records of aiohttp and asyncio into our JSON events.

    Only the message template and the exception type are kept: aiohttp's messages and
    exceptions can quote raw request bytes (a malformed header with a token in it), and
    nothing a client sent may reach the logs unsanitised.
    """

    def __init__(self, sink: LogSink) -> None:
        super().__init__(level=logging.WARNING)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        error = record.exc_info[1] if record.exc_info else None
        self._sink.event(
            "library.log",
            level=level,
            logger=record.name,
            message=sanitise(str(record.msg).partition("\n")[0], 200),
            error=type(error).__name__ if error is not None else None,
        )


def route_library_logs(sink: LogSink) -> None:
    """Send aiohttp's and asyncio's own log records through `sink` (once per process)."""
    for name in ("aiohttp", "asyncio"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, LibraryLogHandler)]:
            logger.removeHandler(handler)
        logger.addHandler(LibraryLogHandler(sink))
        logger.propagate = False


class IdentityHasher:
    """Organisation and user ids as they appear in logs: keyed hashes, or clear if configured.

    HMAC-SHA256 with a secret key, cut to 16 hex characters: the same id gives the same
    value on every line (so lines correlate) but cannot be reversed, nor guessed from a
    list of likely ids without the key.
    """

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    def __call__(self, value: str) -> str:
        if self._key is None:
            return sanitise(value, 128)
        digest = hmac.new(self._key, value.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return digest.hexdigest()[:16]


class AccessLog:
    """One line per request; built only when this request is to be logged."""

    def __init__(
        self,
        config: AccessLogConfig,
        sink: LogSink,
        identity: IdentityConfig | None = None,
        hash_id: IdentityHasher | None = None,
    ) -> None:
        self._sink = sink
        self._sample = config.sample
        self._include_query = config.include_query
        self._headers = tuple(h for h in config.headers if h not in config.redact_headers)
        self._org_header = identity.org_header if identity is not None else None
        self._user_header = identity.user_header if identity is not None else None
        self._hash_id = hash_id or IdentityHasher(None)

    def wanted(self, status: int) -> bool:
        """Whether this request gets a line: sampled, but server errors always do."""
        return self._sample >= 1.0 or status >= 500 or random.random() < self._sample

    def write(
        self,
        *,
        route: str,
        method: str,
        target: str,
        status: int,
        duration: float,
        upstream_duration: float | None,
        bytes_in: int,
        bytes_out: int,
        client: str,
        request_id: str,
        headers: Mapping[str, str] | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        path = target if self._include_query else target.partition("?")[0]
        record: dict[str, object] = {
            "ts": utc_timestamp(time.time()),
            "level": "info",
            "event": "access",
            "route": route,
            "method": sanitise(method, 32),
            "path": sanitise(path),
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "upstream_ms": None
            if upstream_duration is None
            else round(upstream_duration * 1000, 3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "client": client,
            "request_id": request_id,
        }
        if headers is not None:
            self._add_identity(record, headers)
            if self._headers:
                record["req_headers"] = {
                    h: self._header_value(h, v)
                    for h in self._headers
                    if (v := headers.get(h)) is not None
                }
        if extra:
            record.update(extra)
        self._sink.emit(record)

    def _header_value(self, name: str, value: str) -> str:
        # Listing an identity header must not bypass `logging.ids: hashed`.
        if name == self._org_header or name == self._user_header:
            return self._hash_id(value)
        return sanitise(value)

    def _add_identity(self, record: dict[str, object], headers: Mapping[str, str]) -> None:
        if self._org_header is not None and (org := headers.get(self._org_header)):
            record["org"] = self._hash_id(org)
        if self._user_header is not None and (user := headers.get(self._user_header)):
            record["user"] = self._hash_id(user)
