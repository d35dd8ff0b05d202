"""`bench/run --profile`: where a sidecar request's CPU time goes, by py-spy.

Starts the backend (and Redis, for a target on it) and one sidecar target, pass-through
unless `--targets` names another, pinned as in the benchmark (sidecar on core 1, wrk and
the rest on core 0), puts it under a bounded wrk load at 32 connections, and records it
twice with py-spy: a flame graph (bench/results/TARGET-profile.svg) and raw collapsed
stacks with native frames, which are summarised into bench/results/profile-summary.md
(pass-through) or TARGET-profile-summary.md (self time by component, hottest functions).
The reading of it is bench/results/profile.md, written by a person.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from measure import RESULT_MARK, CpuSnapshot, wrk_script
from services import (
    REGISTRY,
    RUN_DIR,
    allocate_ports,
    sidecar_config,
    start_backend,
    start_redis,
    start_sidecar,
    write_sidecar_config,
)
from targets import BENCH_DIR, TARGETS, policy_fragments

RESULTS = BENCH_DIR / "results"
CONNECTIONS = 32
SAMPLE_RATE = 200  # per second; 2000 samples in 10 s

# Who asked for the work: the component of the innermost Python frame of a sample, by the
# file it is in (first match wins).
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sidecar: metrics (prometheus_client)", ("sidecar/metrics.py", "prometheus_client")),
    ("sidecar: logging", ("sidecar/logs.py",)),
    ("sidecar: policies", ("sidecar/policies/", "sidecar/tracecontext.py", "sidecar/spans.py")),
    ("sidecar: handler, routing, chain", ("sidecar/",)),
    (
        "aiohttp client",
        ("aiohttp/client", "aiohttp/connector.py", "aiohttp/cookiejar.py", "aiohttp/tracing.py"),
    ),
    ("aiohttp server", ("aiohttp/web_", "aiohttp/base_protocol.py")),
    ("aiohttp HTTP parser/writer, streams", ("aiohttp/http_", "aiohttp/streams.py")),
    ("aiohttp other", ("aiohttp/",)),
    ("uuid (request ids)", ("uuid.py",)),
    # Runner.run is the innermost Python frame while uvloop itself works (polling, socket
    # reads, running callbacks): this is the event loop's own cost.
    ("event loop (uvloop: polling, socket reads, callbacks)", ("asyncio/runners.py",)),
    ("asyncio timeouts, tasks (Python)", ("asyncio/",)),
    ("random", ("random.py",)),
)
GC = "CPython garbage collector"
# What kind of work the innermost (native) frame is, by the source file py-spy names.
NATIVE_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "uvloop / libuv (C)",
        (
            "loop.c",
            "core.c",
            "linux.c",
            "heap-inl.h",
            "queue.h",
            "uv-common.c",
            "timer.c",
            "stream.c",
            "uvloop/",
        ),
    ),
    ("asyncio tasks/futures (C)", ("_asynciomodule.c",)),
    (
        "aiohttp HTTP parser/writer (C)",
        (
            "_http_parser",
            "_http_writer",
            "llhttp.c",
            "http.c",
            "api.c",
            "_find_header.c",
            "aiohttp/_",
        ),
    ),
    (
        "multidict (C)",
        (
            "hashtable.h",
            "bulk_update.h",
            "iter.h",
            "_multidict.c",
            "htkeys.h",
            "identity.h",
            "istr.h",
            "pythoncapi_compat.h",
            "dict.h",
            "parser.h",
            "views.h",
            "pair_list.h",
            "state.h",
            "str_cmp.h",
            "compat.h",
        ),
    ),
    ("propcache / yarl (C)", ("_helpers_c.c", "yarl/", "propcache/", "_quoting_c")),
    (
        "CPython runtime (refcounts, allocation, calls)",
        ("libpython", "object.h", ".c.h", "obmalloc", "ceval"),
    ),
)


def _file(frame: str) -> str:
    """'name (path/file.py:12)' -> 'path/file.py'; '0x7f.. (libc.so.6)' -> 'libc.so.6'."""
    where = frame.rpartition(" (")[2].rstrip(")")
    return where.rsplit(":", 1)[0] if where[-1:].isdigit() else where


def component(frame: str) -> str:
    path = _file(frame)
    for name, needles in COMPONENTS:
        if any(needle in path for needle in needles):
            return name
    return "other Python"


def work_kind(frames: list[str]) -> str:
    """What the CPU was doing in a sample: a syscall, GC, Python code, a C extension..."""
    if any("gc_collect" in f for f in frames):
        return GC
    leaf = frames[-1]
    path = _file(leaf)
    if "libc.so" in path or path == "[vdso]":
        name = leaf.partition(" (")[0]
        return f"syscall / libc: {'(unnamed)' if name.startswith('0x') else name}"
    if path.endswith(".py") or path.startswith("<"):
        return "Python code (interpreted)"
    for name, needles in NATIVE_KINDS:
        if any(needle in path for needle in needles):
            return name
    return "other native code"


@dataclass
class Profile:
    samples: int
    by_component: Counter[str]
    by_kind: Counter[str]
    # (syscall or GC, Python function that led to it) -> samples
    native_callers: Counter[tuple[str, str]]
    self_by_function: Counter[str]
    total_by_function: Counter[str]


def parse_collapsed(text: str) -> Profile:
    """py-spy --format raw: one 'frame;frame;...;leaf COUNT' line per distinct stack."""
    profile = Profile(0, Counter(), Counter(), Counter(), Counter(), Counter())
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        python = [f for f in frames if _file(f).endswith(".py")]
        kind = work_kind(frames)
        profile.samples += count
        profile.by_kind[kind] += count
        owner = python[-1] if python else frames[-1]
        profile.by_component[GC if kind == GC else component(owner)] += count
        if kind == GC or kind.startswith("syscall"):
            profile.native_callers[(kind, _short(owner))] += count
        # Functions: Python frames only (native frames are mostly loop plumbing).
        if python:
            profile.self_by_function[_short(python[-1])] += count
        for name in {_short(f) for f in python}:
            profile.total_by_function[name] += count
    return profile


def _short(frame: str) -> str:
    """'f (/x/site-packages/aiohttp/web_protocol.py:577)' -> 'f (aiohttp/web_protocol.py)'."""
    name = frame.partition(" (")[0]
    path = _file(frame)
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def summary_markdown(
    profile: Profile,
    rps: float | None,
    cpu_us: float | None,
    code_label: str,
    title: str = "pass-through sidecar",
) -> str:
    n = max(profile.samples, 1)

    def pct(count: int) -> str:
        return f"{100 * count / n:.1f} %"

    def table(header: str, rows: list[tuple[str, int]]) -> list[str]:
        return [header, "|---|---|", *(f"| {name} | {pct(count)} |" for name, count in rows)]

    while_profiled = (
        f"; {rps:.0f} req/s, {cpu_us:.0f} µs CPU/request while profiled (py-spy pauses the "
        "process for every sample, so both are worse than unprofiled)"
        if rps and cpu_us
        else ""
    )
    lines = [
        f"# Profile of the {title} (generated)",
        "",
        f"py-spy --native, {profile.samples} samples at {SAMPLE_RATE}/s of the {title} "
        f"pinned to one core, wrk {CONNECTIONS} connections, 100-byte body"
        f"{while_profiled}. Sidecar at {code_label}. Made by `bench/run --profile`; "
        "`profile.md` says what it means.",
        "",
        "## By the code responsible",
        "",
        "Each sample goes to the innermost Python frame's component (native work it called, "
        "a syscall or a C extension, counts for it), except garbage collection, which is "
        "caused by allocation everywhere.",
        "",
        *table("| component | CPU |", profile.by_component.most_common()),
        "",
        "## By kind of work",
        "",
        "What the innermost frame was: a syscall, the collector, interpreted Python, or a C "
        "extension.",
        "",
        *table("| kind | CPU |", profile.by_kind.most_common(20)),
        "",
        "## Syscalls and collections, by the Python function that led to them",
        "",
        "| kind | called from | CPU |",
        "|---|---|---|",
    ]
    for (kind, owner), count in profile.native_callers.most_common(20):
        lines.append(f"| {kind} | `{owner}` | {pct(count)} |")
    lines += [
        "",
        "## Hottest Python functions, inclusive (total) time",
        "",
        "| function | total | self |",
        "|---|---|---|",
    ]
    for name, count in profile.total_by_function.most_common(40):
        lines.append(f"| `{name}` | {pct(count)} | {pct(profile.self_by_function[name])} |")
    lines += [
        "",
        "## Hottest Python functions, self time (with the native work they called)",
        "",
        *table(
            "| function | self |",
            [(f"`{name}`", count) for name, count in profile.self_by_function.most_common(30)],
        ),
    ]
    return "\n".join(lines) + "\n"


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is missing: bench/run --profile installs it")
    return found


def record(pid: int, seconds: int, out: Path, fmt: str, native: bool) -> bool:
    # py-spy itself runs on the load core, so it does not take CPU from the sidecar.
    argv = [
        "taskset",
        "-c",
        "0",
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        fmt,
        "-o",
        str(out),
    ]
    if native:
        argv.append("--native")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        print(
            f"py-spy {fmt}{' --native' if native else ''} failed: {done.stderr.strip()}",
            file=sys.stderr,
        )
    return done.returncode == 0 and out.exists()


def main(seconds: int, port_base: int, files: Path, code_label: str, name: str) -> int:
    target = next((t for t in TARGETS if t.name == name and t.kind == "sidecar"), None)
    if target is None:
        print(f"bench: --profile takes one sidecar target (see --list), not {name!r}")
        return 2
    ports = allocate_ports([target], port_base)
    port, admin = ports.proxies[target.name]
    config = write_sidecar_config("profile", sidecar_config(target, ports, policy_fragments()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RUN_DIR / f"{name}-profile.raw.txt"
    summary_file = RESULTS / (
        "profile-summary.md" if name == "passthrough" else f"{name}-profile-summary.md"
    )
    stacks_file = RESULTS / f"{name}-profile.collapsed.txt.gz"
    try:
        if target.state == "redis":
            start_redis(ports.redis, "0")
        start_backend(ports.backend, files, "0")
        sidecar = start_sidecar("profile", config, port, admin, 1, "1")
        load_seconds = 2 * seconds + 8
        wrk = REGISTRY.start(
            "wrk",
            [
                "wrk",
                "-t1",
                "-c",
                str(CONNECTIONS),
                "-d",
                f"{load_seconds}s",
                "--latency",
                "-s",
                str(wrk_script("get")),
                f"http://127.0.0.1:{port}/",
            ],
            cpus="0",
            log=RUN_DIR / "logs" / "wrk-profile.log",
        )
        time.sleep(3)  # warm up before sampling
        before = CpuSnapshot.take([sidecar.pid])
        started_at = time.monotonic()
        svg = RESULTS / f"{name}-profile.svg"
        record(sidecar.pid, seconds, svg, "flamegraph", native=False)
        if not record(sidecar.pid, seconds, raw, "raw", native=True):
            record(sidecar.pid, seconds, raw, "raw", native=False)
        cpu_s = before.seconds_until(CpuSnapshot.take([sidecar.pid]))
        elapsed = time.monotonic() - started_at
        wrk.popen.wait(timeout=load_seconds + 30)
    finally:
        REGISTRY.stop_all()
    rps = wrk_rps(RUN_DIR / "logs" / "wrk-profile.log")
    cpu_us = cpu_s * 1e6 / (rps * elapsed) if cpu_s and rps else None
    summary = summary_markdown(
        parse_collapsed(raw.read_text()), rps, cpu_us, code_label, target.title
    )
    summary_file.write_text(summary)
    # Gzipped: the raw stacks with native frames are ~1 MB of text.
    with raw.open("rb") as src, gzip.open(stacks_file, "wb") as dst:
        shutil.copyfileobj(src, dst)
    print(summary)
    print(f"wrote {svg}, {summary_file}, {stacks_file}")
    return 0


def wrk_rps(log: Path) -> float | None:
    for line in log.read_text().splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            return float(data["requests"]) / (float(data["duration_us"]) / 1e6)
    return None
