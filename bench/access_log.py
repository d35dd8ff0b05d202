"""CPU per access-log line: `AccessLog.write` and the `LogSink` behind it, in a running loop.

    .venv/bin/python bench/access_log.py > /dev/null                # lines go to stdout
    .venv/bin/python bench/access_log.py --logs OLD.py > /dev/null  # another logs.py

On uvloop, as `sidecar run`: one line per event-loop turn (requests finishing one at a
time, the common case at modest concurrency), then 32 lines per turn. The cost of a line is
the CPU time of the same loop turns with lines less without, divided by the lines: of the
loop's thread (what proxying waits for) and of the whole process (every thread, so a writer
thread is counted). Medians of --repeat runs, to stderr. Not a test; `bench/run` measures
whole requests.

CPU seconds drift on a shared machine; `--instructions --lines 20000` counts instructions
per line under valgrind's callgrind instead (a run with lines less one without): stable to
about 1 %.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import AccessLogConfig

HEADERS = CIMultiDictProxy(
    CIMultiDict(
        {
            "Host": "api.example.com",
            "User-Agent": "wrk/4.2",
            "Accept": "*/*",
            "Accept-Encoding": "gzip",
            "X-Request-Id": "9f2c1d7e8a4b4c3d",
            "Traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        }
    )
)
# One access line, as the handler writes it for a proxied GET.
LINE: dict[str, Any] = {
    "route": "api",
    "method": "GET",
    "target": "/v1/items/42?page=2",
    "status": 200,
    "duration": 0.001234,
    "upstream_duration": 0.000987,
    "bytes_in": 0,
    "bytes_out": 1234,
    "client": "10.0.0.7",
    "request_id": "9f2c1d7e8a4b4c3d",
    "headers": HEADERS,
}


def load_logs(path: str | None) -> ModuleType:
    if path is None:
        import sidecar.logs

        return sidecar.logs
    spec = importlib.util.spec_from_file_location("bench_logs", Path(path).resolve())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def measure(logs: ModuleType, lines: int, batch: int) -> tuple[float, float]:
    """µs per line: (loop thread, whole process)."""
    sink = logs.LogSink()
    write = logs.AccessLog(AccessLogConfig(), sink).write

    async def run(with_lines: bool) -> tuple[float, float]:
        thread, process = time.thread_time(), time.process_time()
        for _ in range(lines // batch):
            if with_lines:
                for _line in range(batch):
                    write(**LINE)
            await asyncio.sleep(0)
        sink.flush()  # what is still queued is part of the cost
        return time.thread_time() - thread, time.process_time() - process

    await run(True)  # warm-up
    base_thread, base_process = await run(False)
    thread, process = await run(True)
    return (thread - base_thread) / lines * 1e6, (process - base_process) / lines * 1e6


async def once(logs: ModuleType, lines: int, batch: int, turns: int) -> None:
    """`turns` loop turns with `lines` lines in all (for --instructions)."""
    sink = logs.LogSink()
    write = logs.AccessLog(AccessLogConfig(), sink).write
    for turn in range(turns):
        for _line in range(batch if turn < lines // batch else 0):
            write(**LINE)
        await asyncio.sleep(0)
    sink.flush()


def instructions(args: argparse.Namespace) -> None:
    """Instructions per line under callgrind: a run with lines less one without."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("--instructions needs valgrind")
    for batch in (1, 32):
        turns = args.lines // batch
        counts = []
        for lines in (0, args.lines):
            command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
            command += [sys.executable, __file__, "--once", str(lines), str(batch), str(turns)]
            if args.logs:
                command += ["--logs", args.logs]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            found = re.search(r"Collected : (\d+)", done.stderr)
            assert found is not None, done.stderr
            counts.append(int(found.group(1)))
        print(
            f"{batch:>2} line(s) per loop turn: {(counts[1] - counts[0]) / args.lines:,.0f} "
            "instructions/line",
            file=sys.stderr,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--logs", help="another logs.py to measure (default: sidecar.logs)")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions (valgrind), not time"
    )
    parser.add_argument("--once", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logs = load_logs(args.logs)
    if args.once:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(once(logs, *args.once))
        return 0
    if args.instructions:
        instructions(args)
        return 0
    for batch in (1, 32):
        runs = []
        for _ in range(args.repeat):
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runs.append(runner.run(measure(logs, args.lines, batch)))
        loop_thread = statistics.median(run[0] for run in runs)
        process = statistics.median(run[1] for run in runs)
        print(
            f"{batch:>2} line(s) per loop turn: {loop_thread:.2f} µs/line on the loop's thread, "
            f"{process:.2f} µs/line in all (medians of {args.repeat})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
