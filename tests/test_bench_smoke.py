"""The benchmark harness still works: its seconds-long smoke mode runs end to end.

Not a performance test (no figure is asserted): it keeps bench/run from rotting.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_runs_every_reference_target() -> None:
    result = subprocess.run(
        [str(ROOT / "bench" / "run"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((ROOT / "bench/.work/smoke-results/results.json").read_text())
    measured = {run["target"] for run in results["runs"]}
    assert {"direct", "nginx", "passthrough"} <= measured
    assert all(run["requests"] > 0 for run in results["runs"])
    assert all(sum(run["errors"].values()) == 0 for run in results["runs"])
