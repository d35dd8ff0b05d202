"""Starting and stopping what the benchmark runs: nginx (backend and proxy), Redis, sidecars
and the naive aiohttp proxy.

Every process is started here, in a session of its own (so a Ctrl-C in the terminal reaches
only the harness, which then stops things in order), and recorded in one registry with the
PIDs of its children. `ProcessRegistry.stop_all` stops exactly those PIDs: SIGTERM, a short
wait, then SIGKILL; a child is killed only if its start time still matches the one recorded,
so a reused PID is never hit. The harness calls it from `finally`, `atexit` and its signal
handlers, so nothing outlives a run, even a failed or interrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from targets import BENCH_DIR, STREAM_TARGETS, Target

REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
# What one run writes (generated configs, process logs, nginx and Redis directories, the
# backend's files, wrk scripts) goes to a directory of its own, bench/.work/runs/PID, so two
# runs at once (a smoke test in someone's test suite during a full run) never delete or
# truncate each other's files. bench/.work/last points at the newest.
RUNS_DIR = WORK_DIR / "runs"
RUN_DIR = RUNS_DIR / str(os.getpid())
TEMPLATES = BENCH_DIR / "templates"
SMALL_BODY_BYTES = 100
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 8.0


class SidecarSource:
    """Which sidecar code runs: the working tree (default), or a snapshot of one commit.

    Others edit the working tree while a run goes on; a snapshot (`git archive`, which
    changes nothing in the repository) keeps a run on one known revision. The sidecar runs
    with the snapshot first on sys.path (`python -m` puts the working directory there).
    """

    directory: Path = REPO_DIR
    label: str = ""

    @classmethod
    def snapshot(cls, revision: str) -> None:
        commit = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", f"{revision}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        target = WORK_DIR / f"src-{commit}"
        if not (target / "sidecar" / "__init__.py").exists():
            target.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(REPO_DIR), "archive", "--format=tar", commit, "sidecar"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        cls.directory = target
        cls.label = f"{commit} (git archive snapshot)"

    @classmethod
    def env(cls) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SIDECAR_CONFIG", "SIDECAR_WORKER")}
        if cls.directory != REPO_DIR:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(cls.directory), env.get("PYTHONPATH", "")) if p
            )
        return env


def prepare_run_dir() -> None:
    """This run's directory, fresh; those of runs that have ended are removed."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    for entry in RUNS_DIR.iterdir():
        if entry != RUN_DIR and not _harness_alive(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    for sub in ("logs", "conf", "wrk"):
        (RUN_DIR / sub).mkdir(parents=True)
    RUN_DIR.chmod(0o755)  # nginx workers (an unprivileged user when run as root) read below
    last = WORK_DIR / "last"
    fresh = WORK_DIR / f".last-{os.getpid()}"
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(RUN_DIR.relative_to(WORK_DIR))
    os.replace(fresh, last)


def _harness_alive(name: str) -> bool:
    """Whether the run that made runs/NAME is still going (its PID runs bench's harness)."""
    if not name.isdigit():
        return False
    try:
        cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
    except OSError:
        return False
    return b"harness.py" in cmdline


# --- processes ----------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat(5)


def descendants(root: int) -> list[int]:
    """Every live process below `root`, found by walking parent PIDs in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    queue = [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@dataclass
class Started:
    """One process the harness started, with the children it had once it was ready."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # pid -> start time of every child seen so far (stopped by PID, identity checked).
    children: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def refresh_children(self) -> None:
        for pid in descendants(self.pid):
            started = start_time(pid)
            if started is not None:
                self.children.setdefault(pid, started)

    def pids(self) -> list[int]:
        """The main process and its children that are still alive (and still ours)."""
        alive = [pid for pid, st in self.children.items() if start_time(pid) == st]
        return [self.pid, *alive]

    def alive(self) -> bool:
        return self.popen.poll() is None


class ProcessRegistry:
    """Everything started by this harness, stopped by PID in reverse start order."""

    def __init__(self) -> None:
        self._started: list[Started] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpus: str | None,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO_DIR,
    ) -> Started:
        # taskset execs the command, so the PID we get is the process itself.
        command = ["taskset", "-c", cpus, *argv] if cpus else argv
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        started = Started(name, popen, log)
        self._started.append(started)
        return started

    def stop(self, started: Started) -> None:
        started.refresh_children()
        if started.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(started.pid, signal.SIGTERM)
            try:
                started.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started.pid, signal.SIGKILL)
                started.popen.wait(STOP_TIMEOUT)
        # Children normally exit with their parent; any left over are killed by PID.
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid, st in started.children.items():
            while start_time(pid) == st and time.monotonic() < deadline:
                time.sleep(0.05)
            if start_time(pid) == st:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if started in self._started:
            self._started.remove(started)

    def stop_all(self) -> None:
        for started in reversed(list(self._started)):
            try:
                self.stop(started)
            except Exception as exc:  # keep stopping the rest whatever happens
                print(
                    f"bench: could not stop {started.name} ({started.pid}): {exc}", file=sys.stderr
                )


