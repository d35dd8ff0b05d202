"""Measuring: one wrk run with the CPU, store and error figures around it; RSS; streaming.

CPU per request is the figure that survives a noisy machine: utime+stime of the proxy's
processes (from /proc/PID/stat, summed over a supervisor and its workers, or an nginx master
and its worker) over the run, divided by the requests wrk completed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services import (
    RUN_DIR,
    Started,
    redis_total_calls,
    sidecar_latency_path_operations,
    start_time,
)
from targets import BENCH_DIR

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RESULT_MARK = "BENCH_RESULT "
# A wrk run is bounded by -d; this is the hard stop should wrk itself hang.
WRK_GRACE_SECONDS = 20


# --- /proc --------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of stat(5))


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle, from the `cpu` line of /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_seconds() -> float:
    """CPU of this harness and of the children it has reaped (each finished wrk run)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class CpuSnapshot:
    """CPU ticks of a fixed set of PIDs (identity checked by start time)."""

    ticks: dict[int, tuple[int, int]]  # pid -> (start time, ticks)

    @classmethod
    def take(cls, pids: list[int]) -> CpuSnapshot:
        ticks = {}
        for pid in pids:
            st, t = start_time(pid), cpu_ticks(pid)
            if st is not None and t is not None:
                ticks[pid] = (st, t)
        return cls(ticks)

    def seconds_until(self, later: CpuSnapshot) -> float | None:
        """CPU seconds used between the two; None if a process came or went meanwhile."""
        if later.ticks.keys() != self.ticks.keys():
            return None
        total = 0
        for pid, (st, t) in self.ticks.items():
            st2, t2 = later.ticks[pid]
            if st2 != st:
                return None
            total += t2 - t
        return total / CLOCK_TICKS


def peak_rss_mib(started: Started) -> float | None:
    """VmHWM summed over the process and its children (a supervisor's workers too)."""
    values = [status_kib(pid, "VmHWM") for pid in started.pids()]
    known = [v for v in values if v is not None]
    return round(sum(known) / 1024, 1) if known else None


# --- wrk ----------------------------------------------------------------------------------


