"""bench/run's orchestration: check targets, start services, run wrk interleaved, report.

One run goes: work out which targets the sidecar can serve yet (check-config), then for each
pinning mode start the backend, Redis and one proxy per target (nginx, the naive aiohttp
proxy, sidecars), warm every target up at a concurrency, and measure them round-robin
(A B C ... A B C ...) so machine drift hits all alike; then the streaming check; then
results.json, results.md and results.png.

Run it through bench/run, which installs the tools and picks the virtualenv first.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import report
from measure import (
    Probe,
    RunRecord,
    measured_run,
    other_load_pct,
    peak_rss_mib,
    stream_through,
    wrk_script,
)
from services import (
    REGISTRY,
    REPO_DIR,
    RUN_DIR,
    WORK_DIR,
    Ports,
    SidecarSource,
    Started,
    allocate_ports,
    check_config,
    prepare_run_dir,
    sidecar_config,
    start_backend,
    start_naive,
    start_nginx,
    start_redis,
    start_sidecar,
    write_sidecar_config,
)
from targets import (
    BENCH_DIR,
    STREAM_TARGETS,
    TARGETS,
    Pinning,
    Target,
    policy_fragments,
    select,
)

# On this 2-core machine: the proxy under test gets core 1 to itself; wrk, the backend nginx
# and Redis share core 0. Unpinned runs let the kernel place everything.
PROXY_CPUS = "1"
LOAD_CPUS = "0"
SIZES = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


# --- command line -------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 1GiB or 64MiB, got {text!r}")
    return int(match.group(1)) * SIZES[match.group(2) or "B"]


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark the sidecar against a direct call, nginx and a naive aiohttp "
        "proxy (see bench/README.md).",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long check that everything works: direct, nginx, naive, "
        "pass-through and default, 1 run of 1 s at 32 connections, pinned, small "
        "streaming check; results go to bench/.work/smoke-results",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=None,
        metavar="S",
        help="seconds per counted run (default 4; smoke 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        metavar="S",
        help="seconds of warm-up per target and concurrency (default 2; smoke 1)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        metavar="N",
        help="counted runs per target and concurrency (default 3; smoke 1)",
    )
    parser.add_argument(
        "--connections",
        type=lambda s: [int(c) for c in parse_list(s)],
        default=None,
        metavar="C,C,...",
        help="wrk connection counts (default 1,32,64; smoke 32)",
    )
    parser.add_argument(
        "--pinning",
        choices=("both", "pinned", "unpinned"),
        default=None,
        help="pinned: sidecar on core 1, wrk/backend/Redis on core 0; "
        "unpinned: no taskset (default both; smoke pinned)",
    )
    parser.add_argument(
        "--unpinned",
        action="store_const",
        const="unpinned",
        dest="pinning",
        help="same as --pinning unpinned",
    )
    parser.add_argument(
        "--targets",
        type=parse_list,
        default=None,
        metavar="NAME,...",
        help="measure only these targets (see --list); measured in both "
        "pinning modes unless --pinning says otherwise",
    )
    parser.add_argument(
        "--stream-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="bytes per direction of the streaming check (default 1GiB; smoke 32MiB)",
    )
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming check")
    parser.add_argument(
        "--noisy-pct",
        type=float,
        default=10.0,
        metavar="PCT",
        help="a counted run during which other processes used more than PCT %% of a core "
        "is measured again (default 10)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        metavar="N",
        help="at most N more attempts per noisy run, the quietest kept (default 2; smoke 0)",
    )
    parser.add_argument(
        "--retry-budget",
        type=int,
        default=180,
        metavar="S",
        help="seconds the whole run may spend on retries (default 180)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request under callgrind instead (GET targets of the "
        "sidecar and naive; default passthrough,naive,tracing): repeatable where CPU seconds "
        "drift (see instructions.py)",
    )
    parser.add_argument(
        "--instr-requests",
        type=int,
        default=1000,
        help="requests counted per target with --instructions (default 1000)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default bench/results; smoke bench/.work/smoke-results)",
    )
    parser.add_argument(
        "--at-commit",
        metavar="REV",
        help="run the sidecar code of this commit (extracted with git archive into "
        "bench/.work/) instead of the working tree, which others may be editing",
    )
    parser.add_argument(
        "--port-base",
        type=int,
        default=18400,
        help="first port to try on 127.0.0.1 (default 18400)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the targets and whether the sidecar accepts their config",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of benchmarking: profile one pinned sidecar target (pass-through, "
        "or the one --targets names) under load with py-spy (see bench/pyspy.py)",
    )
    parser.add_argument(
        "--profile-seconds",
        type=int,
        default=10,
        metavar="S",
        help="seconds of each py-spy recording (default 10)",
    )
    return parser


@dataclass(frozen=True)
class Settings:
    smoke: bool
    duration: int
    warmup: int
    runs: int
    connections: list[int]
    pinnings: list[Pinning]
    stream_size: int
    stream: bool
    out: Path
    explicit_targets: bool
    noisy_pct: float
    retries: int
    retry_budget: int


def _from_caller(path: Path | None) -> Path | None:
    """A relative path from the command line, taken from where bench/run was started."""
    if path is None or path.is_absolute():
        return path
    return Path(os.environ.get("BENCH_CALLER_DIR", ".")) / path


def settings_from(args: argparse.Namespace) -> Settings:
    smoke = args.smoke

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if smoke else full)

    pinning = pick(args.pinning, "both", "pinned")
    pinnings: list[Pinning] = ["pinned", "unpinned"] if pinning == "both" else [pinning]
    settings = Settings(
        smoke=smoke,
        duration=pick(args.duration, 4, 1),
        warmup=pick(args.warmup, 2, 1),
        runs=pick(args.runs, 3, 1),
        connections=pick(args.connections, [1, 32, 64], [32]),
        pinnings=pinnings,
        stream_size=pick(args.stream_size, 2**30, 32 * 2**20),
        stream=not args.no_stream,
        out=pick(_from_caller(args.out), BENCH_DIR / "results", WORK_DIR / "smoke-results"),
        explicit_targets=bool(args.targets),
        noisy_pct=args.noisy_pct,
        retries=pick(args.retries, 2, 0),
        retry_budget=args.retry_budget,
    )
    if settings.duration < 1 or settings.runs < 1 or settings.warmup < 0:
        raise SystemExit("--duration and --runs must be at least 1, --warmup at least 0")
    if "pinned" in pinnings and (os.cpu_count() or 1) < 2:
        raise SystemExit("pinning needs 2 cores; use --pinning unpinned")
    return settings


# --- stopping everything, whatever happens ------------------------------------------------


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Unwinds through every `finally` (services stop there); wrk is killed by subprocess.run.
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(REGISTRY.stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- preparation --------------------------------------------------------------------------


def check_tools() -> None:
    missing = [
        t for t in ("wrk", "nginx", "redis-server", "taskset", "curl") if shutil.which(t) is None
    ]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (bench/run installs them)")


def write_backend_files(stream_size: int) -> Path:
    files = RUN_DIR / "files"
    files.mkdir(parents=True, exist_ok=True)
    for name, size in (("body-16k.bin", 16 * 2**10), ("body-1m.bin", 2**20)):
        path = files / name
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes((b"0123456789abcdef" * (size // 16 + 1))[:size])
    # Sparse: reads as zeros, takes no disk, and nginx serves it with sendfile.
    big = files / "big.bin"
    with big.open("wb") as f:
        f.truncate(stream_size)
    for path in (files, *files.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return files


@dataclass
class Availability:
    status: str  # "available", "not available yet", "config rejected", "failed to start"
    detail: str = ""
    config: Path | None = None


def check_availability(targets: list[Target], ports: Ports) -> dict[str, Availability]:
    """Generate each sidecar target's config and ask `sidecar check-config` about it."""
    fragments = policy_fragments()
    found: dict[str, Availability] = {}
    for target in targets:
        if target.kind != "sidecar":
            found[target.name] = Availability("available")
            continue
        path = write_sidecar_config(target.name, sidecar_config(target, ports, fragments))
        accepted, complaint = check_config(path)
        if accepted:
            found[target.name] = Availability("available", config=path)
        elif target.requires is None:
            raise SystemExit(
                f"the harness's own config for {target.name} is rejected: {complaint}\n(see {path})"
            )
        elif "unknown key" in complaint:
            found[target.name] = Availability("not available yet", complaint, path)
        else:
            found[target.name] = Availability("config rejected", complaint, path)
    return found


