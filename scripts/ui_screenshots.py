"""The screenshots of ``mesh ui`` in the docs (``make ui-screenshots``), taken for real.

Starts a small durable mesh in a temporary folder (the tests' order flow: ``client``
places an order, ``stock`` reserves the item, ``billing`` charges the card), each peer
on a port of its own; runs two flows that finish, one that fails, and one that waits
because billing was stopped; serves ``mesh ui`` and opens it in headless Chromium
(tests/support/chromium.py); writes docs/images/ui-flows.png (the flows list),
ui-flow.png (a finished flow's page), ui-waiting.png (the waiting one's) and
ui-machines.png (the Machines page, billing down). Then it
cancels the waiting flow and stops everything it started, by process id.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.chromium import Browser  # noqa: E402 - the tests' browser driver
from support.meshdir import MeshDir, as_order_mesh  # noqa: E402
from support.processes import terminate  # noqa: E402

from mesh.peer import wait_serving  # noqa: E402

IMAGES = ROOT / "docs" / "images"
SIZE = (1280, 860)


def mesh(*args: str, cwd: Path, log: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MESH_CONFIG", None)
    out = log.open("w") if log else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=cwd,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    terminate(proc, 15)


def order(folder: MeshDir, item: str, *extra: str) -> subprocess.Popen[str]:
    return mesh(
        *("call", "order", f"item={item}", "customer=ada", "card=4242424242424242", *extra),
        *("-c", str(folder.config)),
        cwd=folder.root,
    )


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("ui_screenshots: no chromium on PATH (scripts/ensure-debian-packages.sh chromium)")
        return 1
    started: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="mesh-ui-shots-") as tmp:
        work = Path(tmp)
        folder = as_order_mesh(MeshDir(work / "shop", "shots"))
        folder.fix_ports()
        folder.close()
        browser: Browser | None = None
        try:
            peers = {}
            for machine in ("billing", "stock"):
                peers[machine] = mesh("peer", machine, "-c", str(folder.config), cwd=work,
                                      log=work / f"{machine}.log")  # fmt: skip
                started.append(peers[machine])
                if not wait_serving(folder.addresses[machine], 30):
                    print(f"ui_screenshots: {machine} did not start: see {work}/{machine}.log")
                    return 1
            for item, extra in (("tea", ("slow:=0.05",)), ("cake", ()), ("broken", ())):
                order(folder, item, *extra).communicate(timeout=60)
            ui = mesh("ui", "-c", str(folder.config), "--listen", "127.0.0.1:0", cwd=work,
                      log=work / "ui.log")  # fmt: skip
            started.append(ui)
            url = ""
            for _ in range(300):
                found = re.search(r"listening on (\S+) ", (work / "ui.log").read_text())
                if found:
                    url = found.group(1).rstrip("/")
                    break
                time.sleep(0.1)
            browser = Browser(chromium, work / "profile")
            page = browser.page(size=SIZE)
            IMAGES.mkdir(parents=True, exist_ok=True)
            # A finished flow, while every machine answers (billing's records included).
            page.goto(f"{url}/flows?state=done")
            done = page.wait_for("document.querySelector('tr[data-state=done]').dataset.flow")
            page.goto(f"{url}/flows/{done}")
            page.screenshot(IMAGES / "ui-flow.png")
            # Then billing stops, and the next order waits on stock for it.
            stop(peers["billing"])
            waiting = order(folder, "scones")
            started.append(waiting)
            page.goto(f"{url}/flows")
            page.wait_for(
                "document.querySelectorAll('tr[data-state=waiting]').length === 1", timeout=30
            )
            page.screenshot(IMAGES / "ui-flows.png")
            held = page.evaluate("document.querySelector('tr[data-state=waiting]').dataset.flow")
            page.goto(f"{url}/")
            page.screenshot(IMAGES / "ui-machines.png")
            page.goto(f"{url}/flows/{held}")
            page.wait_for("document.querySelector('#waiting') !== null")
            page.screenshot(IMAGES / "ui-waiting.png")
            page.click("#cancel")
            page.wait_for("document.querySelector('h1 .state').dataset.state === 'cancelled'")
            waiting.communicate(timeout=30)
            for name in ("ui-flows.png", "ui-flow.png", "ui-waiting.png", "ui-machines.png"):
                print(f"wrote {(IMAGES / name).relative_to(ROOT)}")
        finally:
            if browser is not None:
                browser.close()
            for proc in reversed(started):
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
