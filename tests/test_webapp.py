"""examples/webapp: a FastAPI app starting the login flow from an async endpoint, served by
uvicorn in its own process, called over HTTP with httpx, against a real server peer."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.cli import mesh_env
from support.meshdir import MeshDir, password_of
from support.peers import Peers

WEBAPP = Path(__file__).resolve().parents[1] / "examples" / "webapp"
_RUNNING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


class Uvicorn:
    """``uvicorn app:app`` for examples/webapp on 127.0.0.1, a port of its own choosing."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(WEBAPP)),
                    *("--host", "127.0.0.1", "--port", "0"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**mesh_env(), "MESH_CONFIG": str(config)},
                cwd=log.parent,
            )

    def url(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(encoding="utf-8", errors="replace")
            found = _RUNNING.search(text)
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                pytest.fail(f"uvicorn exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        pytest.fail(f"uvicorn did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def webapp(login_mesh: MeshDir, tmp_path: Path) -> Iterator[Uvicorn]:
    app = Uvicorn(login_mesh.config, tmp_path / "uvicorn.log")
    try:
        yield app
    finally:
        app.stop()


def test_login_over_http_runs_the_flow_on_the_server(
    login_mesh: MeshDir, peers: Peers, webapp: Uvicorn
) -> None:
    """POST /login answers with the session the server made; a wrong password is 401; many
    logins at once all succeed (the endpoint awaits, it does not block the loop); with the
    server stopped the app says 503, naming it, and the password is in no log."""
    server = peers.start(login_mesh, "server")
    url = webapp.url()

    ok = httpx.post(f"{url}/login", json={"username": "ada", "password": password_of("ada")})
    assert ok.status_code == 200, ok.text
    assert ok.json()["session"] == "session-ada"
    assert re.fullmatch(r"[0-9a-f]{32}", ok.json()["flow_id"])
    assert ok.json()["flow_id"] in server.log_text()

    wrong = httpx.post(f"{url}/login", json={"username": "ada", "password": "nope-nope"})
    assert (wrong.status_code, wrong.json()) == (401, {"detail": "invalid credentials"})

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            names = [f"user{i}" for i in range(16)]
            return await asyncio.gather(
                *(
                    client.post("/login", json={"username": n, "password": password_of(n)})
                    for n in names
                )
            )

    answers = asyncio.run(many())
    assert [a.json().get("session") for a in answers] == [f"session-user{i}" for i in range(16)]

    server.stop()
    down = httpx.post(
        f"{url}/login", json={"username": "ada", "password": password_of("ada")}, timeout=60
    )
    assert (down.status_code, down.json()) == (503, {"detail": "server is unavailable"})
    for text in (webapp.log.read_text(encoding="utf-8"), server.log_text()):
        assert password_of("ada") not in text