REGISTRY = ProcessRegistry()


# --- ports and readiness ------------------------------------------------------------------


def free_ports(count: int, base: int, taken: frozenset[int] = frozenset()) -> list[int]:
    """`count` ports from `base` upwards that nothing listens on right now (127.0.0.1) and
    that are not in `taken`."""
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port > 65000:
            raise SystemExit(f"no {count} free ports above {base}")
        if port in taken:
            port += 1
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                ports.append(port)
            except OSError:
                pass
        port += 1
    return ports


def http_status(port: int, path: str = "/", timeout: float = 2.0) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        # As every benchmark request does (bench/wrk/report.lua): a quota target refuses
        # requests naming no organisation.
        conn.request("GET", path, headers={"X-Org-Id": "bench-org"})
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def wait_until(ready: Any, started: Started, what: str) -> None:
    """Poll `ready()` until true; fail early, with the log tail, if the process died."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not started.alive():
            code = started.popen.returncode
            raise RuntimeError(f"{what} exited with {code}:\n{tail(started.log)}")
        if ready():
            started.refresh_children()
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {STARTUP_TIMEOUT:.0f}s:\n{tail(started.log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- templates ----------------------------------------------------------------------------


def render(template: str, tokens: dict[str, str]) -> str:
    """Fill @NAME@ tokens (nginx configs are full of $ and {}, so no str.format)."""
    text = (TEMPLATES / template).read_text()
    for name, value in tokens.items():
        text = text.replace(f"@{name}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"{template}: unfilled tokens {sorted(set(leftover))}")
    return text


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class Ports:
    backend: int
    redis: int
    # target name -> (proxy port, admin port); the admin port is unused by nginx and naive.
    proxies: dict[str, tuple[int, int]]
    # The same for the proxies of the streaming check (STREAM_TARGETS), one pair each.
    stream: dict[str, tuple[int, int]]


def claim_ports(count: int, base: int) -> list[int]:
    """Free ports no other run still going has claimed, claimed for this one.

    A port is free when checked but bound only later, when its process starts; a second
    run checking meanwhile would pick it too. So each run records its ports in
    runs/PID/ports.json, under a lock, and skips those of the others that are alive.
    """
    with (WORK_DIR / "ports.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken: set[int] = set()
        for claims in RUNS_DIR.glob("*/ports.json"):
            if claims.parent != RUN_DIR and _harness_alive(claims.parent.name):
                with contextlib.suppress(OSError, ValueError):
                    taken.update(json.loads(claims.read_text()))
        ports = free_ports(count, base, frozenset(taken))
        (RUN_DIR / "ports.json").write_text(json.dumps(ports))
    return ports


def allocate_ports(targets: list[Target], base: int) -> Ports:
    proxied = [t for t in targets if t.kind != "direct"]
    ports = iter(claim_ports(2 + 2 * (len(proxied) + len(STREAM_TARGETS)), base))
    backend, redis = next(ports), next(ports)
    proxies = {t.name: (next(ports), next(ports)) for t in proxied}
    stream = {name: (next(ports), next(ports)) for name in STREAM_TARGETS}
    return Ports(backend, redis, proxies, stream)


def sidecar_config(
    target: Target,
    ports: Ports,
    fragments: dict[str, dict[str, Any]],
    *,
    listen: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The generated sidecar config of one target: the base template, then the `disable:`
    fragments of the policies it does not measure (none for a target with the shipped
    defaults) and the `enable:` ones of those it does."""
    port, admin = listen or ports.proxies[target.name]
    state_url = f"redis://127.0.0.1:{ports.redis}/0" if target.state == "redis" else "memory://"
    config = yaml.safe_load(
        render(
            "sidecar.yaml",
            {
                "PORT": str(port),
                "ADMIN_PORT": str(admin),
                "BACKEND_PORT": str(ports.backend),
                "STATE_URL": state_url,
            },
        )
    )
    config["server"]["workers"] = target.workers
    config["logging"]["access"]["enabled"] = target.access_log
    chosen = [
        fragments.get("disable", {})[name]
        for name in fragments.get("disable", {})
        if name not in target.policies and not target.shipped_defaults
    ]
    for name in target.policies:
        if name not in fragments.get("enable", {}):
            raise SystemExit(f"target {target.name}: no enable.{name} in bench/policies.yaml")
        chosen.append(fragments["enable"][name])
    for fragment in chosen:
        config = deep_merge(config, fragment.get("config", {}))
        config["routes"][0] = deep_merge(config["routes"][0], fragment.get("route", {}))
    return deep_merge(config, target.extra_config)


