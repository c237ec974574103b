"""scripts/soak.py, short: 1,000 flows through a mesh with a replicated machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import mesh_env

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


@pytest.mark.slow
def test_short_soak_runs_every_step_exactly_once(tmp_path: Path) -> None:
    """1,000 flows at concurrency 32: no step recorded twice, none missing, none failed."""
    done = subprocess.run(
        [sys.executable, str(SOAK), "--flows", "1000", "--concurrency", "32"],
        capture_output=True,
        text=True,
        env=mesh_env(),
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "exactly once    : ok" in out
    assert "nothing missing : ok" in out
    assert "failures        : 0 " in out
    assert "steps recorded  : 3600 " in out  # 3 handler steps x (1,000 + 200 warm-up) flows
