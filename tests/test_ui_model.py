"""``mesh ui`` without a browser: what its pages show (mesh/ui/model.py, pages.py), who may
read and act (access.py), and how it starts (server.py, the CLI). The pages in a real
browser against real peers are tests/test_ui.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.meshdir import MeshDir

from mesh.cli import main
from mesh.config import load_config
from mesh.token import Token
from mesh.ui import model, pages
from mesh.ui.access import COOKIE, Access, listen_problem, same_origin

TOKEN = "a-token-of-twenty-chars"


@dataclass(frozen=True)
class Summary:
    flow_id: str
    request: str = "login"
    state: str = "done"
    machine: str = "server"
    line: int = 2
    started: float = 1000.0
    updated: float = 1001.0
    waiting: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class StepRec:
    machine: str
    line: int
    log: str
    state: str
    at: float
    error: str | None = None


@dataclass(frozen=True)
class Detail:
    summary: Summary
    steps: list[StepRec] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None


@pytest.fixture
def config(login_mesh: MeshDir) -> Any:
    return load_config(login_mesh.config)


def test_filter_reads_state_request_and_age_and_names_what_it_ignores() -> None:
    chosen = model.parse_filter({"state": "failed", "request": "login", "age": "5m"}, ["login"])
    assert (chosen.state, chosen.request, chosen.max_age, chosen.problems) == (
        "failed",
        "login",
        300.0,
        (),
    )
    bad = model.parse_filter({"state": "lost", "request": "nope", "age": "soon"}, ["login"])
    assert (bad.state, bad.request, bad.max_age) == (None, None, None)
    assert [p.split()[0:2] for p in bad.problems] == [
        ["no", "state"],
        ["no", "request"],
        ["age", "'soon'"],
    ]
    assert model.parse_age("2h") == 7200 and model.parse_age("1.5") == 1.5


def test_flows_newest_first_filtered(config: Any) -> None:
    flows = [
        Summary("a", started=100, state="done"),
        Summary("b", started=300, state="failed", error="server line 2: boom"),
        Summary("c", started=200, state="waiting", waiting="waiting for server"),
        Summary("d", request="feed", started=250, state="done", line=1),
    ]
    rows = model.flow_rows(flows, config, model.FlowFilter(), now=400)
    assert [r.flow_id for r in rows] == ["b", "d", "c", "a"]
    assert rows[0].note == "server line 2: boom"
    assert rows[0].line_text == "Testing password for :username"
    only = model.flow_rows(flows, config, model.FlowFilter(state="done", request="feed"), now=400)
    assert [r.flow_id for r in only] == ["d"]
    young = model.flow_rows(flows, config, model.parse_filter({"age": "200s"}, ["login"]), now=400)
    assert [r.flow_id for r in young] == ["b", "d", "c"]


def test_machine_rows_one_per_replica_with_health_and_flows(mesh_dir: MeshDir) -> None:
    mesh_dir.flow("Request\tLog\tMachine\nr\ta\tclient\nr\tb\tworker\nr\tc\tone\n")
    mesh_dir.write_config({"client": False, "worker": 2, "one": True})
    mesh_dir.fix_ports()
    config = load_config(mesh_dir.config)
    first, second = mesh_dir.replicas["worker"]
    one = mesh_dir.addresses["one"]
    rows = model.machine_rows(
        config, {first: "SERVING", one: "unreachable"}, {f"worker@{second}": 3, "one": 1}
    )
    assert [(r.name, r.health, r.flows) for r in rows] == [
        ("client", "no peer", 0),
        ("worker #1", "SERVING", 0),
        ("worker #2", "unknown", 3),
        ("one", "unreachable", 1),
    ]


def test_flow_view_folds_records_and_says_where_it_waits(config: Any) -> None:
    detail = Detail(
        Summary("f1", state="waiting", machine="server", line=2, waiting="server: unavailable"),
        steps=[
            StepRec("client", 0, "User attempted login as ada and ***", "accepted", 10.0),
            StepRec("client", 0, "User attempted login as ada and ***", "done", 10.002),
            StepRec("server", 1, "Received request to login as ada", "done", 10.01),
        ],
        context={"username": "ada", "password": "***"},
    )
    view = model.flow_view(detail, config)
    assert [(r.line, r.state) for r in view.timeline] == [(0, "done"), (1, "done")]
    assert view.timeline[0].ms == pytest.approx(10.0)  # to the next line: no duration given
    assert not view.timeline[0].own_time
    assert view.waits_at == "server, before line 2 (Testing password for :username, on server)"
    assert view.can_cancel and not view.can_retry
    assert 'data-line="1"' in view.svg
    html = pages.flow_page(view)
    assert 'id="waiting"' in html and "server: unavailable" in html
    assert 'action="/flows/f1/cancel"' in html
    assert '<span class="masked">***</span>' in html


def test_pages_escape_what_peers_say(config: Any) -> None:
    evil = "<script>alert(1)</script>"
    detail = Detail(
        Summary("f<2>", state="failed", error=evil),
        steps=[StepRec("server", 1, evil, "failed", 1.0, evil)],
        context={evil: evil},
    )
    html = pages.flow_page(model.flow_view(detail, config))
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert 'id="failure"' in html and 'id="retry"' in html


def test_listen_beyond_loopback_needs_a_token() -> None:
    assert listen_problem("127.0.0.1:8765", None) is None
    assert listen_problem("[::1]:8765", None) is None
    problem = listen_problem("0.0.0.0:8765", None)
    assert problem is not None and "token_file" in problem
    assert listen_problem("0.0.0.0:8765", Token(TOKEN, "test")) is None


def test_access_rules() -> None:
    token = Token(TOKEN, "test")
    outside = Access(token, loopback=False)
    here = {"host": "10.0.0.5:8765", "origin": "http://10.0.0.5:8765"}
    assert not outside.may_read("/flows", here, {})
    assert outside.may_read("/login", here, {}) and outside.may_read(
        "/static/mesh-ui.css", here, {}
    )
    assert outside.may_read("/flows", {**here, "authorization": f"Bearer {TOKEN}"}, {})
    assert not outside.may_read("/flows", {**here, "authorization": "Bearer wrong"}, {})
    assert outside.log_in("wrong") is None
    sid = outside.log_in(TOKEN)
    assert sid is not None and TOKEN not in sid
    assert outside.may_read("/flows", here, {COOKIE: sid})
    assert outside.post_refusal("/flows/x/cancel", here, {COOKIE: sid}) is None
    # Another site's form, with the session cookie the browser would attach:
    elsewhere = {**here, "origin": "http://evil.example"}
    assert outside.post_refusal("/flows/x/cancel", elsewhere, {COOKIE: sid}) is not None
    assert outside.post_refusal("/flows/x/cancel", {"host": here["host"]}, {COOKIE: sid})
    outside.log_out({COOKIE: sid})
    assert not outside.may_read("/flows", here, {COOKIE: sid})

    local = Access(None, loopback=True)
    mine = {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:8765"}
    assert local.may_read("/flows", mine, {}) and local.post_refusal("/x", mine, {}) is None
    assert local.host_ok(mine) and local.host_ok({"host": "localhost:9"})
    assert not local.host_ok({"host": "rebound.example:8765"})
    guarded = Access(token, loopback=True)
    assert guarded.post_refusal("/flows/x/cancel", mine, {}) is not None
    assert same_origin({"host": "h:1", "referer": "http://h:1/flows/x"})
    assert not same_origin({"host": "h:1", "origin": "null"})


def test_mesh_ui_without_the_extra_names_the_install_line(
    login_mesh: MeshDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "starlette", None)
    assert main(["ui", "-c", str(login_mesh.config)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "pip install 'structlog-mesh[ui]'" in err


def test_mesh_ui_refuses_to_listen_beyond_loopback_without_a_token(
    login_mesh: MeshDir, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ui", "-c", str(login_mesh.config), "--listen", "0.0.0.0:0"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "token" in err and "127.0.0.1" in err


def test_static_assets_ship_in_the_package() -> None:
    static = Path(pages.__file__).parent / "static"
    assert {p.name for p in static.iterdir()} >= {"mesh-ui.css", "mesh-ui.js"}
    for asset in static.iterdir():
        assert "http://" not in asset.read_text() and "https://" not in asset.read_text()


def test_the_ui_extra_is_starlette_and_uvicorn_and_the_tests_have_it() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["ui"]} == {"starlette", "uvicorn"}
    assert any(d.startswith("structlog-mesh[") and "ui" in d for d in extras["dev"])