def write_sidecar_config(name: str, config: dict[str, Any]) -> Path:
    path = RUN_DIR / "conf" / f"sidecar-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Generated by bench/run for one benchmark target; edits are overwritten.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def check_config(path: Path) -> tuple[bool, str]:
    """`sidecar check-config`: (accepted, first complaint or '')."""
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=SidecarSource.directory,
        env=SidecarSource.env(),
        timeout=60,
    )
    if done.returncode == 0:
        return True, ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    if not lines:
        return False, f"exit {done.returncode}"
    # "FILE:LINE: routes[0].quota: unknown key 'quota'; expected one of: ..." -> the middle.
    first = lines[0].removeprefix(f"{path}:").partition(": ")[2] or lines[0]
    return False, first.split("; expected one of")[0]


# --- the services -------------------------------------------------------------------------


def _nginx_dir(name: str) -> Path:
    directory = RUN_DIR / f"nginx-{name}"
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi", "upload", "upload_tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        # nginx workers run as an unprivileged user when started as root.
        (directory / sub).chmod(0o777)
    return directory


def start_nginx(
    name: str, template: str, tokens: dict[str, str], port: int, cpus: str | None
) -> Started:
    directory = _nginx_dir(name)
    conf = directory / "nginx.conf"
    conf.write_text(render(template, {"DIR": str(directory), "PORT": str(port), **tokens}))
    started = REGISTRY.start(
        f"nginx-{name}",
        ["nginx", "-p", str(directory), "-c", str(conf)],
        cpus=cpus,
        log=RUN_DIR / "logs" / f"nginx-{name}.log",
    )
    wait_until(lambda: http_status(port) == 200, started, f"nginx ({name})")
    return started


def small_body() -> str:
    """The backend's ~100-byte answer (nginx turns the trailing \\n into a newline)."""
    head = '{"status":"ok","service":"bench-backend","padding":"'
    tail = '"}'
    return head + "x" * (SMALL_BODY_BYTES - 1 - len(head) - len(tail)) + tail + "\\n"


def start_backend(port: int, files: Path, cpus: str | None) -> Started:
    """The backend nginx: the small body, the 16 KiB / 1 MiB / big files, the upload sink."""
    tokens = {"SMALL_BODY": small_body(), "FILES": str(files)}
    return start_nginx("backend", "nginx-backend.conf", tokens, port, cpus)


def start_redis(port: int, cpus: str | None) -> Started:
    directory = RUN_DIR / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--daemonize",
        "no",
    ]
    started = REGISTRY.start("redis", argv, cpus=cpus, log=RUN_DIR / "logs" / "redis.log")
    wait_until(lambda: redis_ping(port), started, "redis-server")
    return started


