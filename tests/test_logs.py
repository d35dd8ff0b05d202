"""Log lines: valid JSON whatever the client sends, secrets never written, costs nothing off."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
import time
from collections.abc import Coroutine
from typing import Any

import orjson
import pytest

from sidecar.config import AccessLogConfig
from sidecar.logs import AccessLog, LogSink, sanitise, utc_timestamp
from sidecar.metrics import Metrics


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


# --- the writer: a stalled stdout must cost log lines, never the event loop ----------------

WAIT = 10.0  # bound on every wait for a condition below; reached only when a test fails


class StuckPipe:
    """A pipe filled to the brim that nobody reads (until `drain`): any write() blocks.

    Used as a sink's stream, it records each write() so tests can see how lines were cut.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.filler = 0
        for size in (65536, 1):  # big writes, then single bytes into the last gap
            with contextlib.suppress(BlockingIOError):
                while True:
                    self.filler += os.write(self.write_fd, b"#" * size)
        os.set_blocking(self.write_fd, True)
        self.writes: list[bytes] = []
        self.writing = threading.Event()  # a write() has begun (and blocks, until drain)
        self._read: list[bytes] = []
        self._reader: threading.Thread | None = None

    def write(self, data: bytes) -> int:
        self.writing.set()
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        """Start reading the pipe (to its end, once `close` is called)."""

        def read() -> None:
            while chunk := os.read(self.read_fd, 65536):
                self._read.append(chunk)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def close(self) -> bytes:
        """Close the write end; what was written after the filler."""
        os.close(self.write_fd)
        if self._reader is None:
            self.drain()
        assert self._reader is not None
        self._reader.join(WAIT)
        assert not self._reader.is_alive()
        os.close(self.read_fd)
        data = b"".join(self._read)
        assert data[: self.filler] == b"#" * self.filler
        return data[self.filler :]


class LoopThread(threading.Thread):
    """Runs `scenario` on an event loop of its own thread, so a stuck loop cannot hang the
    test: it can only fail its bounded waits."""

    def __init__(self, scenario: Coroutine[Any, Any, None]) -> None:
        super().__init__(daemon=True)
        self.scenario = scenario
        self.errors: list[BaseException] = []
        self.start()

    def run(self) -> None:
        try:
            asyncio.run(self.scenario)
        except BaseException as exc:
            self.errors.append(exc)


def padded(n: int, pad: int = 80) -> dict[str, object]:
    """A record whose line is the same length for every n < 10000."""
    return {"n": f"{n:04d}", "pad": "x" * pad}


