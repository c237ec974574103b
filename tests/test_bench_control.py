"""scripts/bench_control.py cut short: real peers, both figures printed, nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench_control.py"


@pytest.mark.timeout(120)
def test_bench_control_smoke(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "speed-up" in done.stdout and "(target >= 2x)" in done.stdout
    assert "(target <= 1.05x)" in done.stdout
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["items"] == 12
    assert figures["fan_speedup"] > 1.0  # 12 sleeps of 5 ms, spread, beat them in a row
    assert figures["condition_cost"] > 0