def tool_version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "?"


def working_tree_label() -> str:
    """HEAD's short hash, and whether sidecar/ has changes that are not committed."""
    commit = tool_version(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], r"(\S+)")
    dirty = tool_version(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "sidecar"], r"(\S+)"
    )
    return commit + (" + uncommitted changes in sidecar/" if dirty != "?" else "")


def machine_info() -> dict[str, Any]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import aiohttp  # the venv's, which is what the sidecar and the naive proxy run on

    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    commit = SidecarSource.label or working_tree_label()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_version,
        "nginx": tool_version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": tool_version(["wrk", "-v"], r"wrk (\S+)"),
        "redis": tool_version(["redis-server", "--version"], r"v=(\S+)"),
        "commit": commit,
    }


# --- one pinning mode ---------------------------------------------------------------------


def cpus_for(pinning: Pinning) -> tuple[str | None, str | None]:
    """(cores for wrk, the backend and Redis; cores for the proxy under test)."""
    return (LOAD_CPUS, PROXY_CPUS) if pinning == "pinned" else (None, None)


@dataclass
class Phase:
    """Everything running for one pinning mode."""

    pinning: Pinning
    ports: Ports
    backend: Started
    redis: Started | None = None
    proxies: dict[str, Started] = field(default_factory=dict)

    @property
    def load_cpus(self) -> str | None:
        return cpus_for(self.pinning)[0]

    def url(self, target: Target) -> str:
        port = self.ports.backend if target.kind == "direct" else self.ports.proxies[target.name][0]
        return f"http://127.0.0.1:{port}{target.path}"

    def everything(self) -> list[Started]:
        """Every process of this phase (what is not in here is "other load")."""
        return [self.backend, *self.proxies.values(), *([self.redis] if self.redis else [])]

    def wrk_threads(self, connections: int) -> int:
        # Pinned, wrk has one core: a second thread would only add switching.
        return min(connections, 1 if self.pinning == "pinned" else 2)


