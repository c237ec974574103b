"""End-to-end tests: real peers in separate processes, flows started in-process or by ``mesh call``.

Every peer is ``python -m mesh peer MACHINE`` on an ephemeral port of 127.0.0.1, logging
JSON to a file the test reads to prove where each line ran.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog
from support.cli import mesh_env
from support.meshdir import LOGIN_FLOW, LOGIN_SERVICE, MeshDir, password_of
from support.peers import Peers

import mesh
from mesh.config import load_config

PASSWORD = password_of("ada")
SERVER_LINES = [
    (1, "Received request to login as ada"),
    (2, "Testing password for ada"),
    (3, "Setting session for ada"),
    (4, "Finish handling user login"),
]


LINE_KEYS = {"event", "flow_id", "request", "line_index", "machine", "level", "timestamp"}


def flow_lines(events: list[dict], flow_id: str) -> list[tuple[int, str]]:
    """The flow lines a peer logged for ``flow_id`` (its handlers' own events left out)."""
    return [
        (e["line_index"], e["event"])
        for e in events
        if e.get("flow_id") == flow_id
        and set(e) == LINE_KEYS
        and not str(e["event"]).startswith("mesh.")
    ]


def run_mesh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mesh_env(),
        check=False,
    )


# -- login end to end ------------------------------------------------------------


