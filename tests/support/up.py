"""``mesh up`` as a user runs it: a subprocess whose output lines a test reads as printed."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest

from support.cli import mesh_env
from support.processes import alive, terminate


class Up:
    """A running ``mesh up``; its stdout and stderr lines arrive on one queue as printed.

    ``mesh`` is the command that runs the CLI (default: this interpreter's ``-m mesh``;
    an installed ``mesh`` script, for a package tried outside the repository).
    """

    def __init__(
        self,
        config: Path,
        cwd: Path,
        *args: str,
        mesh: Sequence[str] = (sys.executable, "-m", "mesh"),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [*mesh, "up", "-c", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**mesh_env(), **(env or {})},
            cwd=cwd,
        )
        self.pid = self.proc.pid
        self.peer_pids: dict[str, int] = {}
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._open = 2
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # this stream ended

    def expect(self, pattern: str, timeout: float = 30) -> str:
        """Read output lines until one matches ``pattern``; fail at its end or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in {timeout} s; saw {self.seen}")
            if line is None:
                self._open -= 1
                if not self._open:
                    pytest.fail(f"mesh up ended before printing {pattern!r}: {self.seen}")
                continue
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def wait_healthy(self, count: int) -> None:
        while len(self.peer_pids) < count:
            line = self.expect(r"^mesh up: \S+ listening on \S+ \(pid \d+\)")
            m = re.search(r"^mesh up: (\S+) listening on \S+ \(pid (\d+)\)", line)
            assert m
            self.peer_pids[m.group(1)] = int(m.group(2))
        self.expect(rf"^mesh up: {count} peers healthy")

    def stop(self) -> None:
        """SIGTERM ``mesh up`` alone, wait, then SIGKILL it and any peer left over."""
        terminate(self.proc, 30)
        for pid in self.peer_pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
