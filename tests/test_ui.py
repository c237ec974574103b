"""``mesh ui`` in a real browser: headless Chromium, driven over the DevTools protocol
(tests/support/chromium.py), reads the pages of a ``mesh ui`` process serving real peers,
with JavaScript on (the pages update live) and off (they render on the server).

The pages without a browser (the view model, escaping, the access rules) are
tests/test_ui_model.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from support.chromium import Browser
from support.cli import mesh_env, run_mesh
from support.meshdir import MeshDir, as_order_mesh
from support.peers import Peers

from mesh.config import load_config
from mesh.journals import open_journal

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def order_mesh(mesh_dir: MeshDir) -> MeshDir:
    """A durable order over client, stock and billing (tests/support/meshdir.py)."""
    return as_order_mesh(mesh_dir)


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
    still.goto(ui.at("/flows"))  # login is not durable: nothing is journaled, and it says why
    assert "durable = true" in still.text("main p.error")

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


# -- durable flows -----------------------------------------------------------------------

CARD = "4242424242424242"


def call_order(mesh_dir: MeshDir, item: str, *extra: str) -> subprocess.Popen[str]:
    """``mesh call order …`` in the background, as a user starts a flow from a shell."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "mesh", "call", "order", f"item={item}", "customer=ada"),
            *(f"card={CARD}", *extra, "-c", str(mesh_dir.config)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=mesh_env(),
        cwd=mesh_dir.root,
    )