def test_login_in_process_end_to_end(login_mesh: MeshDir, peers: Peers, connect, capfd) -> None:
    """An in-process client with no port runs login through the server and back, secrets unseen."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")

    result = node.start("login", username="ada", password=PASSWORD)

    assert result.context["session"] == "session-ada"
    assert result.context["verified"] is True
    assert [(s.index, s.machine) for s in result.steps] == [
        (0, "client"),
        (1, "server"),
        (2, "server"),
        (3, "server"),
        (4, "server"),
        (5, "client"),
    ]
    assert result.steps[0].line == "User attempted login as ada and ***"
    logged = [e for e in server.events() if e.get("event") in dict(SERVER_LINES).values()]
    assert [(e["line_index"], e["event"]) for e in logged] == SERVER_LINES
    assert {e["flow_id"] for e in logged} == {result.flow_id}
    assert {e["machine"] for e in logged} == {"server"}
    captured = capfd.readouterr()
    assert "User attempted login as ada and ***" in captured.out
    for text in (captured.out, captured.err, server.log_text(), repr(result)):
        assert PASSWORD not in text


def test_login_by_mesh_call(login_mesh: MeshDir, peers: Peers) -> None:
    """`mesh call login` acts as the address-less client; the server runs its four lines."""
    server = peers.start(login_mesh, "server")

    done = run_mesh(
        "call", "login", "username=ada", f"password={PASSWORD}", "-c", str(login_mesh.config)
    )

    assert done.returncode == 0, done.stderr
    assert '"session-ada"' in done.stdout
    assert 'password = "***"' in done.stdout
    flow_id = re.search(r"flow ([0-9a-f]{8,})", done.stdout)
    assert flow_id, done.stdout
    assert flow_lines(server.events(), flow_id.group(1)) == SERVER_LINES
    for text in (done.stdout, done.stderr, server.log_text()):
        assert PASSWORD not in text


def test_peer_embedded_in_a_process(login_mesh: MeshDir, connect) -> None:
    """node.serve() runs the server's lines inside this process; node.stop() ends it."""
    login_mesh.fix_ports()  # node.serve() binds the address the config gives
    server = connect(login_mesh.config, "server")
    port = server.serve()
    assert f":{port}" in server.address

    done = run_mesh(
        "call",
        "login",
        "username=ada",
        f"password={PASSWORD}",
        "--json",
        "-c",
        str(login_mesh.config),
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["context"]["session"] == "session-ada"
    assert [s["machine"] for s in out["steps"]] == ["client"] + ["server"] * 4 + ["client"]

    server.stop(grace=1)
    after = run_mesh(
        "call", "login", "username=ada", f"password={PASSWORD}", "-c", str(login_mesh.config)
    )
    assert after.returncode == 1
    assert "server is unavailable" in after.stderr


def test_pass_through_flow_without_handlers(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """A flow whose lines have no handler passes through: feed runs client then server."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")

    result = node.start("feed", user_id=7)

    assert result.context == {"user_id": 7}
    assert [(s.line, s.machine) for s in result.steps] == [
        ("Fetching feed information", "client"),
        ("Retrieving feed information", "server"),
    ]
    assert flow_lines(server.events(), result.flow_id) == [(1, "Retrieving feed information")]


def test_inline_login_comes_back_to_inline_code(
    login_mesh: MeshDir, peers: Peers, connect, capfd
) -> None:
    """Inline client code logging line 0 and "next" gets the flow back for "Login successful"."""
    server = peers.start(login_mesh, "server")
    connect(login_mesh.config, "client")
    log = structlog.get_logger()

    log.info("User attempted login as :username and #password", username="ada", password=PASSWORD)
    log.info("next")
    assert mesh.current_context()["session"] == "session-ada"
    log.info("Login successful")
    log.info("next")

    context = mesh.current_context()
    assert context["verified"] is True
    out = capfd.readouterr().out
    assert "User attempted login as ada and ***" in out
    assert "Login successful" in out
    assert PASSWORD not in out
    assert PASSWORD not in server.log_text()
    flow_ids = {e["flow_id"] for e in server.events() if e.get("request") == "login"}
    assert len(flow_ids) == 1
    assert flow_ids.pop() in out


def test_digest_ignores_delimiter_quoting_and_line_ends(
    login_mesh: MeshDir, peers: Peers, connect, tmp_path: Path
) -> None:
    """A client reading the same login rows as quoted CSV with CRLF is not refused by the server."""
    peers.start(login_mesh, "server")
    csv_side = MeshDir(tmp_path / "csv-side", login_mesh.tag + "_csv")
    rows = [line.split("\t") for line in LOGIN_FLOW.splitlines()]
    csv_side.flow(
        "\ufeff" + "".join(",".join(f'"{cell}"' for cell in row) + "\r\n" for row in rows),
        "flow.csv",
    )
    csv_side.service(LOGIN_SERVICE)
    csv_side.write_config(
        {"client": False, "server": login_mesh.addresses["server"]}, flow="flow.csv"
    )
    node = connect(csv_side.config, "client")

    result = node.start("login", username="ada", password=PASSWORD)

    assert result.context["session"] == "session-ada"


CONTEXTVARS_FLOW = (
    "Request\tLog\tMachine\n"
    "greet\tGreeting :name\tclient\n"
    "greet\tRemembering :name\tserver\n"
    "greet\tRecalling\tserver\n"
)

CONTEXTVARS_SERVICE = """
import structlog
from structlog.contextvars import bind_contextvars, get_contextvars

import mesh
from mesh.config import load_config

log = structlog.get_logger()


@mesh.handler("greet", "Remembering :name")
def remember(ctx):
    seen = sorted(k for k in get_contextvars() if k.startswith("remembered"))
    bind_contextvars(remembered=ctx["name"])  # ambient: must not join the context
    log.bind(bound_by_logger=ctx["name"]).info("next", seen_before=seen)


@mesh.handler("greet", "Recalling")
def recall(ctx):
    log.info("recalling", name=ctx["name"])
    log.info("next", recalled=get_contextvars().get("remembered"))
"""


def test_flows_share_no_state_through_contextvars(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """Logging "next" merges its own and bound values, never contextvars, nor other flows'."""
    mesh_dir.flow(CONTEXTVARS_FLOW)
    mesh_dir.service(CONTEXTVARS_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    names = [f"n{i}" for i in range(40)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: node.start("greet", name=n), names))

    for name, result in zip(names, results, strict=True):
        assert result.context == {
            "name": name,
            "bound_by_logger": name,
            "seen_before": [],
            "recalled": name,
        }
    recalls = [e for e in server.events() if e.get("event") == "recalling"]
    assert len(recalls) == 40
    for event in recalls:
        assert event["remembered"] == event["name"]


# -- the design notes' inline usage example -----------------------------------------

INDEX_FLOW = (
    "index,Checking if signed in,server\n"
    "index,Generating list of questions,server\n"
    "index,Sending sign in email,emailservice\n"
)

EMAIL_SERVICE = """
import json

import structlog

import mesh
from mesh.config import load_config

log = structlog.get_logger()
RECEIVED = {received!r}


@mesh.handler("index", "Sending sign in email")
def send_sign_in_email(ctx):
    with open(RECEIVED, "a", encoding="utf-8") as out:
        out.write(json.dumps(ctx) + "\\n")
    log.info("email queued", to=ctx["username"], questions=ctx["questions"])
    log.info("next", email_sent=True)
"""


def test_design_notes_inline_example(
    mesh_dir: MeshDir, peers: Peers, connect, tmp_path: Path, capfd
) -> None:
    """Inline code logging lines and "next" hands questions=[] to a real emailservice peer."""
    received = tmp_path / "received.jsonl"
    mesh_dir.flow(INDEX_FLOW, "index.csv")
    mesh_dir.service(EMAIL_SERVICE.format(received=str(received)))
    mesh_dir.write_config({"server": True, "emailservice": True}, flow="index.csv")
    email = peers.start(mesh_dir, "emailservice")
    connect(mesh_dir.config, "server")

    # The design notes' usage, with structlog in place of StructuredLog:
    log = structlog.get_logger()
    log.info("Checking if signed in")
    username = "ada"
    log.info("next", username=username)
    log.info("Generating list of questions")
    questions: list[str] = []
    log.info("next", questions=questions)

    assert json.loads(received.read_text(encoding="utf-8")) == {
        "username": "ada",
        "questions": [],
    }
    context = mesh.current_context()
    assert context == {"username": "ada", "questions": [], "email_sent": True}
    queued = [e for e in email.events() if e.get("event") == "email queued"]
    assert len(queued) == 1
    assert queued[0]["questions"] == []
    assert queued[0]["machine"] == "emailservice"
    lines = [(e["line_index"], e["event"]) for e in email.events() if "line_index" in e]
    assert lines[0] == (2, "Sending sign in email")
    out = capfd.readouterr().out
    assert "Checking if signed in" in out
    assert "Generating list of questions" in out
    assert "Sending sign in email" not in out


def test_inline_flows_from_many_threads(
    mesh_dir: MeshDir, peers: Peers, connect, tmp_path: Path
) -> None:
    """Inline flows run by 32 threads (pool threads reused) each keep their own context."""
    received = tmp_path / "received.jsonl"
    mesh_dir.flow(INDEX_FLOW, "index.csv")
    mesh_dir.service(EMAIL_SERVICE.format(received=str(received)))
    mesh_dir.write_config({"server": True, "emailservice": True}, flow="index.csv")
    peers.start(mesh_dir, "emailservice")
    connect(mesh_dir.config, "server")
    log = structlog.get_logger()

    def index(username: str) -> dict:
        log.info("Checking if signed in")
        log.info("next", username=username)
        log.info("Generating list of questions")
        log.info("next", questions=[username.upper()])
        return dict(mesh.current_context())

    users = [f"u{i}" for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        contexts = list(pool.map(index, users))

    for user, context in zip(users, contexts, strict=True):
        assert context == {"username": user, "questions": [user.upper()], "email_sent": True}
    sent = [json.loads(line) for line in received.read_text(encoding="utf-8").splitlines()]
    assert sorted(c["username"] for c in sent) == sorted(users)
    assert all(c["questions"] == [c["username"].upper()] for c in sent)


def test_line_out_of_order_is_a_flow_violation(mesh_dir: MeshDir, connect) -> None:
    """Inline code logging the following line before "next" gets FlowViolation naming both."""
    mesh_dir.flow(INDEX_FLOW, "index.csv")
    mesh_dir.write_config({"server": True, "emailservice": True}, flow="index.csv")
    connect(mesh_dir.config, "server")
    log = structlog.get_logger()

    log.info("Checking if signed in")
    with pytest.raises(mesh.FlowViolation) as info:
        log.info("Generating list of questions")

    assert '"next"' in str(info.value)
    assert "Checking if signed in" in str(info.value)
    assert "Generating list of questions" in str(info.value)


# -- moving a line to another machine --------------------------------------------------


def test_moving_a_line_to_a_new_machine(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """Editing one cell of a copy of the flow file moves the same handler to an auth process."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    moved = LOGIN_FLOW.replace(
        "Testing password for :username\tserver", "Testing password for :username\tauth"
    )
    assert moved != LOGIN_FLOW
    mesh_dir.flow(moved, "flow-auth.tsv")
    auth_config = mesh_dir.write_config(
        {"client": False, "server": True, "auth": True},
        flow="flow-auth.tsv",
        name="mesh-auth.toml",
    )

    # Before: everything of the server's runs in the server process.
    before = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    first = node.start("login", username="ada", password=PASSWORD)
    node.close()
    before.stop()
    assert ("checking password", "server") in [
        (e["event"], e.get("machine")) for e in before.events()
    ]

    # After: the same module, a different flow file; the password check runs on auth.
    auth = peers.start(mesh_dir, "auth", config=auth_config)
    server = peers.start(mesh_dir, "server", config=auth_config)  # after auth, which it dials
    node = connect(auth_config, "client")
    result = node.start("login", username="ada", password=PASSWORD)

    assert result.context["session"] == first.context["session"] == "session-ada"
    assert [s.machine for s in result.steps] == [
        "client",
        "server",
        "auth",
        "server",
        "server",
        "client",
    ]
    auth_events = [e for e in auth.events() if e.get("flow_id") == result.flow_id]
    assert [(e["event"], e["machine"]) for e in auth_events] == [
        ("Testing password for ada", "auth"),
        ("checking password", "auth"),
    ]
    assert flow_lines(server.events(), result.flow_id) == [
        (1, "Received request to login as ada"),
        (3, "Setting session for ada"),
        (4, "Finish handling user login"),
    ]
    assert "checking password" not in server.log_text()
    assert PASSWORD not in auth.log_text()


AUTH_FLOW = LOGIN_FLOW.replace(
    "Testing password for :username\tserver", "Testing password for :username\tauth"
)

#: Imported by every process; the one started with MESH_TEST_GATE=PORT waits, while
#: importing its services (so before it listens), until the test lets it go on.
GATE_SERVICE = """
import os
import socket

gate = os.environ.get("MESH_TEST_GATE")
if gate:
    with socket.create_connection(("127.0.0.1", int(gate))) as conn:
        conn.recv(1)
"""


def test_errors_from_a_nested_hop(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """Failures two hops away (client → server → auth) reach the client naming auth."""
    mesh_dir.flow(AUTH_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "auth": True})
    auth = peers.start(mesh_dir, "auth")
    peers.start(mesh_dir, "server")  # after auth, which it dials
    node = connect(mesh_dir.config, "client")

    with pytest.raises(mesh.FlowError) as failed:
        node.start("login", username="ada", password="wrong-password")
    assert failed.value.machine == "auth"
    assert failed.value.line_index == 2
    assert failed.value.error_type == "PermissionError"

    assert auth.stop() == 0
    with pytest.raises(mesh.PeerUnavailable) as down:
        node.start("login", username="ada", password=PASSWORD, timeout=10)
    assert down.value.machine == "auth"
    assert mesh_dir.addresses["auth"] in str(down.value)


def test_peer_back_up_is_used_at_once(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """Once a peer that was down is healthy again, the next flow through it succeeds."""
    mesh_dir.flow(AUTH_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.service(GATE_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "auth": True})
    mesh_dir.fix_ports("auth")  # the server dials auth before auth starts: the point here
    peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    with socket.create_server(("127.0.0.1", 0)) as gate:
        gate.settimeout(30)
        port = gate.getsockname()[1]
        auth = peers.start(mesh_dir, "auth", wait=False, env={"MESH_TEST_GATE": str(port)})
        held, _ = gate.accept()  # auth is importing its services: not listening yet
        with held:
            with pytest.raises(mesh.PeerUnavailable) as down:
                node.start("login", username="ada", password=PASSWORD, timeout=10)
            assert down.value.machine == "auth"
            held.sendall(b"go")
        auth.wait_ready()

    result = node.start("login", username="ada", password=PASSWORD, timeout=10)

    assert result.context["verified"] is True
    assert [s.machine for s in result.steps][2] == "auth"


def test_context_round_trips_exactly(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """Ints stay ints (even past 2**53), floats, unicode, nesting and 1 MB survive two hops."""
    peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")
    context = {
        "n": 3,
        "big": 2**63 - 1,
        "ratio": 0.1,
        "name": "Ada Lovelace — 数学",
        "nested": {"list": [1, "two", None, True, {"x": -0.5}], "empty": {}},
        "blob": "x" * 1_000_000,
    }

    result = node.start("feed", **context)

    assert result.context == context
    assert type(result.context["big"]) is int


# -- many flows at once --------------------------------------------------------------


def test_200_concurrent_logins(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """200 logins at once through one server all succeed, each with its own session."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")
    users = [f"user{i:03d}" for i in range(200)]

    def login(user: str) -> mesh.FlowResult:
        return node.start("login", username=user, password=password_of(user), timeout=60)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(login, users))

    for user, result in zip(users, results, strict=True):
        assert result.context == {
            "username": user,
            "password": password_of(user),
            "verified": True,
            "session": f"session-{user}",
        }
        assert result.steps[1].line == f"Received request to login as {user}"
    assert len({r.flow_id for r in results}) == 200
    # Each flow's lines on the server rendered its own user.
    events = server.events()
    by_flow = {r.flow_id: r.context["username"] for r in results}
    tested = [e for e in events if str(e.get("event", "")).startswith("Testing password for ")]
    assert len(tested) == 200
    for e in tested:
        assert e["event"] == f"Testing password for {by_flow[e['flow_id']]}"


# -- errors ------------------------------------------------------------------------


def test_wrong_password_is_a_flow_error(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """A handler raising on the server ends the flow with FlowError naming server and line 2."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")

    with pytest.raises(mesh.FlowError) as info:
        node.start("login", username="ada", password="wrong-password")

    err = info.value
    assert err.machine == "server"
    assert err.line_index == 2
    assert err.line == "Testing password for :username"
    assert err.error_type == "PermissionError"
    assert "invalid credentials" in str(err)
    assert "wrong-password" not in str(err)
    assert "wrong-password" not in server.log_text()


def test_stopped_peer_is_unavailable(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """After the server stops, a login fails fast with PeerUnavailable naming the server:
    it does not wait for the flow's deadline (an hour here, past the test's own timeout)."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")
    node.start("login", username="ada", password=PASSWORD)
    assert server.stop() == 0

    with pytest.raises(mesh.PeerUnavailable) as info:
        node.start("login", username="ada", password=PASSWORD, timeout=3600)

    assert info.value.machine == "server"
    assert info.value.address == login_mesh.addresses["server"]
    assert "server" in str(info.value)
    assert login_mesh.addresses["server"] in str(info.value)


def test_flow_edited_on_one_side_is_refused(
    login_mesh: MeshDir, peers: Peers, connect, tmp_path: Path
) -> None:
    """A client whose login rows differ from the server's gets PeerRefused: different version,
    naming the digest each side has, so the caller sees which one it should have sent."""
    peers.start(login_mesh, "server")
    edited = MeshDir(tmp_path / "edited", login_mesh.tag + "_edited")
    edited.flow(LOGIN_FLOW.replace("Finish handling user login", "Finish handling the user login"))
    edited.service(LOGIN_SERVICE)
    edited.write_config({"client": False, "server": login_mesh.addresses["server"]})
    node = connect(edited.config, "client")

    with pytest.raises(mesh.PeerRefused) as info:
        node.start("login", username="ada", password=PASSWORD)

    assert "different version" in str(info.value)
    assert "login" in str(info.value)
    assert info.value.machine == "server"
    ours = load_config(edited.config).flows["login"].digest
    theirs = load_config(login_mesh.config).flows["login"].digest
    assert f"server has digest {theirs}, the call has '{ours}'" in str(info.value)
    assert PASSWORD not in str(info.value)
    # The request that was not edited still runs.
    assert node.start("feed").steps[-1].machine == "server"


def test_unknown_request_is_a_clear_error(login_mesh: MeshDir, connect) -> None:
    """Starting a request no flow file has names it and the known ones."""
    node = connect(login_mesh.config, "client")

    with pytest.raises(mesh.MeshError) as info:
        node.start("logout", username="ada")

    assert "'logout'" in str(info.value)
    assert "login" in str(info.value)
    assert "feed" in str(info.value)


# -- no deadlock when flows cross machines in opposite orders ----------------------------

CROSS_FLOW = "ab,A starts ab,a\nab,B finishes ab,b\nba,B starts ba,b\nba,A finishes ba,a\n"

CROSS_SERVICE = """
import time

import structlog

import mesh
from mesh.config import load_config

log = structlog.get_logger()


@mesh.handler("ab", "A starts ab")
def a_starts(ctx):
    time.sleep(0.5)  # hold this worker while the other order fills up the other peer
    log.info("next", first="a")


@mesh.handler("ab", "B finishes ab")
def b_finishes(ctx):
    time.sleep(0.1)
    log.info("next", second="b")


@mesh.handler("ba", "B starts ba")
def b_starts(ctx):
    time.sleep(0.5)
    log.info("next", first="b")


@mesh.handler("ba", "A finishes ba")
def a_finishes(ctx):
    time.sleep(0.1)
    log.info("next", second="a")
"""


def test_crossing_flows_do_not_deadlock(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """64 flows A→B and 64 B→A at once, default settings, from an outside caller: all finish."""
    mesh_dir.flow(CROSS_FLOW, "cross.csv")
    mesh_dir.service(CROSS_SERVICE)
    mesh_dir.write_config({"caller": False, "a": True, "b": True}, flow="cross.csv")
    mesh_dir.fix_ports()  # a and b dial each other: each must know the other's port first
    peers.start(mesh_dir, "a")
    peers.start(mesh_dir, "b")
    node = connect(mesh_dir.config, "caller")
    jobs = [("ab", i) for i in range(64)] + [("ba", i) for i in range(64)]

    def run(job: tuple[str, int]) -> mesh.FlowResult:
        request, n = job
        return node.start(request, n=n)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))  # a deadlock would end each in FlowTimeout

    for (request, n), result in zip(jobs, results, strict=True):
        first, second = request
        assert result.context == {"n": n, "first": first, "second": second}
        assert [s.machine for s in result.steps] == [first, second]