def start_sidecar(
    name: str, config_path: Path, port: int, admin: int, workers: int, cpus: str | None
) -> Started:
    log = RUN_DIR / "logs" / f"sidecar-{name}.log"
    argv = [sys.executable, "-m", "sidecar", "run", "--config", str(config_path)]
    started = REGISTRY.start(
        f"sidecar-{name}",
        argv,
        cpus=cpus,
        log=log,
        env=SidecarSource.env(),
        cwd=SidecarSource.directory,
    )

    def ready() -> bool:
        # Every worker logs sidecar.started once its listeners are bound.
        try:
            count = log.read_text(errors="replace").count('"event":"sidecar.started"')
        except OSError:
            return False
        return count >= workers and http_status(port) == 200

    wait_until(ready, started, f"sidecar ({name})")
    return started


NAIVE_PROXY = BENCH_DIR / "naive_proxy.py"


def naive_argv(port: int, backend_port: int) -> list[str]:
    """The naive aiohttp proxy's command line (the venv's python: the sidecar's aiohttp)."""
    return [
        sys.executable,
        str(NAIVE_PROXY),
        "--port",
        str(port),
        "--upstream",
        f"http://127.0.0.1:{backend_port}",
    ]


def start_naive(name: str, port: int, backend_port: int, cpus: str | None) -> Started:
    """bench/naive_proxy.py in front of the backend; ready once a GET through it answers."""
    started = REGISTRY.start(
        f"naive-{name}",
        naive_argv(port, backend_port),
        cpus=cpus,
        log=RUN_DIR / "logs" / f"naive-{name}.log",
        cwd=BENCH_DIR,
    )
    wait_until(lambda: http_status(port) == 200, started, f"naive proxy ({name})")
    return started


# --- Redis (a raw RESP client: the harness needs two commands, not a library) --------------


def redis_command(port: int, *args: str) -> bytes:
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                size, _, rest = data[1:].partition(b"\r\n")
                if int(size) < 0 or len(rest) >= int(size) + 2:
                    return rest[: max(int(size), 0)]
            elif data.endswith(b"\r\n"):
                return data
    return data


def redis_ping(port: int) -> bool:
    try:
        return redis_command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


# Top-level script invocations: one per store operation the sidecar sends.
SCRIPT_COMMANDS = frozenset({"cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro"})


def redis_total_calls(port: int) -> tuple[int, int]:
    """(commands, scripts) Redis has executed, from INFO commandstats, without our own INFOs.

    Commands include those a Lua script runs inside Redis (HGET, PEXPIRE...): the work.
    Scripts count EVALSHA/EVAL calls: the store operations the sidecar sent.
    """
    total = scripts = 0
    for line in redis_command(port, "INFO", "commandstats").decode().splitlines():
        name, _, stats = line.partition(":")
        if not name.startswith("cmdstat_") or name == "cmdstat_info":
            continue
        for item in stats.split(","):
            key, _, value = item.partition("=")
            if key == "calls":
                total += int(value)
                if name in SCRIPT_COMMANDS:
                    scripts += int(value)
    return total, scripts


# Store operations the sidecar sends after the response, in the background (an idempotency
# outcome, a refund, a lease renewal, a breaker's count flush): off the latency path. Every
# other operation counts as one a request waits for, so a new script is counted until it is
# named here.
OFF_PATH_OPERATIONS = frozenset(
    {
        "idempotency_finish",
        "idempotency_release",
        "idempotency_renew",
        "quota_refund",
        "breaker_sync",
    }
)
_STORE_COUNT = "sidecar_store_request_duration_seconds_count{"


def sidecar_latency_path_operations(admin_port: int) -> int:
    """Store operations a sidecar has sent that requests wait for, from its own /metrics.

    A batch ("a+b") counts once, as one round trip, unless all of its scripts are off-path.
    """
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0
    for line in text.splitlines():
        if not line.startswith(_STORE_COUNT):
            continue
        labels, _, value = line[len(_STORE_COUNT) :].partition("} ")
        operation = labels.partition('operation="')[2].partition('"')[0]
        if operation != "ping" and not set(operation.split("+")) <= OFF_PATH_OPERATIONS:
            total += int(float(value))
    return total


@contextlib.contextmanager
def running(started: Started) -> Iterator[Started]:
    try:
        yield started
    finally:
        REGISTRY.stop(started)