def line_of(record: dict[str, object]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def test_a_stalled_log_pipe_does_not_stall_the_event_loop() -> None:
    pipe = StuckPipe()
    sink = LogSink(stream=pipe)  # type: ignore[arg-type]
    records = [padded(n) for n in range(1000)]
    records[500] = padded(500, pad=100_000)  # one line longer than the pipe holds
    loop_ran, may_flush = threading.Event(), threading.Event()
    flushed: list[bool] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for record in records:
            sink.emit(record)
        await asyncio.sleep(0)  # the turn in which a sink writing on the loop blocks
        loop.call_soon(loop_ran.set)
        await loop.run_in_executor(None, may_flush.wait, WAIT)
        flushed.append(sink.flush(timeout=WAIT))

    thread = LoopThread(scenario())
    try:
        # The loop keeps running callbacks while the log pipe is stuck.
        assert loop_ran.wait(WAIT), "the event loop stalled on a blocked log write"
    finally:
        pipe.drain()
        may_flush.set()
        thread.join(WAIT)
    assert not thread.is_alive() and thread.errors == []
    assert flushed == [True]
    output = pipe.close()
    # flush() delivered every line, in order, each whole.
    assert output == b"".join(line_of(record) for record in records)
    assert sink.dropped == 0
    # Each write() held whole lines: the first (taken while the pipe was stuck), the rest.
    assert b"".join(pipe.writes) == output
    assert all(write.endswith(b"\n") for write in pipe.writes)


def test_lines_from_the_loop_and_other_threads_arrive_whole_and_in_order() -> None:
    pipe = StuckPipe()
    pipe.drain()  # a reader that keeps up, now
    sink = LogSink(stream=pipe)  # type: ignore[arg-type]
    count = 3000

    def emit_from(source: str) -> None:
        for n in range(count):
            sink.emit({"source": source, "n": n, "pad": "y" * (n % 300)})

    async def scenario() -> None:
        for n in range(count):
            sink.emit({"source": "loop", "n": n, "pad": "x" * (n % 300)})
            if n % 100 == 0:
                await asyncio.sleep(0)

    others = [threading.Thread(target=emit_from, args=(f"thread-{i}",)) for i in range(2)]
    loop = LoopThread(scenario())
    for thread in others:
        thread.start()
    for thread in (loop, *others):
        thread.join(WAIT)
        assert not thread.is_alive()
    assert loop.errors == []
    assert sink.flush(timeout=WAIT)
    output = pipe.close()
    assert all(write.endswith(b"\n") for write in pipe.writes)
    seen: dict[str, list[int]] = {}
    for line in output.splitlines():
        record = orjson.loads(line)  # a line cut or mixed with another would not parse
        seen.setdefault(record["source"], []).append(record["n"])
    assert seen == {source: list(range(count)) for source in ("loop", "thread-0", "thread-1")}


def test_past_the_cap_lines_are_dropped_and_counted() -> None:
    metrics = Metrics()
    pipe = StuckPipe()
    line = len(line_of(padded(0)))
    sink = LogSink(stream=pipe, max_pending_bytes=20 * line)  # type: ignore[arg-type]
    sink.count_drops_with(metrics.log_lines_dropped)
    counted: list[float | None] = []
    all_emitted, may_flush = threading.Event(), threading.Event()
    flushed: list[bool] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for n in range(10):
            sink.emit(padded(n))
        # The writer takes these 10 and blocks writing them: they still count to the cap.
        await loop.run_in_executor(None, pipe.writing.wait, WAIT)
        for n in range(10, 50):
            sink.emit(padded(n))
            await asyncio.sleep(0)
        counted.append(metrics.registry.get_sample_value("sidecar_log_lines_dropped_total"))
        all_emitted.set()
        await loop.run_in_executor(None, may_flush.wait, WAIT)
        flushed.append(sink.flush(timeout=WAIT))

    thread = LoopThread(scenario())
    try:
        assert all_emitted.wait(WAIT), "the event loop stalled on a blocked log write"
        assert counted == [30.0]  # the lines past the cap
    finally:
        pipe.drain()
        may_flush.set()
        thread.join(WAIT)
    assert not thread.is_alive() and thread.errors == []
    assert flushed == [True]
    assert sink.dropped == 30
    # The 20 lines that fitted are delivered at flush(), in order; the newer ones were lost.
    assert pipe.close() == b"".join(line_of(padded(n)) for n in range(20))


def test_flush_gives_up_on_a_stuck_pipe_within_its_timeout() -> None:
    pipe = StuckPipe()
    sink = LogSink(stream=pipe)  # type: ignore[arg-type]
    results: list[tuple[bool, float]] = []

    async def scenario() -> None:
        sink.emit(padded(0))
        started = time.monotonic()
        results.append((sink.flush(timeout=0.2), time.monotonic() - started))

    thread = LoopThread(scenario())
    thread.join(WAIT)
    try:
        assert not thread.is_alive() and thread.errors == []
        [(done, waited)] = results
        assert not done
        assert 0.2 <= waited < 0.2 + 1.0
    finally:
        pipe.drain()
    assert sink.flush(timeout=WAIT)  # once the pipe moves, the line that waited is written
    assert pipe.close() == line_of(padded(0))


def test_drops_counted_before_a_counter_is_given_are_added_to_it() -> None:
    metrics = Metrics()
    pipe = StuckPipe()
    sink = LogSink(stream=pipe, max_pending_bytes=1)  # type: ignore[arg-type]

    async def scenario() -> None:
        sink.emit(padded(0))

    thread = LoopThread(scenario())
    thread.join(WAIT)
    assert sink.dropped == 1
    sink.count_drops_with(metrics.log_lines_dropped)
    assert metrics.registry.get_sample_value("sidecar_log_lines_dropped_total") == 1.0
    pipe.drain()
    assert sink.flush(timeout=WAIT)
    assert pipe.close() == b""


def test_without_an_event_loop_lines_are_written_at_once() -> None:
    stream = io.BytesIO()
    sink = LogSink(stream=stream)
    sink.event("cli.error", level="error", message="bad config")
    assert orjson.loads(stream.getvalue())["event"] == "cli.error"  # no flush() needed


@pytest.mark.parametrize("now", [0.0, 1_700_000_000.0, 1_700_000_000.9996, 1_700_000_001.0005])
def test_utc_timestamp_matches_strftime_whatever_second_came_before(now: float) -> None:
    whole = int(now)
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    expected += f".{int((now - whole) * 1000):03d}Z"
    for before in (now, now - 1.0, now + 1.0, now - 0.5):
        utc_timestamp(before)  # whichever second is cached, the answer is the same
        assert utc_timestamp(now) == expected
