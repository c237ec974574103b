"""scripts/bench_ab.py, cut short: two versions' chains side by side, nothing left running."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import alive

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_ab.py"


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--hops", "2", *args],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    pids = [int(p) for p in re.search(r"^peer pids: ([\d ]+)$", out, re.M).group(1).split()]
    assert pids and not any(alive(pid) for pid in pids), out
    for label in ("p50 one flow at a time", "peers' CPU per flow", "flows/s, 32 in flight"):
        assert re.search(rf"^  {re.escape(label)}: +\d+\.\d{{3}} \(", out, re.M), out
    assert "round 2: one at a time p50 A " in out
    return out


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_revision_against_this_checkout() -> None:
    """--base exports a git revision's mesh package and runs a chain of it beside one of
    this checkout: both chains answer, the ratios are printed, every peer is stopped."""
    out = _run("--base", "HEAD")
    assert "A: peers of HEAD\nB: peers of this checkout" in out
    assert len(re.search(r"^peer pids: ([\d ]+)$", out, re.M).group(1).split()) == 4


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_two_ways_an_asyncio_application_originates() -> None:
    """--originator: one chain, flows from a node of mesh.connect against mesh.connect_async."""
    out = _run("--originator")
    assert "A: mesh.connect" in out and "B: mesh.connect_async" in out


def test_an_unknown_revision_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", "no-such-revision-xyz", "--smoke"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("bench_ab: git archive no-such-revision-xyz:")
    assert "Traceback" not in proc.stderr
