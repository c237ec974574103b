"""scripts/bench.py end to end, cut short: real peers, figures in the JSON, nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import alive

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_measures_mesh_and_raw_and_stops_every_process(tmp_path: Path) -> None:
    """A tiny run measures the mesh (sync and async handlers), raw and raw-stream, prints
    the table, which driver each system uses and the targets (the async variant's ratio
    beside each), writes the JSON, and leaves no process."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--no-celery",
            "--concurrency",
            "1,32",
            "--repeats",
            "1",
            "--seconds",
            "0.3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    for system in ("mesh", "mesh-async", "raw", "raw-stream"):
        for n in (4, 8):
            for c in (1, 32):
                (cell,) = [
                    x
                    for x in results["cells"]
                    if x["system"] == system and x["n"] == n and x["c"] == c
                ]
                assert cell["count"] > 0 and cell["errors"] == 0, cell
                assert cell["p50_ms"] > 0 and cell["peer_cpu_ms_per_flow"] > 0
    # The reply path of a mesh flow (last step's end to the result) is a part of its time.
    for n in (4, 8):
        (cell,) = [x for x in results["cells"] if (x["system"], x["n"], x["c"]) == ("mesh", n, 1)]
        assert 0 < cell["reply_path_ms"] < cell["p50_ms"] * 3, cell
    out = proc.stdout
    assert "reply path, mesh, N=4, one flow at a time: " in out
    assert "connect_async" in results["drivers"]["mesh"]
    assert "start_async_with" in results["drivers"]["mesh"]
    assert "one stream" in results["drivers"]["raw-stream"]
    assert "  raw-stream asyncio, flows multiplexed by id over one stream" in out
    for target in (
        "mesh/raw throughput at c=32, N=4",
        "mesh/raw sequential p50 latency, N=8",
        "mesh/raw peers' CPU per flow at c=32, N=4",
        "mesh/raw-stream throughput at c=32, N=8",
        "mesh/raw-stream sequential p50 latency, N=4",
    ):
        (line,) = [x for x in out.splitlines() if f"  {target}: " in x]
        assert line.startswith(("  PASS", "  FAIL")) and "[mesh-async: " in line, line
    assert {t["label"] for t in results["summary"]["targets"]} >= {
        "mesh/raw throughput at c=32, N=4",
        "mesh/raw-stream sequential p50 latency, N=8",
    }
    assert "per-hop marginal cost, raw-stream" in out
    assert "the mesh's own work" in out
    assert len(results["hop_in_process_us"]["mesh_us"]) == len(results["events"]["with_ns"])
    for system in ("mesh", "mesh-async", "raw", "raw-stream"):
        assert len(results["pids"][system]) == 8
    assert [pid for pid in results["pids"]["all"] if alive(pid)] == []
