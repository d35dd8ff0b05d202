"""JSON log lines on stdout: the access log and lifecycle/config events.

Lines are encoded with orjson where they happen and queued; a writer thread writes them out,
so the event loop never makes a write() that can block. A stalled stdout reader (a container
runtime under pressure, `| slow-reader`) then costs log lines, not proxying or health probes:
past `max_pending_bytes` queued, new lines are dropped and counted. When the access log is
off the handler never builds a line at all.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import logging
import os
import random
import select
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import BinaryIO, Protocol

import orjson

from sidecar.chain import ProxyRequest, SpanEvent
from sidecar.config import AccessLogConfig, IdentityConfig

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Header values are client input: bounded and made printable before they reach a log line.
MAX_LOGGED_VALUE = 512

# The writer thread writes what is queued at least this often...
FLUSH_INTERVAL = 0.05
# ...and as soon as this much is queued (or being written).
FLUSH_BYTES = 256 * 1024
# Lines queued or being written, at most: past it new lines are dropped (and counted).
MAX_PENDING_BYTES = 4 * 1024 * 1024
# How long flush() (at shutdown, at exit) waits for a slow stdout before giving up.
FLUSH_TIMEOUT = 2.0
# A writer with nothing to write for this long ends; the next line starts another.
_IDLE_SECONDS = 10.0


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


# strftime costs more than the rest of an access line: the text up to the second is made
# once per second and the milliseconds come from a table. One tuple, replaced whole, so a
# reader on another thread never sees a second with another second's text.
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))
_second: tuple[int, str] = (-1, "")


def utc_timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-22T14:39:59.123Z."""
    global _second
    whole = int(now)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return text + _MILLIS[int((now - whole) * 1000)]


class DropCounter(Protocol):
    """What counts dropped lines: a prometheus_client Counter (no labels), say."""

    def inc(self, amount: float = ...) -> None: ...


