"""Headless Chromium, to check that the HTML diagrams render with nothing fetched."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

#: Where tests keep what a person may want to look at afterwards (gitignored).
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class Chromium:
    """Debian's headless Chromium, each run with a fresh profile folder."""

    def __init__(self, binary: str, profiles: Path) -> None:
        self.binary = binary
        self._profiles = profiles
        self._runs = itertools.count()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        profile = self._profiles / f"profile-{next(self._runs)}"
        return subprocess.run(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def dump_dom(self, url: str) -> str:
        """The page's DOM once it has loaded and rendered, serialized."""
        done = self._run("--dump-dom", url)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def screenshot(self, url: str, path: Path, size: str = "1400,1000") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = self._run(f"--screenshot={path}", f"--window-size={size}", url)
        assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
        return path