# -- handlers that break the rules ----------------------------------------------------

RULES_FLOW = (
    "Request\tLog\tMachine\n"
    "silent\tAsked for silence\tclient\n"
    "silent\tStaying silent\tserver\n"
    "silent\tSilence over\tclient\n"
    "opaque\tAsked for an object\tclient\n"
    "opaque\tMaking an object for :who\tserver\n"
    "opaque\tObject made\tclient\n"
    "slow\tAsked to wait\tclient\n"
    "slow\tWaiting a while\tserver\n"
    "slow\tWait over\tclient\n"
    "quiet\tAsked quietly\tclient\n"
    "quiet\tAnswering at debug level\tserver\n"
    "leaky\tAsked to check #token for :who\tclient\n"
    "leaky\tChecking the token of :who\tserver\n"
)

RULES_SERVICE = """
import socket
import time

import structlog

import mesh
from mesh.config import load_config

log = structlog.get_logger()


@mesh.handler("silent", "Staying silent")
def stay_silent(ctx):
    log.info("not the next event")


@mesh.handler("opaque", "Making an object for :who")
def make_object(ctx):
    log.info("next", widget=object())


@mesh.handler("slow", "Waiting a while")
def wait_a_while(ctx):
    if "tell_port" in ctx:  # let the test know the step has begun
        socket.create_connection(("127.0.0.1", ctx["tell_port"])).close()
    time.sleep(ctx.get("seconds", 3))
    log.info("next", waited=True)


@mesh.handler("quiet", "Answering at debug level")
def answer_quietly(ctx):
    log.debug("next", answered=True)  # the peer logs at info level


@mesh.handler("leaky", "Checking the token of :who")
def check_token(ctx):
    log.info("token check", note="the token is " + ctx["token"], token=ctx["token"])
    raise ValueError("token " + ctx["token"] + " is revoked")
"""