def wrk_script(name: str) -> Path:
    """bench/wrk/report.lua (headers + result line) followed by the target's own script."""
    out = RUN_DIR / "wrk" / f"{name}.lua"
    out.parent.mkdir(parents=True, exist_ok=True)
    wrk_dir = BENCH_DIR / "wrk"
    parts = [(wrk_dir / "report.lua").read_text(), (wrk_dir / f"{name}.lua").read_text()]
    out.write_text("\n".join(parts))
    return out


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_us: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def run_wrk(
    url: str, script: Path, connections: int, threads: int, seconds: int, cpus: str | None
) -> WrkResult:
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    # A fresh nonce per run keeps idempotency keys unique across runs and targets.
    env = {**os.environ, "BENCH_NONCE": uuid.uuid4().hex[:12]}
    # subprocess.run kills wrk on timeout and on any exception (Ctrl-C included).
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + WRK_GRACE_SECONDS,
        start_new_session=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            return WrkResult(
                data["requests"], data["duration_us"] / 1e6, data["errors"], data["latency_us"]
            )
    raise RuntimeError(
        f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


@dataclass
class RunRecord:
    """One counted run of one target: what wrk saw and what it cost the proxy."""

    target: str
    pinning: str
    connections: int
    round: int
    requests: int
    rps: float
    latency_us: dict[str, float]
    errors: dict[str, int]
    proxy_cpu_us_per_req: float | None
    backend_cpu_us_per_req: float | None
    store_cmds_per_req: float | None
    store_scripts_per_req: float | None
    # Of those, the ones a request waits for (the sidecar's own count by operation).
    latency_path_scripts_per_req: float | None
    # CPU used on the machine by processes that are not part of the benchmark, in % of one
    # core over the run: other people's test suites on a shared machine show up here.
    other_cpu_pct: float | None
    # How many times this run was measured (noisy attempts are retried; the quietest kept).
    attempts: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Probe:
    """What to watch during a run: the proxy's processes, the backend's, Redis."""

    proxy: Started | None
    backend: Started
    # Every process the benchmark runs (all targets, Redis): not "other load".
    ours: list[Started]
    redis_port: int | None = None
    # Store commands count only for targets whose sidecar talks to Redis.
    uses_store: bool = False
    # The sidecar's admin port, to read which store operations were on the latency path.
    admin_port: int | None = None


def measured_run(
    probe: Probe,
    url: str,
    script: Path,
    connections: int,
    threads: int,
    seconds: int,
    cpus: str | None,
) -> tuple[WrkResult, dict[str, float | None]]:
    proxy_pids = probe.proxy.pids() if probe.proxy else []
    backend_pids = probe.backend.pids()
    our_pids = [pid for started in probe.ours for pid in started.pids()]
    proxy0, backend0 = CpuSnapshot.take(proxy_pids), CpuSnapshot.take(backend_pids)
    ours0, busy0, own0 = CpuSnapshot.take(our_pids), machine_busy_seconds(), own_seconds()
    wall0 = time.monotonic()
    counts_store = bool(probe.uses_store and probe.redis_port)
    store0, scripts0 = redis_total_calls(probe.redis_port) if counts_store else (0, 0)
    counts_path = counts_store and probe.admin_port is not None
    path0 = sidecar_latency_path_operations(probe.admin_port) if counts_path else 0
    result = run_wrk(url, script, connections, threads, seconds, cpus)
    store1, scripts1 = redis_total_calls(probe.redis_port) if counts_store else (0, 0)
    path1 = sidecar_latency_path_operations(probe.admin_port) if counts_path else 0
    store, scripts, on_path = store1 - store0, scripts1 - scripts0, path1 - path0
    proxy_s = proxy0.seconds_until(CpuSnapshot.take(proxy_pids)) if proxy_pids else None
    backend_s = backend0.seconds_until(CpuSnapshot.take(backend_pids))
    ours_s = ours0.seconds_until(CpuSnapshot.take(our_pids))
    busy_s, own_s = machine_busy_seconds() - busy0, own_seconds() - own0
    wall = time.monotonic() - wall0
    other = None if ours_s is None else max(busy_s - ours_s - own_s, 0.0) / wall
    n = max(result.requests, 1)
    figures: dict[str, float | None] = {
        "proxy_cpu_us_per_req": None if proxy_s is None else round(proxy_s * 1e6 / n, 2),
        "backend_cpu_us_per_req": None if backend_s is None else round(backend_s * 1e6 / n, 2),
        "store_cmds_per_req": round(store / n, 3),
        "store_scripts_per_req": round(scripts / n, 3),
        "latency_path_scripts_per_req": round(on_path / n, 3) if counts_path else None,
        "other_cpu_pct": None if other is None else round(100 * other, 1),
    }
    return result, figures


def other_load_pct(ours: list[Started], seconds: float = 0.5) -> float | None:
    """CPU used by processes outside the benchmark over `seconds`, in % of one core."""
    pids = [pid for started in ours for pid in started.pids()]
    ours0, busy0, own0 = CpuSnapshot.take(pids), machine_busy_seconds(), own_seconds()
    wall0 = time.monotonic()
    time.sleep(seconds)
    ours_s = ours0.seconds_until(CpuSnapshot.take(pids))
    if ours_s is None:
        return None
    busy_s, own_s = machine_busy_seconds() - busy0, own_seconds() - own0
    return round(100 * max(busy_s - ours_s - own_s, 0.0) / (time.monotonic() - wall0), 1)


# --- the streaming check ------------------------------------------------------------------


class RssSampler:
    """Samples VmRSS of one process every `interval` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.peak_kib = max(self.peak_kib, rss)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def curl(args: list[str], timeout: float) -> dict[str, str]:
    """Run curl with a -w format of key=value pairs; returns them."""
    fmt = "code=%{http_code} up=%{size_upload} down=%{size_download} time=%{time_total}"
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(timeout)), "-w", fmt, *args]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout + 10, start_new_session=True
    )
    values = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
    if done.returncode != 0:
        values["error"] = done.stderr.strip() or f"curl exit {done.returncode}"
    return values


def io_bytes(pids: list[int], key: str) -> int:
    """Sum of one /proc/PID/io counter (rchar: bytes read by syscalls, wchar: written)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def stream_through(
    pid: int, curl_args: list[str], size: int, direction: str, timeout: float
) -> dict[str, Any]:
    """RSS of the sidecar while one transfer of `size` bytes passes through it.

    "Passes through" is checked with curl's byte count and the sidecar's /proc/PID/io
    counters: it must have read the bytes from one side and written them to the other.
    """
    time.sleep(0.5)  # let the allocator settle after the previous transfer
    baseline = status_kib(pid, "VmRSS") or 0
    before = {k: io_bytes([pid], k) for k in ("rchar", "wchar")}
    with RssSampler(pid) as sampler:
        values = curl(curl_args, timeout)
        time.sleep(0.5)  # the last bytes may still be on their way to the backend
    moved = int(values.get("up" if direction == "upload" else "down", "0"))
    sidecar_in = io_bytes([pid], "rchar") - before["rchar"]
    sidecar_out = io_bytes([pid], "wchar") - before["wchar"]
    relayed = min(sidecar_in, sidecar_out)
    ok = values.get("code", "").startswith("2")
    complete = ok and moved == size and relayed >= size
    seconds = float(values.get("time", "0") or 0)
    return {
        "direction": direction,
        "status": int(values.get("code", "0") or 0),
        "bytes": moved,
        "sidecar_read_bytes": sidecar_in,
        "sidecar_written_bytes": sidecar_out,
        "complete": complete,
        "seconds": round(seconds, 2),
        "mib_per_s": round(moved / 2**20 / seconds, 1) if seconds else None,
        "baseline_rss_mib": round(baseline / 1024, 1),
        "peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "growth_mib": round(max(sampler.peak_kib - baseline, 0) / 1024, 1),
        "samples": sampler.samples,
        "error": values.get("error"),
    }
