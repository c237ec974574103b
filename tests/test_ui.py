"""``mesh ui`` in a real browser: headless Chromium, driven over the DevTools protocol
(tests/support/chromium.py), reads the pages of a ``mesh ui`` process serving real peers,
with JavaScript on (the pages update live) and off (they render on the server).

The pages without a browser (the view model, escaping, the access rules) are
tests/test_ui_model.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from support.chromium import Browser
from support.meshdir import MeshDir
from support.peers import Peers

pytestmark = pytest.mark.timeout(120)


def fetch(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """(status, body) of a plain HTTP request, as a script would send it."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_machines_and_flow_file_read_without_javascript_and_health_updates_live(
    login_mesh: MeshDir, peers: Peers, mesh_ui: Any, browser: Browser
) -> None:
    """With scripts off, the Machines page says the server serves and the flow file page
    draws login with each line's machine and handler; with scripts on, the Machines page
    shows the server gone without a reload once it stops."""
    server = peers.start(login_mesh, "server")
    ui = mesh_ui(login_mesh.config)

    still = browser.page(javascript=False)
    still.goto(ui.at("/"))
    assert still.evaluate("document.querySelector('#live-status').textContent") == "static page"
    row = "tr[data-machine='server']"
    assert still.evaluate(f'document.querySelector("{row}").dataset.health') == "SERVING"
    assert server.address in still.text(row)
    assert "no peer" in still.text("tr[data-machine='client']")

    still.goto(ui.at("/flowfile"))
    login = "section[data-request='login']"
    assert still.count(f"{login} svg.mesh-diagram g.participant") == 2
    lines = json.loads(
        still.evaluate(
            "JSON.stringify([...document.querySelectorAll(\"section[data-request='login']"
            ' tbody tr")].map(r => [r.dataset.line, r.dataset.machine, r.dataset.handler]))'
        )
    )
    assert lines == [
        ["0", "client", "no"],
        ["1", "server", "no"],
        ["2", "server", "yes"],
        ["3", "server", "yes"],
        ["4", "server", "no"],
        ["5", "client", "no"],
    ]
    assert "test_password" in still.text(f"{login} tr[data-line='2']")

    live = browser.page()
    live.goto(ui.at("/"))
    live.wait_for("document.querySelector('#live-status').textContent === 'live'")
    server.stop()
    live.wait_for(
        "document.querySelector(\"tr[data-machine='server']\").dataset.health === 'unreachable'",
        timeout=5,
    )


def test_beyond_loopback_every_page_asks_for_the_token(
    login_mesh: MeshDir, mesh_ui: Any, browser: Browser
) -> None:
    """Served beyond loopback (0.0.0.0), a page redirects to the login form; the token logs
    in (a cookie that is not the token), a bearer header works for scripts, and the token
    appears in no page."""
    token = "ui-test-token-0123456789"
    (login_mesh.root / "token").write_text(token + "\n", encoding="utf-8")
    login_mesh.write_config({"client": False, "server": True}, extra='token_file = "token"')
    ui = mesh_ui(login_mesh.config, listen="0.0.0.0:0")
    assert "asks for the mesh token" in ui.log_text()
    port = ui.url.rstrip("/").rsplit(":", 1)[1]
    base = f"http://127.0.0.1:{port}"

    status, body = fetch(f"{base}/flows", headers={"X-Mesh-Partial": "1"})
    assert status == 401
    status, body = fetch(f"{base}/flowfile", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and "Testing password" in body and token not in body

    page = browser.page()
    page.goto(f"{base}/flowfile")
    page.wait_path("/login")
    page.evaluate("document.querySelector('input[name=token]').value = 'not-the-token-at-all'")
    page.click("form.login button")
    page.wait_for("document.querySelector('p.error') !== null")
    page.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(token)}")
    page.click("form.login button")
    page.wait_path("/flowfile")
    assert "Testing password" in page.text("main")
    assert token not in page.html()
    cookies = page.send("Network.getCookies", {"urls": [base]})["cookies"]
    assert [c["name"] for c in cookies] == ["mesh_ui_session"]
    assert token not in cookies[0]["value"] and cookies[0]["httpOnly"]

    # A form another site posts, with the session cookie the browser would attach to it:
    session = f"mesh_ui_session={cookies[0]['value']}"
    foreign = {"Cookie": session, "Origin": "http://elsewhere.example"}
    status, body = fetch(f"{base}/flows/some-flow/cancel", data=b"", headers=foreign)
    assert status == 403 and "not sent from a page of this server" in body
    status, body = fetch(f"{base}/flows/some-flow/cancel", data=b"", headers={"Cookie": session})
    assert status == 403  # no Origin nor Referer at all: refused too
