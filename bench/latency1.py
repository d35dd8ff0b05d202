"""Added latency at ONE keep-alive connection, small and fast (not part of bench/run).

    .venv/bin/python bench/latency1.py                       # every target, 2000 requests each
    .venv/bin/python bench/latency1.py --targets passthrough,all-redis --requests 5000

Starts a tiny backend (a raw asyncio protocol answering a fixed 100-byte body, uvloop, so
its own cost and jitter are small), Redis when a target needs it, and one proxy at a time:
the naive aiohttp proxy (bench/naive_proxy.py) or the sidecar with the config bench/run
generates for that target (bench/templates/sidecar.yaml plus bench/policies.yaml). A
sequential client on one keep-alive connection (raw socket, TCP_NODELAY, each request sent
in one send()) times every request with perf_counter_ns; the requests are those of
bench/wrk/ (GET, or a POST of the ~100-byte JSON body with a fresh Idempotency-Key, with
X-Org-Id/X-User-Id). The same request is timed against the backend directly, interleaved
with the proxied runs (direct, A, direct, B, ...), so each target is compared with the
direct figure of its own moment. Prints p50/p90/p99 and the added p50/p99 over direct.

`--strace` runs the sidecar under `strace -f -tt -T` for its timed requests and prints the
syscalls of a few requests (every send/recv/write, setsockopt, epoll_wait) to see where a
request waits. Everything it starts is stopped by PID at the end; ports are picked free.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from services import deep_merge

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BODY = b'{"status":"ok","service":"bench-backend","padding":"' + b"x" * 45 + b'"}\n'
POST_BODY = (
    b'{"order":"bench","items":[{"sku":"A-1","qty":1},{"sku":"B-2","qty":2}],"note":"benchmark"}'
)
# What --strace records: the network and write calls, the loop's waits, socket options.
STRACE_CALLS = (
    "trace=read,write,writev,sendto,recvfrom,sendmsg,recvmsg,"
    "epoll_pwait,epoll_wait,setsockopt,futex"
)
# target: (policies, state, POST with fresh key?)
TARGETS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "naive": ((), "memory", False),
    "naive-post": ((), "memory", True),
    "passthrough": ((), "memory", False),
    "passthrough-post": ((), "memory", True),
    "all-memory": (("tracing", "quota", "breaker", "idempotency"), "memory", True),
    "all-redis": (("tracing", "quota", "breaker", "idempotency"), "redis", True),
}


# --- the backend ---------------------------------------------------------------------------


class Backend(asyncio.Protocol):
    """HTTP/1.1 keep-alive, fixed answer; reads Content-Length bodies. Enough for proxies."""

    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(BODY)).encode()
        + b"\r\n\r\n"
        + BODY
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                length = int(head[at + 17 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self.ANSWER)


def serve_backend(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Backend, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


@contextlib.contextmanager
def started(
    argv: list[str], port: int, what: str, log: Path, cwd: Path = REPO
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        wait_port(port, proc, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sidecar_config(policies: tuple[str, ...], state_url: str, ports: dict[str, int]) -> str:
    """The config bench/services.py generates for such a target."""
    text = (BENCH_DIR / "templates" / "sidecar.yaml").read_text()
    for token, value in {
        "PORT": ports["proxy"],
        "ADMIN_PORT": ports["admin"],
        "BACKEND_PORT": ports["backend"],
        "STATE_URL": state_url,
    }.items():
        text = text.replace(f"@{token}@", str(value))
    config = yaml.safe_load(text)
    fragments = yaml.safe_load((BENCH_DIR / "policies.yaml").read_text())
    chosen = [f for name, f in fragments.get("disable", {}).items() if name not in policies]
    chosen += [fragments["enable"][name] for name in policies]
    for fragment in chosen:
        config = deep_merge(config, fragment.get("config", {}))
        config["routes"][0] = deep_merge(config["routes"][0], fragment.get("route", {}))
    return yaml.safe_dump(config, sort_keys=False)


# --- the client -----------------------------------------------------------------------------


def request_bytes(port: int, post: bool, nonce: str, n: int) -> bytes:
    head = [
        f"{'POST' if post else 'GET'} / HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "X-Org-Id: bench-org",
        "X-User-Id: bench-user",
    ]
    if post:
        head += [
            "Content-Type: application/json",
            f"Content-Length: {len(POST_BODY)}",
            f"Idempotency-Key: {nonce}-{n}",
        ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (POST_BODY if post else b"")


def read_response(sock: socket.socket, buffer: bytearray) -> None:
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).lower()
            if not head.startswith(b"http/1.1 200"):
                raise SystemExit(f"not a 200: {head[:200]!r}")
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                raise SystemExit(f"no content-length: {head!r}")
            length = int(head[at + 17 :].split(b"\r\n", 1)[0])
            if len(buffer) >= end + 4 + length:
                del buffer[: end + 4 + length]
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed")
        buffer += chunk


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of these processes and their threads, in seconds."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def measure(
    port: int, post: bool, requests: int, warmup: int, pids: list[int] | None = None
) -> tuple[list[float], tuple[float, float]]:
    """Latencies in ms of `requests` sequential requests on one keep-alive connection, and
    the CPU µs per request of `pids` over them."""
    nonce = f"{os.getpid()}-{time.time_ns()}"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    out: list[float] = []
    cpu0 = (0.0, 0.0)
    try:
        for n in range(warmup + requests):
            if n == warmup:
                cpu0 = cpu_seconds(pids or [])
            data = request_bytes(port, post, nonce, n)
            t0 = time.perf_counter_ns()
            sock.sendall(data)
            read_response(sock, buffer)
            if n >= warmup:
                out.append((time.perf_counter_ns() - t0) / 1e6)
        cpu1 = cpu_seconds(pids or [])
        cpu = ((cpu1[0] - cpu0[0]) / requests * 1e6, (cpu1[1] - cpu0[1]) / requests * 1e6)
    finally:
        sock.close()
    return out, cpu


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def line(
    name: str, values: list[float], direct: list[float] | None, cpu: tuple[float, float] = (0, 0)
) -> str:
    p50, p90, p99 = pct(values, 50), pct(values, 90), pct(values, 99)
    mean = statistics.mean(values)
    text = f"{name:18} p50 {p50:7.3f}  p90 {p90:7.3f}  p99 {p99:7.3f}  mean {mean:7.3f}"
    if direct:
        text += f"   added p50 {p50 - pct(direct, 50):+7.3f}  p99 {p99 - pct(direct, 99):+7.3f}"
    if cpu[0] or cpu[1]:
        text += f"   cpu {sum(cpu):4.0f} µs/req ({cpu[0]:.0f} user {cpu[1]:.0f} sys)"
    return text


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--strace", action="store_true", help="sidecar under strace")
    parser.add_argument(
        "--source",
        type=Path,
        default=REPO,
        help="directory holding the sidecar/ package to run (git archive REV sidecar | tar x)",
    )
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend_port:
        serve_backend(args.backend_port)
        return
    names = [n for n in args.targets.split(",") if n]
    for name in names:
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name}; one of {', '.join(TARGETS)}")
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="latency1-"))
    ports = {"backend": free_port(), "redis": free_port()}
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            started(
                [python, __file__, "--backend-port", str(ports["backend"])],
                ports["backend"],
                "backend",
                work / "backend.log",
            )
        )
        if any(TARGETS[n][1] == "redis" for n in names):
            stack.enter_context(
                started(
                    [
                        *("redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"])),
                        *("--save", "", "--appendonly", "no", "--dir", str(work)),
                    ],
                    ports["redis"],
                    "redis",
                    work / "redis.log",
                )
            )
        print(
            f"{args.requests} sequential requests on 1 keep-alive connection (ms); logs in {work}"
        )
        for name in names:
            policies, state, post = TARGETS[name]
            direct, _ = measure(ports["backend"], post, args.requests, args.warmup)
            print(line("direct-post" if post else "direct", direct, None))
            ports["proxy"], ports["admin"] = free_port(), free_port()
            if name.startswith("naive"):
                argv = [python, str(BENCH_DIR / "naive_proxy.py"), "--port", str(ports["proxy"])]
                argv += ["--upstream", f"http://127.0.0.1:{ports['backend']}"]
            else:
                state_url = (
                    f"redis://127.0.0.1:{ports['redis']}/0" if state == "redis" else "memory://"
                )
                config = work / f"{name}.yaml"
                config.write_text(sidecar_config(policies, state_url, ports))
                argv = argv_sidecar = [python, "-m", "sidecar", "run", "--config", str(config)]
                if args.strace:
                    trace = work / f"{name}.strace"
                    argv = ["strace", "-f", "-tt", "-T", "-e", STRACE_CALLS, "-o", str(trace)]
                    argv += [*argv_sidecar]
            cwd = REPO if name.startswith("naive") else args.source
            with started(argv, ports["proxy"], name, work / f"{name}.log", cwd) as proc:
                pids = [proc.pid]
                if args.strace:  # strace's child, the sidecar
                    with contextlib.suppress(OSError):
                        pids = [
                            int(c)
                            for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                            .read_text()
                            .split()
                        ]
                values, cpu = measure(ports["proxy"], post, args.requests, args.warmup, pids)
                if args.strace:  # strace detaches on SIGTERM: stop the sidecar itself
                    for pid in pids:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGTERM)
                    proc.wait(10)
            print(line(name, values, direct, cpu))


if __name__ == "__main__":
    main()