class LogSink:
    """Queues encoded lines for a writer thread; writes at once when no event loop runs.

    Why a thread: its write() may block as long as stdout's reader likes, and the loop
    never notices. The alternative, a non-blocking stdout written from the loop, would need
    O_NONBLOCK on fd 1, a flag of the *file description*, shared with every process that
    inherited it (sibling workers, the supervisor, a shell): their writes would start
    failing with EAGAIN. The loop's cost per line is an append under a lock, with no
    callback scheduled and no system call. The writer takes the whole queue every
    FLUSH_INTERVAL, or as soon as FLUSH_BYTES are queued, and writes it with one write()
    of whole lines.

    The writer never blocks on that lock, which the loop takes for every line: a thread
    blocked on a lock that a busy thread takes again and again can wait for it as long as
    the busy thread is busy (measured: a whole second, the queue full and lines dropped),
    since the busy thread takes it again before the waiter is scheduled. The writer tries
    without blocking and, should the loop hold it, tries again a moment later. A batch goes
    out in one write(), not in PIPE_BUF pieces: after every system call the writer must win
    the GIL back from a busy loop (up to the 5 ms switch interval), which capped 4 KiB
    pieces at about 1 MB/s.

    Memory is bounded: lines queued or being written total at most `max_pending_bytes`;
    past that a new line is dropped and counted (`dropped`, and the counter given to
    `count_drops_with`), as is a line whose write failed. Lines keep their order and are
    never cut. `flush()` writes what is queued, waiting a bounded time, and is called at
    shutdown (and by an exit hook).

    Without a running event loop (CLI commands, tests) and no writer thread started, a line
    is written at once, on the caller's thread, as a plain program would.

    The default stream, stdout, is written with os.write() on its file descriptor, not
    through sys.stdout.buffer: a writer stuck in a write at exit would hold that buffer's
    lock, and the interpreter aborts when it cannot flush stdout at shutdown.
    """

    def __init__(
        self,
        stream: BinaryIO | None = None,
        level: str = "info",
        *,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        flush_interval: float = FLUSH_INTERVAL,
        flush_bytes: int = FLUSH_BYTES,
        dropped: DropCounter | None = None,
    ) -> None:
        self._fd: int | None = None
        if stream is None:
            stream = sys.stdout.buffer
            with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation is both
                self._fd = stream.fileno()
        self._stream = stream
        self.min_level = LEVELS.get(level, 20)
        self._max_pending = max_pending_bytes
        self._interval = flush_interval
        self._flush_bytes = flush_bytes
        self._wake = threading.Event()  # set: the writer writes now, not at the interval
        self._write_lock = threading.Lock()  # one write() at a time, whatever the thread
        # Guarded by _lock:
        self._lock = threading.Lock()
        self._drop_counter = dropped
        self.dropped = 0  # lines dropped (queue full, or the write failed)
        self._pending: list[bytes] = []
        self._buffered = 0  # bytes in _pending or being written
        self._urgent = False  # _wake was set for the lines queued now
        self._stop = False  # the writer ends once nothing is queued
        self._writer: threading.Thread | None = None
        self._gave_up = False  # the last flush() timed out: the exit hook does not wait again

    def count_drops_with(self, counter: DropCounter) -> None:
        """Count dropped lines in `counter` too (the ones dropped so far are added now)."""
        with self._lock:
            self._drop_counter = counter
            so_far = self.dropped
        if so_far:
            counter.inc(so_far)

    def emit(self, record: dict[str, object]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        with self._lock:
            if self._writer is None and not (_loop_running() and self._start_writer()):
                queued = False  # no loop to keep unblocked (or no thread): written below
            else:
                buffered = self._buffered + len(line)
                if buffered > self._max_pending:
                    self.dropped += 1
                    counter = self._drop_counter
                    if counter is not None:
                        counter.inc()
                    return
                self._pending.append(line)
                self._buffered = buffered
                if buffered < self._flush_bytes or self._urgent:
                    return
                self._urgent = queued = True
        if queued:
            self._wake.set()
        elif self._write(line):
            self._count_lost(1)

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Write everything queued, blocking the caller up to `timeout` seconds.

        Returns whether it was all written. The writer thread ends (the next line starts
        another); if stdout is stuck it finishes the queue in its own time, and a process
        exiting meanwhile loses those lines rather than hanging.
        """
        with self._lock:
            writer = self._writer
            if writer is None:
                # Without a writer, lines were written as they came (nothing is queued),
                # unless a writer died: a new one takes over its queue.
                if not self._pending:
                    return True
                if not self._start_writer():
                    return False
                writer = self._writer
            self._stop = True
        self._wake.set()
        assert writer is not None
        writer.join(timeout)
        self._gave_up = writer.is_alive()
        return not self._gave_up

    def _start_writer(self) -> bool:
        """Start the writer thread (called holding _lock); False if no thread can start."""
        writer = threading.Thread(target=self._run, name="sidecar-log-writer", daemon=True)
        self._writer = writer
        try:
            writer.start()
        except RuntimeError:  # out of threads, or the interpreter is shutting down
            self._writer = None
            return False
        _LIVE.add(self)
        return True

    def _run(self) -> None:
        """The writer thread: take what is queued, write it, until idle or stopped."""
        try:
            idle_since = time.monotonic()
            while True:
                self._wake.wait(0.0 if self._stop else self._interval)
                self._wake.clear()
                self._take_lock()
                try:
                    lines, self._pending = self._pending, []
                    self._urgent = False
                    if not lines and (self._stop or time.monotonic() - idle_since > _IDLE_SECONDS):
                        # In the same hold of the lock as the check: a line queued after it
                        # finds no writer, and starts one.
                        self._writer = None
                        self._stop = False
                        return
                finally:
                    self._lock.release()
                if not lines:
                    continue
                data = b"".join(lines)
                del lines
                lost = self._write(data)
                self._take_lock()
                try:
                    self._buffered -= len(data)
                    self.dropped += lost
                    counter = self._drop_counter
                finally:
                    self._lock.release()
                if lost and counter is not None:
                    counter.inc(lost)
                idle_since = time.monotonic()
        finally:
            with self._lock:
                if self._writer is threading.current_thread():  # it died (MemoryError?)
                    self._writer = None  # the next line, or flush(), starts another
                    self._stop = False

    def _take_lock(self) -> None:
        """Acquire _lock from the writer without ever blocking on it (see the class doc)."""
        while not self._lock.acquire(blocking=False):
            time.sleep(0.0005)

    def _count_lost(self, lines: int) -> None:
        with self._lock:
            self.dropped += lines
            counter = self._drop_counter
        if counter is not None:
            counter.inc(lines)

    def _write(self, data: bytes) -> int:
        """Write `data`, whole lines, in one write(); the number of lines lost.

        One write at a time (the writer's, or a line written at once on another thread):
        lines from this process never interleave.
        """
        written = 0
        with self._write_lock:
            try:
                if self._fd is None:
                    self._stream.write(data)
                    self._stream.flush()
                    return 0
                view = memoryview(data)
                while written < len(data):
                    try:
                        written += os.write(self._fd, view[written:])
                    except BlockingIOError:
                        # Another process sharing the file description set O_NONBLOCK.
                        select.select([], [self._fd], [], 1.0)
            except Exception:
                # A closed or broken stdout must not take the proxy (or the writer) down.
                return data.count(b"\n", written)
        return 0

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


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# Sinks whose writer has run: at exit, what they still hold is written (bounded wait).
_LIVE: weakref.WeakSet[LogSink] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for sink in list(_LIVE):
        if not sink._gave_up:
            sink.flush()


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
        self._has_identity = self._org_header is not None or self._user_header is not None
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
            # Milliseconds to 3 decimals; round() to an int is cheaper than round(x, 3).
            "duration_ms": round(duration * 1e6) / 1000,
            "upstream_ms": None
            if upstream_duration is None
            else round(upstream_duration * 1e6) / 1000,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "client": client,
            "request_id": request_id,
        }
        if headers is not None:
            if self._has_identity:
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