@contextlib.contextmanager
def phase_services(
    pinning: Pinning,
    targets: list[Target],
    ports: Ports,
    files: Path,
    availability: dict[str, Availability],
) -> Iterator[Phase]:
    load, proxy = cpus_for(pinning)
    try:
        phase = Phase(pinning, ports, start_backend(ports.backend, files, load))
        if any(t.state == "redis" for t in targets):
            phase.redis = start_redis(ports.redis, load)
        for target in targets:
            port, admin = ports.proxies.get(target.name, (0, 0))
            if target.kind == "nginx":
                phase.proxies[target.name] = start_nginx(
                    target.name,
                    "nginx-proxy.conf",
                    {"BACKEND_PORT": str(ports.backend)},
                    port,
                    proxy,
                )
            elif target.kind == "naive":
                phase.proxies[target.name] = start_naive(target.name, port, ports.backend, proxy)
            elif target.kind == "sidecar":
                config = availability[target.name].config
                assert config is not None
                try:
                    phase.proxies[target.name] = start_sidecar(
                        target.name, config, port, admin, target.workers, proxy
                    )
                except RuntimeError as exc:
                    if target.requires is None:
                        raise
                    # A policy that validates but cannot serve yet: report it, go on.
                    availability[target.name] = Availability(
                        "failed to start", str(exc).splitlines()[-1][:200], config
                    )
                    log(f"{target.name}: failed to start, skipped ({exc})")
        yield phase
    finally:
        REGISTRY.stop_all()


