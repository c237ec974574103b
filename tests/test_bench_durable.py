"""scripts/bench_durable.py, cut short: real peers with real journals, the table and the
targets printed, recovery measured after a real kill -9, nothing left running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench_durable.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_measures_durable_against_plain_flows() -> None:
    """One short cell per system: each row of the table has figures, and the durable/plain
    targets are judged (PASS or FAIL) from this run's own figures."""
    done = _run("--smoke", "--no-dbos", "--systems", "mesh,durable-normal")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        (line.split()[0], int(line.split()[1]))
        for line in done.stdout.splitlines()
        if line.split() and line.split()[0] in ("mesh", "durable-normal")
    }
    assert rows == {("mesh", 1), ("mesh", 32), ("durable-normal", 1), ("durable-normal", 32)}
    assert "durable-normal/mesh throughput, c=32" in done.stdout
    assert "errors 0" in done.stderr and "first error" not in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_recovery_is_timed_after_a_real_kill() -> None:
    """--recover: flows held in the last step, its peer killed with SIGKILL and restarted;
    the time to the first and the last resumed flow is printed."""
    done = _run("--recover", "20", "--no-dbos")
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("mesh"))
    assert "first resumed flow done" in line and " all " in line, done.stdout
