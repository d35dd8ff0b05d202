"""The benchmark harness still works: its seconds-long smoke mode runs end to end.

Not a performance test (no figure is asserted): it keeps bench/run from rotting. Everything
it needs (wrk, nginx, redis-server, valgrind, matplotlib...) is installed by scripts/test;
bench/run runs with BENCH_NO_INSTALL=1, so a missing tool fails here, by name, rather than
being installed from inside the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_RESULTS = ROOT / "bench/.work/smoke-results"


def test_bench_smoke_runs_every_reference_target() -> None:
    shutil.rmtree(SMOKE_RESULTS, ignore_errors=True)  # nothing left over from an earlier run
    result = subprocess.run(
        [str(ROOT / "bench" / "run"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_NO_INSTALL": "1"},
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    results = json.loads((SMOKE_RESULTS / "results.json").read_text())
    measured = {run["target"] for run in results["runs"]}
    assert {"direct", "nginx", "naive", "passthrough", "default"} <= measured
    assert all(run["requests"] > 0 for run in results["runs"])
    assert all(sum(run["errors"].values()) == 0 for run in results["runs"])
    # Every target's ratio against the naive proxy is worked out, and its aims are judged.
    pinned = {row["target"]: row for row in results["summary"] if row["pinning"] == "pinned"}
    assert pinned["passthrough"]["x_naive_cpu"] is not None
    assert pinned["default"]["x_naive_cpu"] is not None
    against_naive = [aim for aim in results["aims"] if "naive" in aim["aim"]]
    judged = [aim for aim in against_naive if not aim["aim"].startswith("every policy")]
    assert len(judged) == 2 and all(a["verdict"] in ("PASS", "MISS") for a in judged)
    # The every-policy target is not part of the smoke run: its aim says so, unjudged.
    assert [a["verdict"] for a in against_naive if a not in judged] == ["N/A"]
    # The streaming check went through both sidecar configs and the naive proxy, completely.
    streamed = results["streaming"]["proxies"]
    assert set(streamed) == {"passthrough", "default", "naive"}
    assert all(r[d]["complete"] for r in streamed.values() for d in ("upload", "download"))
    # matplotlib is there (the test extra): the chart is drawn, not skipped.
    assert (SMOKE_RESULTS / "results.png").stat().st_size > 0, output