@pytest.fixture
def rules_mesh(mesh_dir: MeshDir) -> MeshDir:
    mesh_dir.flow(RULES_FLOW)
    mesh_dir.service(RULES_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    return mesh_dir


def test_handler_without_next_is_a_flow_violation(
    rules_mesh: MeshDir, peers: Peers, connect
) -> None:
    """A handler returning without "next" fails the flow with FlowViolation naming its line."""
    peers.start(rules_mesh, "server")
    node = connect(rules_mesh.config, "client")

    with pytest.raises(mesh.FlowViolation) as info:
        node.start("silent")

    err = info.value
    assert isinstance(err, mesh.FlowError)
    assert err.machine == "server"
    assert err.line_index == 1
    assert err.line == "Staying silent"
    assert "Staying silent" in str(err)
    assert '"next"' in str(err)


def test_non_json_context_value_is_a_context_error(
    rules_mesh: MeshDir, peers: Peers, connect
) -> None:
    """A handler logging next with an object() fails with ContextError naming the key."""
    server = peers.start(rules_mesh, "server")
    node = connect(rules_mesh.config, "client")

    with pytest.raises(mesh.FlowError) as info:
        node.start("opaque", who="ada")

    err = info.value
    assert isinstance(err, mesh.ContextError)
    assert err.error_type == "ContextError"
    assert err.machine == "server"
    assert err.line_index == 1
    assert "ContextError" in str(err)
    assert "'widget'" in str(err)
    assert server.alive()


def test_context_too_large_fails_at_the_sender(login_mesh: MeshDir, connect) -> None:
    """A context over the message limit is a ContextError naming its size, before sending."""
    from mesh.wire import DEFAULT_MAX_MESSAGE_BYTES

    node = connect(login_mesh.config, "client")  # no server running: nothing may be sent
    with pytest.raises(
        mesh.ContextError,
        match=r"bytes of JSON; the call to server would be [0-9,]+ bytes,"
        r" over the 4,194,304-byte limit",
    ):
        node.start("login", username="ada", password="x" * DEFAULT_MAX_MESSAGE_BYTES)


def test_context_error_before_sending(login_mesh: MeshDir, connect) -> None:
    """A non-JSON value given to start() is a ContextError naming the key, before any call."""
    node = connect(login_mesh.config, "client")  # no server running: nothing may be sent

    with pytest.raises(mesh.ContextError) as info:
        node.start("login", username="ada", password=PASSWORD, when=object())

    assert "'when'" in str(info.value)


def test_flow_deadline(rules_mesh: MeshDir, peers: Peers, connect) -> None:
    """A handler sleeping past start(timeout=1) gives FlowTimeout about a second later,
    not when the step ends."""
    peers.start(rules_mesh, "server")
    node = connect(rules_mesh.config, "client")

    began = time.monotonic()
    with pytest.raises(mesh.FlowTimeout) as info:
        node.start("slow", seconds=6, timeout=1)
    elapsed = time.monotonic() - began

    # The deadline is the promise under test: not before it, and well before the 6 s step
    # ends (4 s of slack, for a loaded machine).
    assert 0.9 <= elapsed < 5, f"FlowTimeout after {elapsed:.2f} s"
    assert info.value.machine == "server"
    assert "slow" in str(info.value)


def test_next_at_debug_level_still_hands_off(rules_mesh: MeshDir, peers: Peers, connect) -> None:
    """A handler logging "next" below the peer's log level still ends its line."""
    peers.start(rules_mesh, "server")
    node = connect(rules_mesh.config, "client")

    result = node.start("quiet")

    assert result.context == {"answered": True}


def test_secret_never_leaks_from_a_failing_handler(
    rules_mesh: MeshDir, peers: Peers, connect, capfd
) -> None:
    """A #secret a handler logs and puts in its exception shows as *** everywhere."""
    token = "tok-5f3a9e1c77"
    server = peers.start(rules_mesh, "server")
    node = connect(rules_mesh.config, "client")

    with pytest.raises(mesh.FlowError) as info:
        node.start("leaky", token=token, who="ada")

    assert info.value.error_type == "ValueError"
    assert "is revoked" in str(info.value)
    assert "***" in str(info.value)
    checks = [e for e in server.events() if e.get("event") == "token check"]
    assert len(checks) == 1
    assert checks[0]["token"] == "***"
    assert checks[0]["note"] == "the token is ***"
    captured = capfd.readouterr()
    for text in (str(info.value), server.log_text(), captured.out, captured.err):
        assert token not in text


def test_sigterm_lets_a_flow_in_progress_finish(rules_mesh: MeshDir, peers: Peers, connect) -> None:
    """SIGTERM to a peer busy with a step lets that flow finish, then the peer exits 0."""
    server = peers.start(rules_mesh, "server")
    node = connect(rules_mesh.config, "client")
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(20)
        port = listener.getsockname()[1]
        flow = pool.submit(node.start, "slow", tell_port=port, seconds=1.0, timeout=20)
        listener.accept()[0].close()  # the handler has begun its step
        os.kill(server.pid, signal.SIGTERM)
        result = flow.result(timeout=20)

    assert result.context["waited"] is True
    assert server.proc.wait(timeout=20) == 0
    assert "mesh.peer_stopped" in server.log_text()
    with pytest.raises(mesh.PeerUnavailable):
        node.start("quiet", timeout=5)


def test_second_peer_on_a_taken_port_fails(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """A second peer for a port already served exits non-zero saying the address is in use."""
    first = peers.start(login_mesh, "server")
    second = peers.start(login_mesh, "server", wait=False)
    second.expect_exit = None  # it fails on purpose: its port is taken

    assert second.proc.wait(timeout=30) != 0
    assert "address in use" in second.log_text()
    assert first.alive()
    node = connect(login_mesh.config, "client")
    result = node.start("login", username="ada", password=PASSWORD)
    assert flow_lines(first.events(), result.flow_id) == SERVER_LINES
