"""Headless Chromium: pages rendered once (``--dump-dom``, ``--screenshot``) to check that
the HTML diagrams render with nothing fetched, and pages driven live over the DevTools
protocol (:class:`Browser`) for ``mesh ui``."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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

    def browser(self) -> Browser:
        """A browser to drive (:class:`Browser`), with a fresh profile; close it after."""
        return Browser(self.binary, self._profiles / f"profile-{next(self._runs)}")

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


_ON_3_AND_4 = """
import fcntl, os, sys
read, write = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])
os.dup2(read, 3)
os.dup2(write, 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class BrowserError(AssertionError):
    """Chromium said no, or did not answer in time."""


class Browser:
    """One headless Chromium driven over the DevTools protocol, on a pipe.

    ``--remote-debugging-pipe``: Chromium reads JSON commands, each ended by a NUL byte,
    from its file descriptor 3 and writes answers and events to 4. No port is opened and
    no client library is needed. Pages are tabs (:meth:`page`), each attached in
    "flatten" mode, so a command names its tab by session id. Stop it with :meth:`close`
    (the fixture does), which ends the process by its id.
    """

    def __init__(self, binary: str, profile: Path) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        # A small Python puts our ends on 3 and 4 and becomes Chromium (the same pid):
        # no preexec_fn, unsafe in a process with threads; no shell, whose redirections
        # stop at fd 9.
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-c", _ON_3_AND_4, str(to_child_r), str(from_child_w)),
                *(binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe"),
                f"--user-data-dir={profile}",
            ],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.pid = self.proc.pid
        self._ids = itertools.count(1)
        self._buffer = b""

    def command(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        n = next(self._ids)
        message: dict[str, Any] = {"id": n, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == n:
                    if "error" in answer:
                        raise BrowserError(f"{method}: {answer['error']}")
                    return dict(answer.get("result", {}))
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_child], [], [], max(left, 0))
            if not ready:
                raise BrowserError(f"{method}: no answer from Chromium in 30 s")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise BrowserError(f"{method}: Chromium exited ({self.proc.poll()})")
            self._buffer += chunk

    def page(self, *, javascript: bool = True, size: tuple[int, int] = (1400, 1000)) -> Page:
        """A new tab; ``javascript=False`` runs no script in it, as with scripts disabled."""
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.command("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session)
        width, height = size
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        if not javascript:
            page.send("Emulation.setScriptExecutionDisabled", {"value": True})
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self.command("Browser.close")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)


class Page:
    """One tab of a :class:`Browser`."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.command(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (works with scripts disabled)."""
        done = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in done:
            raise BrowserError(f"{expression}: {done['exceptionDetails']}")
        return done["result"].get("value")

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded."""
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def wait_path(self, path: str, timeout: float = 10.0) -> None:
        """Wait until the tab shows a loaded page at ``path`` (after a click that navigates)."""
        self.wait_for(
            f"location.pathname === {json.dumps(path)} && document.readyState === 'complete'",
            timeout,
        )

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy; its value. Fails showing the page's text."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(BrowserError):  # a page navigating away in between
                value = self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise BrowserError(f"not true in {timeout} s: {expression}\npage:\n{text}")
            time.sleep(0.05)

    def html(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def text(self, selector: str = "body") -> str:
        """The rendered text of the first element ``selector`` matches ("" when none)."""
        found = self.evaluate(
            f"(e => e ? e.innerText : '')(document.querySelector({json.dumps(selector)}))"
        )
        return str(found)

    def count(self, selector: str) -> int:
        return int(self.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))

    def click(self, selector: str) -> None:
        """Click the element (a real mouse press at its centre: scripts disabled or not)."""
        box = self.evaluate(
            f"(e => {{ e.scrollIntoView(); const r = e.getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})"
            f"(document.querySelector({json.dumps(selector)}))"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the window's height) as a PNG."""
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
