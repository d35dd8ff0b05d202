"""`server.workers: N`: a small supervisor running N sidecar processes on one port.

Each worker is a full sidecar binding the same listeners with SO_REUSEPORT, so the kernel
spreads connections across them. Metrics go through prometheus_client's multiprocess mode
(a directory shared by the workers, set before any of them imports prometheus_client), so
/metrics adds up every worker whichever one answers the scrape.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: unblock signals, and get SIGTERM if the supervisor dies
    (a SIGKILLed supervisor must not leave workers holding the port)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# A worker that keeps dying is a bug or a bad environment, not something to retry forever.
_MAX_RESTARTS = 5
_RESTART_WINDOW_SECONDS = 30.0


class Supervisor:
    def __init__(self, workers: int, config_path: str | None) -> None:
        self.workers = workers
        self.config_path = config_path
        self.metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self._restarts: list[float] = []

    def spawn(self, number: int) -> None:
        command = [sys.executable, "-m", "sidecar", "run"]
        if self.config_path:
            command += ["--config", self.config_path]
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env["SIDECAR_WORKER"] = str(number)
        # A SIGTERM arriving between the fork and the bookkeeping below would miss this
        # child: hold signals until it is registered.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
            self.children[process.pid] = number
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def forward(self, signum: int, frame: FrameType | None = None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            signum = signal.SIGTERM
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> int:
        for sig in _FORWARDED:
            signal.signal(sig, self.forward)
        for number in range(self.workers):
            self.spawn(number)
        exit_code = 0
        try:
            while self.children:
                pid, status = os.wait()
                worker = self.children.pop(pid, None)
                if worker is not None:
                    exit_code = max(exit_code, self._on_exit(pid, worker, status))
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return exit_code

    def _on_exit(self, pid: int, worker: int, status: int) -> int:
        """Restart a worker that died on its own; returns the exit code it implies."""
        code = os.waitstatus_to_exitcode(status)
        self._forget(pid)
        if self.stopping:
            return max(code, 0)
        if not self._may_restart():
            print(f"sidecar: worker {worker} keeps exiting; stopping", file=sys.stderr)
            self.forward(signal.SIGTERM)
            return 1
        print(f"sidecar: worker {worker} exited ({code}); restarting", file=sys.stderr)
        self.spawn(worker)
        return 0

    def _forget(self, pid: int) -> None:
        # Live gauges (in-flight requests) of a dead worker must stop counting.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_SECONDS]
        self._restarts.append(now)
        return len(self._restarts) <= _MAX_RESTARTS


def supervise(workers: int, config_path: str | None) -> int:
    return Supervisor(workers, config_path).run()
