"""Processes a test or script started: whether one still runs, and stopping one by pid."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not: it is only left to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(proc: subprocess.Popen[Any], grace: float) -> bool:
    """SIGTERM ``proc`` by its pid and wait ``grace`` seconds, then SIGKILL it and reap it.
    True when it had to be killed (it did not stop when asked)."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    return False
