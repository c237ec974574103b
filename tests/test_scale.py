"""scripts/scale.py, small: many flows in flight at once through a 4-machine chain."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from support.cli import mesh_env
from support.processes import alive

SCALE = Path(__file__).resolve().parent.parent / "scripts" / "scale.py"


def test_scale_holds_every_flow_in_flight_and_refuses_none(tmp_path: Path) -> None:
    """500 flows started at once, each asleep 2 s in the last machine's async step: the
    script reports every flow finished, none refused or failed, all 500 in the chain
    together, every target met, and its four peers stopped."""
    done = subprocess.run(
        [sys.executable, str(SCALE), "--flows", "500", "--seconds", "2"],
        capture_output=True,
        text=True,
        env=mesh_env(),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-2000:]
    assert "flows finished   : 500 of 500" in out
    assert "refused / failed : 0 / 0" in out
    assert "in the chain     : 500 flows at once" in out
    assert "FAIL" not in out
    assert out.count("PASS") == 5
    threads = re.search(r"threads per peer : m0 (\d+), m1 (\d+), m2 (\d+), m3 (\d+)", out)
    assert threads is not None and all(int(n) > 0 for n in threads.groups()), out
    pids = [int(pid) for pid in re.findall(r"m\d (\d+)", out.split("peer pids", 1)[1])]
    assert len(pids) == 4 and not [pid for pid in pids if alive(pid)]