def finished(call: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    out, _ = call.communicate(timeout=timeout)
    return call.returncode, out


ROWS = "[...document.querySelectorAll('table.flows tbody tr[data-flow]')]"


def test_a_flow_started_with_the_page_open_appears_runs_and_shows_its_lines_masked(
    order_mesh: MeshDir, peers: Peers, mesh_ui: Any, browser: Browser
) -> None:
    """The flows list, open with scripts on, shows a flow within 2 s of its start, running,
    then done without a reload; its page shows its lines in order on their machines, the
    path drawn, and the card as *** everywhere."""
    peers.start(order_mesh, "billing")
    peers.start(order_mesh, "stock")
    ui = mesh_ui(order_mesh.config)
    page = browser.page()
    page.goto(ui.at("/flows"))
    page.wait_for("document.querySelector('#live-status').textContent === 'live'")
    assert page.count("table.flows tbody tr[data-flow]") == 0

    call = call_order(order_mesh, "tea", "slow:=2")
    try:
        started = page.wait_for(f"{ROWS}.map(r => r.dataset.started)[0]", timeout=8)
        seen = time.time()
        assert seen - float(started) <= 2.0
        assert page.evaluate(f"{ROWS}[0].dataset.state") in ("running", "waiting")
        page.wait_for(f"{ROWS}[0].dataset.state === 'done'", timeout=10)
        code, out = finished(call)
    finally:
        call.kill()
    assert code == 0, out
    flow_id = page.evaluate(f"{ROWS}[0].dataset.flow")
    assert flow_id in out

    page.click(f"tr[data-flow='{flow_id}'] a")
    page.wait_path(f"/flows/{flow_id}")
    timeline = json.loads(
        page.evaluate(
            "JSON.stringify([...document.querySelectorAll('table.timeline tbody tr')]"
            ".map(r => [r.dataset.line, r.dataset.machine, r.dataset.state]))"
        )
    )
    assert timeline == [
        ["0", "client", "done"],
        ["1", "stock", "done"],
        ["2", "billing", "done"],
        ["3", "client", "done"],
    ]
    assert "Order placed for ada: tea with card ***" in page.text("table.timeline")
    assert page.count("svg.mesh-diagram g.participant") == 3
    assert page.text("table.result tr[data-key='card']").endswith("***")
    assert "r-ada" in page.text("table.result")
    assert CARD not in page.html()
    assert page.count("#cancel") == 0


def test_a_failing_flow_shows_machine_line_and_error_without_javascript(
    order_mesh: MeshDir, peers: Peers, mesh_ui: Any, browser: Browser
) -> None:
    """With scripts off, the list filtered to failed flows shows it, and its page names the
    machine, the line and the error; its Retry button runs it again."""
    peers.start(order_mesh, "billing")
    peers.start(order_mesh, "stock")
    code, out = finished(call_order(order_mesh, "broken"))
    assert code != 0 and "card declined" in out
    ui = mesh_ui(order_mesh.config)

    page = browser.page(javascript=False)
    page.goto(ui.at("/flows?state=failed&request=order&age=5m"))
    assert page.text("#live-status") == "static page"
    assert page.count("table.flows tbody tr[data-state='failed']") == 1
    assert "card declined" in page.text("table.flows")
    page.click("table.flows tbody tr[data-state='failed'] a")
    page.wait_for("location.pathname.startsWith('/flows/') && document.readyState === 'complete'")
    failure = page.text("#failure")
    assert "billing" in failure and "line 2" in failure and "card declined for broken" in failure
    assert page.count("#retry") == 1
    assert CARD not in page.html()
    flow_path = page.evaluate("location.pathname")
    before = page.text("p.meta")  # its start and last record
    page.click("#retry")  # a POST form: no script needed
    page.wait_for(
        f"location.pathname === {json.dumps(flow_path)} && document.readyState === 'complete'"
        f" && document.querySelector('p.meta').innerText !== {json.dumps(before)}"
    )
    assert page.count("main p.error") == 0  # retried: the flow has a record since
    page.goto(ui.at("/flows?state=done"))
    assert page.count("table.flows tbody tr[data-flow]") == 0


def test_a_waiting_flow_says_where_it_waits_and_cancel_from_the_page_stops_it(
    mesh_dir: MeshDir, peers: Peers, mesh_ui: Any, browser: Browser
) -> None:
    """billing is down: the flow waits on stock, and its page says so, naming billing.
    The mesh has a token: on loopback the page reads without it, but Cancel asks for it;
    logged in, Cancel stops the flow: the caller gets its error, the list shows it
    cancelled, and stock's journal says cancelled."""
    token = "order-token-0123456789"
    order_mesh = as_order_mesh(mesh_dir, token=token)
    order_mesh.fix_ports("billing")  # never started: calls to it are refused
    peers.start(order_mesh, "stock")
    ui = mesh_ui(order_mesh.config)
    call = call_order(order_mesh, "tea")
    try:
        page = browser.page()
        page.goto(ui.at("/flows"))
        page.wait_for(f"{ROWS}.some(r => r.dataset.state === 'waiting')", timeout=10)
        flow_id = page.evaluate(f"{ROWS}[0].dataset.flow")
        page.goto(ui.at("/"))  # Machines: the flow is held on stock; billing does not answer
        machine = "document.querySelector(\"tr[data-machine='{}']\")"
        assert page.evaluate(machine.format("billing") + ".dataset.health") == "unreachable"
        assert page.evaluate(machine.format("stock") + ".dataset.health") == "SERVING"
        assert page.text("tr[data-machine='stock'] td.num") == "1"
        page.goto(ui.at(f"/flows/{flow_id}"))
        waits = page.text("#waiting")
        assert "stock" in waits and "line 2" in waits and "waiting for billing" in waits
        page.click("#cancel")
        page.wait_path("/login")
        page.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(token)}")
        page.click("form.login button")
        page.wait_path(f"/flows/{flow_id}")
        assert page.evaluate("document.querySelector('h1 .state').dataset.state") == "waiting"
        page.click("#cancel")
        page.wait_for("document.querySelector('h1 .state').dataset.state === 'cancelled'")
        code, out = finished(call)
    finally:
        call.kill()
    assert code != 0 and "cancelled" in out
    page.goto(ui.at("/flows?state=cancelled"))
    assert page.evaluate(f"{ROWS}.map(r => r.dataset.flow)") == [flow_id]
    assert token not in page.html()
    shown = run_mesh("flows", "show", flow_id, "-c", order_mesh.config, cwd=order_mesh.root)
    assert shown.returncode == 0 and "cancelled" in shown.stdout, shown.stderr
    journal = open_journal(load_config(order_mesh.config).journal_url("stock"), create=False)
    try:
        assert [s.state for s in journal.stays(flow_id=flow_id)] == ["cancelled"]
    finally:
        journal.close()
