"""`bench/run --instructions`: CPU cost per request counted in instructions, not seconds.

On a shared or virtualised machine, CPU seconds per request drift by ±10-15 % between runs,
more than a 5 % budget (tracing's) can be judged by. Instructions do not drift: each target's
sidecar runs under valgrind's callgrind, serves a warm-up, has its counters zeroed, serves a
fixed number of keep-alive GETs from a minimal client, and the counters are dumped. The same
code path gives the same count to within ~1 %. Slow (valgrind runs Python ~50x slower), so
it measures a few GET targets, not the whole table. The naive aiohttp proxy
(bench/naive_proxy.py) is counted the same way, so the aims against it (pass-through
<= 0.7x, the default config <= 1.0x its CPU per request) can be read in instructions too.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from services import (
    REGISTRY,
    RUN_DIR,
    SidecarSource,
    allocate_ports,
    http_status,
    naive_argv,
    sidecar_config,
    start_backend,
    wait_until,
    write_sidecar_config,
)
from targets import NAIVE, Target, policy_fragments, select

REFERENCE = "passthrough"
DEFAULT_TARGETS = [REFERENCE, NAIVE, "tracing"]
# The aims against the naive proxy (bench/report.py has the same, for CPU seconds).
NAIVE_AIMS = {"passthrough": 0.7, "default": 1.0}
# The backend's 100-byte answer; the organisation is the one every benchmark request names
# (bench/wrk/report.lua), so a quota target counts an admitted request, not a 401.
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Org-Id: bench-org\r\n\r\n"


def keep_alive_gets(port: int, count: int) -> None:
    """`count` sequential GETs on one connection, each read to its end (Content-Length)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        buffer = b""
        for _ in range(count):
            conn.sendall(REQUEST)
            while True:
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if sep:
                    if not head.startswith(b"HTTP/1.1 200 "):
                        raise SystemExit(f"instructions: not a 200: {head[:200]!r}")
                    length = _content_length(head)
                    if len(rest) >= length:
                        buffer = rest[length:]
                        break
                chunk = conn.recv(65536)
                if not chunk:
                    raise SystemExit("instructions: the sidecar closed the connection")
                buffer += chunk


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise SystemExit(f"instructions: no Content-Length in {head[:200]!r}")


def count_target(target: Target, ports: Any, fragments: Any, warmup: int, requests: int) -> int:
    """Instructions the target's proxy (a sidecar, or the naive proxy) spent on `requests`
    requests."""
    port, admin = ports.proxies[target.name]
    out = RUN_DIR / "callgrind" / f"{target.name}.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{target.name}.out*"):
        old.unlink()
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    log = RUN_DIR / "logs" / f"callgrind-{target.name}.log"
    if target.kind == "naive":
        argv = [*valgrind, *naive_argv(port, ports.backend)]
        started = REGISTRY.start(f"callgrind-{target.name}", argv, cpus=None, log=log)
        # No admin port: ready once a GET through it is answered.
        ready_port, ready_path = port, "/"
    else:
        path = write_sidecar_config(target.name, sidecar_config(target, ports, fragments))
        argv = [*valgrind, sys.executable, "-m", "sidecar", "run", "--config", str(path)]
        started = REGISTRY.start(
            f"callgrind-{target.name}",
            argv,
            cpus=None,
            log=log,
            env=SidecarSource.env(),
            cwd=SidecarSource.directory,
        )
        ready_port, ready_path = admin, "/live"
    try:
        wait_until(
            lambda: http_status(ready_port, ready_path, timeout=10.0) == 200,
            started,
            f"{target.name} under valgrind",
        )
        keep_alive_gets(port, warmup)
        subprocess.run(
            ["callgrind_control", "-z", str(started.pid)], check=True, capture_output=True
        )
        keep_alive_gets(port, requests)
        subprocess.run(
            ["callgrind_control", "-d", str(started.pid)], check=True, capture_output=True
        )
        dumped = _wait_for_dump(out)
    finally:
        REGISTRY.stop(started)
    return dumped


def _wait_for_dump(out: Path, timeout: float = 60.0) -> int:
    """The event count of the dump written after the zeroing (`<out>.1`)."""
    dump = Path(f"{out}.1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dump.exists():
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("summary:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise SystemExit(f"instructions: no callgrind dump at {dump}")


def main(names: list[str] | None, port_base: int, requests: int, out_dir: Path, files: Path) -> int:
    targets = [
        t for t in select(names or DEFAULT_TARGETS, smoke=False) if t.kind in ("sidecar", "naive")
    ]
    if REFERENCE not in [t.name for t in targets]:
        targets.insert(0, next(t for t in select([REFERENCE], smoke=False)))
    unsupported = [
        t.name for t in targets if t.script != "get" or t.state == "redis" or t.body != "100B"
    ]
    if unsupported:
        raise SystemExit(
            f"instructions: GET targets with 100-byte bodies on the memory store only, "
            f"not {unsupported}"
        )
    ports = allocate_ports(targets, port_base)
    fragments = policy_fragments()
    backend = start_backend(ports.backend, files, None)
    results: dict[str, float] = {}
    try:
        for target in targets:
            total = count_target(target, ports, fragments, warmup=300, requests=requests)
            results[target.name] = total / requests
            print(f"instructions: {target.name}: {total / requests:,.0f} per request", flush=True)
    finally:
        REGISTRY.stop(backend)
    return _report(results, requests, out_dir)


def _report(per_request: dict[str, float], requests: int, out_dir: Path) -> int:
    reference = per_request[REFERENCE]
    naive = per_request.get(NAIVE)
    naive_column = f" \u00d7 {NAIVE} |" if naive else ""
    lines = [
        "# Instructions per request",
        "",
        f"Counted with valgrind's callgrind: {requests} keep-alive GETs per target after a"
        " 300-request warm-up, 100-byte backend responses, memory store. Repeatable to ~1 %,",
        "so differences of a few percent are real (unlike CPU seconds on a shared machine).",
        "`naive` is the naive aiohttp proxy (bench/naive_proxy.py) counted the same way.",
        "",
        f"| target | instructions per request | \u00d7 {REFERENCE} |{naive_column}",
        "|---|---|---|" + ("---|" if naive else ""),
    ]
    for name, count in per_request.items():
        line = f"| `{name}` | {count:,.0f} | {count / reference:.3f} |"
        if naive:
            line += f" {count / naive:.3f} |"
        lines.append(line)
    verdicts = {}
    if naive:
        judged = [(n, limit) for n, limit in NAIVE_AIMS.items() if n in per_request]
        if judged:
            lines += ["", "The aims against the naive proxy, read in instructions:", ""]
        for name, limit in judged:
            ratio = per_request[name] / naive
            verdict = "PASS" if ratio <= limit else "MISS"
            verdicts[name] = {"ratio": round(ratio, 3), "limit": limit, "verdict": verdict}
            lines.append(f"- `{name}` <= {limit:g}\u00d7 naive: {ratio:.3f}\u00d7, **{verdict}**")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "instructions.md").write_text("\n".join(lines) + "\n")
    (out_dir / "instructions.json").write_text(
        json.dumps(
            {"requests": requests, "per_request": per_request, "vs_naive": verdicts}, indent=2
        )
        + "\n"
    )
    print("\n".join(lines))
    return 0