class RetryBudget:
    """Seconds the whole run may still spend measuring noisy runs again."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    def take(self, seconds: float) -> bool:
        if self.left < seconds:
            return False
        self.left -= seconds
        return True


def run_phase(
    phase: Phase, targets: list[Target], settings: Settings, budget: RetryBudget
) -> list[RunRecord]:
    targets = [t for t in targets if t.kind == "direct" or t.name in phase.proxies]
    scripts = {t.script: wrk_script(t.script) for t in targets}
    records: list[RunRecord] = []
    for connections in settings.connections:
        if settings.warmup:
            log(f"{phase.pinning}, {connections} conn: warm-up, {settings.warmup}s per target")
            for target in targets:
                measured_run(
                    probe(phase, target),
                    phase.url(target),
                    scripts[target.script],
                    connections,
                    phase.wrk_threads(connections),
                    settings.warmup,
                    phase.load_cpus,
                )
        for round_no in range(1, settings.runs + 1):
            # Each round starts one target further on (A B C, B C A, C A B...): whatever
            # favours a position in the round (the first target after a pause, say) falls
            # on every target alike instead of always on the same one.
            shift = (round_no - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                record = counted_run(
                    phase,
                    target,
                    scripts[target.script],
                    connections,
                    round_no,
                    settings,
                    budget,
                )
                records.append(record)
                log(describe_run(record))
    return records


def counted_run(
    phase: Phase,
    target: Target,
    script: Path,
    connections: int,
    round_no: int,
    settings: Settings,
    budget: RetryBudget,
) -> RunRecord:
    """One counted run; measured again (up to --retries) while other processes were busy
    on the machine, as on a shared machine they come and go. The quietest attempt is kept."""
    best: RunRecord | None = None
    for attempt in range(1, settings.retries + 2):
        if attempt > 1:
            if not budget.take(settings.duration + 1):
                break
            wait_for_quiet(phase, settings.noisy_pct)
        result, figures = measured_run(
            probe(phase, target),
            phase.url(target),
            script,
            connections,
            phase.wrk_threads(connections),
            settings.duration,
            phase.load_cpus,
        )
        record = RunRecord(
            target=target.name,
            pinning=phase.pinning,
            connections=connections,
            round=round_no,
            requests=result.requests,
            rps=round(result.rps, 1),
            latency_us=result.latency_us,
            errors=result.errors,
            attempts=attempt,
            **figures,
        )
        if best is None or _noise(record) < _noise(best):
            best = record
        best.attempts = attempt
        if _noise(record) <= settings.noisy_pct:
            break
    assert best is not None
    return best


def _noise(record: RunRecord) -> float:
    return record.other_cpu_pct if record.other_cpu_pct is not None else 0.0


def wait_for_quiet(phase: Phase, noisy_pct: float, longest: float = 5.0) -> None:
    """Before measuring again: wait (briefly) until other processes calm down."""
    deadline = time.monotonic() + longest
    while time.monotonic() < deadline:
        other = other_load_pct(phase.everything())
        if other is None or other <= noisy_pct:
            return


def probe(phase: Phase, target: Target) -> Probe:
    return Probe(
        proxy=phase.proxies.get(target.name),
        backend=phase.backend,
        ours=phase.everything(),
        redis_port=phase.ports.redis if phase.redis else None,
        uses_store=target.state == "redis",
        admin_port=phase.ports.proxies[target.name][1] if target.kind == "sidecar" else None,
    )


def describe_run(r: RunRecord) -> str:
    cpu = f"{r.proxy_cpu_us_per_req:.1f}" if r.proxy_cpu_us_per_req is not None else "-"
    errors = sum(r.errors.values())
    flag = f"  ERRORS {r.errors}" if errors else ""
    if r.other_cpu_pct is not None and r.other_cpu_pct >= report.NOISY_PCT:
        flag += f"  (other load on the machine: {r.other_cpu_pct:.0f}% of a core)"
    if r.attempts > 1:
        flag += f"  [best of {r.attempts} attempts]"
    return (
        f"{r.pinning:8} c={r.connections:<3} #{r.round} {r.target:18} "
        f"{r.rps:9.0f} req/s  p50 {r.latency_us['p50'] / 1000:6.2f} ms  "
        f"p99 {r.latency_us['p99'] / 1000:6.2f} ms  cpu {cpu:>6} us/req{flag}"
    )


def process_facts(phase: Phase) -> dict[str, dict[str, Any]]:
    """After a phase: peak RSS of each proxy and what its log says went wrong."""
    facts: dict[str, dict[str, Any]] = {}
    for name, started in phase.proxies.items():
        facts[name] = {"peak_rss_mib": peak_rss_mib(started), **log_problems(started)}
    facts["backend"] = {"peak_rss_mib": peak_rss_mib(phase.backend), **log_problems(phase.backend)}
    return facts


def log_problems(started: Started) -> dict[str, Any]:
    """Warnings, errors and tracebacks in a process's output (and nginx's error.log),
    counted by kind: the exception a traceback ends with, the event of a JSON line."""
    paths = [started.log]
    if started.name.startswith("nginx-"):
        paths.append(RUN_DIR / started.name / "error.log")
    kinds: dict[str, int] = {}
    for path in paths:
        # Line by line: with the access log on, a log holds hundreds of thousands of lines.
        with contextlib.suppress(OSError), path.open(errors="replace") as lines:
            for kind in _problem_kinds(line.rstrip("\n") for line in lines):
                kinds[kind] = kinds.get(kind, 0) + 1
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
    return {
        "log_problems": sum(kinds.values()),
        "log_kinds": [{"kind": k, "count": n} for k, n in ranked[:8]],
    }


def _problem_kinds(lines: Iterable[str]) -> Iterator[str]:
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line and not line.startswith(" "):
            # The first unindented line after the frames: "module.Error: message".
            in_traceback = False
            yield "traceback: " + line.strip()[:200]
        elif '"level":"warning"' in line or '"level":"error"' in line:
            event = re.search(r'"event":"([^"]+)"', line)
            kind = re.search(r'"kind":"([^"]+)"', line)
            yield (
                "log: "
                + (event.group(1) if event else line[:120])
                + (f" ({kind.group(1)})" if kind else "")
            )
        elif re.search(r"\[(error|crit|alert|emerg)\]", line):
            yield "nginx: " + re.sub(r"^.*?\[(\w+)\] \d+#\d+: (\*\d+ )?", r"[\1] ", line)[:160]


# --- the streaming check ------------------------------------------------------------------


def streaming_check(ports: Ports, files: Path, size: int) -> dict[str, Any]:
    """RSS of each streaming proxy (STREAM_TARGETS, one at a time, unpinned) while `size`
    bytes go up, then down, through it."""
    by_name = {t.name: t for t in TARGETS}
    # Bounded: a transfer slower than 8 MiB/s (the sidecar does ~300 up, ~1000 down) is
    # stopped by curl's --max-time and reported incomplete.
    timeout = max(60.0, size / (8 * 2**20))
    proxies: dict[str, dict[str, Any]] = {}
    try:
        start_backend(ports.backend, files, None)
        for name in STREAM_TARGETS:
            port, admin = ports.stream[name]
            target = by_name[name]
            if target.kind == "naive":
                started = start_naive(f"stream-{name}", port, ports.backend, None)
            else:
                config = write_sidecar_config(
                    f"stream-{name}",
                    sidecar_config(target, ports, policy_fragments(), listen=(port, admin)),
                )
                started = start_sidecar(f"stream-{name}", config, port, admin, 1, None)
            log(f"streaming check: {size / 2**20:.0f} MiB up and down through {name}")
            try:
                proxies[name] = stream_both(
                    started, f"http://127.0.0.1:{port}", files, size, timeout
                )
            finally:
                REGISTRY.stop(started)
    finally:
        REGISTRY.stop_all()
    for name, result in proxies.items():
        for direction in ("upload", "download"):
            r = result[direction]
            log(
                f"  {name:12} {direction:8}: {r['bytes'] / 2**20:.0f} MiB, status {r['status']}, "
                f"{r['mib_per_s']} MiB/s, RSS {r['baseline_rss_mib']} -> peak "
                f"{r['peak_rss_mib']} MiB (+{r['growth_mib']} MiB)"
            )
    return {"size_bytes": size, "timeout_s": timeout, "proxies": proxies}


def stream_both(
    started: Started, base: str, files: Path, size: int, timeout: float
) -> dict[str, Any]:
    """One PUT of `size` bytes to the backend's sink and one GET of as many, through a proxy."""
    received = RUN_DIR / "nginx-backend" / "upload" / "received.bin"
    received.unlink(missing_ok=True)
    upload = stream_through(
        started.pid,
        [
            "-T",
            str(files / "big.bin"),
            "-H",
            "Content-Type: application/octet-stream",
            f"{base}/upload",
        ],
        size,
        "upload",
        timeout,
    )
    upload["backend_stored_bytes"] = received.stat().st_size if received.exists() else 0
    upload["complete"] = upload["complete"] and upload["backend_stored_bytes"] == size
    received.unlink(missing_ok=True)
    download = stream_through(started.pid, [f"{base}/big"], size, "download", timeout)
    return {"upload": upload, "download": download}


