"""``mesh ui`` as a user runs it: a subprocess, its address read from the line it prints."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from support.cli import mesh_env
from support.processes import terminate

#: What ``mesh ui`` prints on stderr once it serves.
_LISTENING = re.compile(r"^mesh ui listening on (\S+) \(pid (\d+)\)$", re.MULTILINE)


class Ui:
    """A running ``mesh ui`` on a port of its own; :attr:`url` ends with ``/``."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *args: str,
        listen: str = "127.0.0.1:0",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "ui", "-c", str(config), "--listen", listen, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**mesh_env(), **(env or {})},
                cwd=log.parent,
            )
        self.pid = self.proc.pid
        self.url = self._wait_url()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_url(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = _LISTENING.search(self.log_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                pytest.fail(f"mesh ui exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mesh ui did not say where it listens in {timeout} s")
            time.sleep(0.05)

    def at(self, path: str) -> str:
        return self.url.rstrip("/") + path

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; fails the test when it had to."""
        if terminate(self.proc, 10):
            pytest.fail(f"mesh ui still running 10 s after SIGTERM:\n{self.log_text()}")