# --- main ---------------------------------------------------------------------------------


def planned_targets(
    all_targets: list[Target],
    pinning: Pinning,
    settings: Settings,
    availability: dict[str, Availability],
) -> list[Target]:
    return [
        t
        for t in all_targets
        if availability[t.name].status == "available"
        and (settings.explicit_targets or settings.smoke or pinning in t.pinnings)
    ]


def estimate_seconds(plan: dict[Pinning, list[Target]], settings: Settings) -> int:
    per_target = settings.warmup + settings.runs * (settings.duration + 0.3)
    runs = sum(len(ts) for ts in plan.values()) * len(settings.connections) * per_target
    # The streaming check: a start, a stop and two transfers per proxy.
    stream = len(STREAM_TARGETS) * (6 + 2 * settings.stream_size / (200 * 2**20))
    return int(runs + 10 * len(plan) + (stream if settings.stream else 0))


def print_availability(targets: list[Target], availability: dict[str, Availability]) -> None:
    for target in targets:
        found = availability[target.name]
        detail = f"  ({found.detail})" if found.detail else ""
        print(f"  {target.name:18} {found.status:18} {target.title}{detail}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_cleanup()
    check_tools()
    prepare_run_dir()
    if args.at_commit:
        SidecarSource.snapshot(args.at_commit)
        log(f"sidecar code: {SidecarSource.label}, in {SidecarSource.directory}")
    if args.profile:
        import pyspy

        label = SidecarSource.label or working_tree_label()
        names = args.targets or ["passthrough"]
        if len(names) != 1:
            sys.exit("bench: --profile profiles one target at a time")
        files = write_backend_files(2**20)
        return pyspy.main(args.profile_seconds, args.port_base, files, label, names[0])
    settings = settings_from(args)
    if args.instructions:
        import instructions

        files = write_backend_files(2**20)
        return instructions.main(
            args.targets, args.port_base, args.instr_requests, settings.out, files
        )
    targets = select(args.targets, settings.smoke)
    ports = allocate_ports(targets, args.port_base)
    availability = check_availability(targets, ports)
    if args.list:
        print_availability(targets, availability)
        return 0
    plan = {p: planned_targets(targets, p, settings, availability) for p in settings.pinnings}
    log(
        f"targets: {len(targets)}; measurable now: "
        f"{sum(a.status == 'available' for a in availability.values())}"
    )
    print_availability(targets, availability)
    log(
        f"about {estimate_seconds(plan, settings) / 60:.1f} min: {settings.runs} x "
        f"{settings.duration}s runs after {settings.warmup}s warm-up, connections "
        f"{settings.connections}, {' + '.join(settings.pinnings)}"
    )
    files = write_backend_files(settings.stream_size)
    results: dict[str, Any] = {
        "meta": {**machine_info(), "settings": settings_json(settings)},
        "targets": [],
        "runs": [],
        "processes": {},
        "streaming": None,
    }
    budget = RetryBudget(settings.retry_budget)
    for pinning, phase_targets in plan.items():
        if not phase_targets:
            continue
        log(f"--- {pinning}: starting {len(phase_targets)} targets")
        with phase_services(pinning, phase_targets, ports, files, availability) as phase:
            records = run_phase(phase, phase_targets, settings, budget)
            results["runs"] += [r.to_json() for r in records]
            results["processes"][pinning] = process_facts(phase)
    results["meta"]["retry_seconds_used"] = settings.retry_budget - budget.left
    # After the phases: a target may have failed to start meanwhile.
    results["targets"] = [target_json(t, availability[t.name]) for t in targets]
    if settings.stream:
        results["streaming"] = streaming_check(ports, files, settings.stream_size)
    paths = report.write_all(results, settings.out)
    log("wrote " + ", ".join(str(p) for p in paths))
    print(report.headline(results))
    return smoke_verdict(results) if settings.smoke else 0


def settings_json(settings: Settings) -> dict[str, Any]:
    data = asdict(settings)
    data["out"] = str(settings.out)
    data["proxy_cpus"] = PROXY_CPUS
    data["load_cpus"] = LOAD_CPUS
    return data


def target_json(target: Target, found: Availability) -> dict[str, Any]:
    return {
        "name": target.name,
        "kind": target.kind,
        "title": target.title,
        "body": target.body,
        "method": target.method,
        "script": target.script,
        "policies": list(target.policies),
        "requires": target.requires,
        "state": target.state if target.kind == "sidecar" else None,
        "workers": target.workers,
        "access_log": target.access_log,
        "shipped_defaults": target.shipped_defaults,
        "status": found.status,
        "detail": found.detail,
    }


def smoke_verdict(results: dict[str, Any]) -> int:
    """Smoke mode fails (for CI) when a run served nothing or saw errors."""
    bad = [r for r in results["runs"] if r["requests"] == 0 or sum(r["errors"].values())]
    proxies = (results.get("streaming") or {}).get("proxies", {})
    bad_stream = [
        f"{name} {direction}"
        for name, result in proxies.items()
        for direction in ("upload", "download")
        if not result[direction]["complete"]
    ]
    if bad or bad_stream:
        print(
            f"SMOKE FAILED: {len(bad)} bad runs, streaming problems: {bad_stream}", file=sys.stderr
        )
        return 1
    print("smoke: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
