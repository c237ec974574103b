"""The ``mesh`` command line, run as a user runs it: subprocesses against real peers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import mesh_env
from support.meshdir import LOGIN_FLOW, LOGIN_SERVICE, MeshDir, password_of
from support.peers import Peers
from support.processes import alive

PASSWORD = password_of("ada")

CLI_FLOW = LOGIN_FLOW + "echo\tEchoing values\tserver\n"
INDEX_CSV = (
    "index,Checking if signed in,server\n"
    "index,Generating list of questions,server\n"
    "index,Sending sign in email,emailservice\n"
)

ECHO_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("echo", "Echoing values")
def echo(ctx):
    log.info("next", types={key: type(value).__name__ for key, value in ctx.items()})


@mesh.handler("index", "Sending sign in email")
def send_sign_in_email(ctx):
    log.info("next", emailed=ctx.get("username", "nobody"))
"""


def mesh_cmd(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``mesh ARGS`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mesh_env(),
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single error line a failing command printed; fails on tracebacks or more lines."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [
        line
        for line in done.stderr.splitlines()
        if line.startswith(("mesh ", "error:")) and not line.startswith("mesh peer ")
    ]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.fixture
def cli_mesh(mesh_dir: MeshDir) -> MeshDir:
    """login, echo (flow.tsv) and index (index.csv): client (no address), server, emailservice."""
    mesh_dir.flow(CLI_FLOW)
    mesh_dir.flow(INDEX_CSV, "index.csv")
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.service(ECHO_SERVICE)
    mesh_dir.write_config(
        {"client": False, "server": True, "emailservice": True}, flow=["flow.tsv", "index.csv"]
    )
    return mesh_dir


# -- mesh check ------------------------------------------------------------------------


def test_check_prints_each_plan(cli_mesh: MeshDir) -> None:
    """`mesh check` on a good config prints every request's lines, machines and handlers."""
    done = mesh_cmd("check", "-c", cli_mesh.config)

    assert done.returncode == 0, done.stderr
    out = done.stdout
    for request in ("login", "feed", "echo", "index"):
        assert re.search(rf"^{request}\b", out, re.MULTILINE), out
    login, echo_service = cli_mesh.services
    rows = {
        "Testing password for :username": ("server", f"{login}.test_password"),
        "Setting session for :username": ("server", f"{login}.set_session"),
        "Finish handling user login": ("server", "pass-through"),
        "Login successful": ("client", "pass-through"),
        "Sending sign in email": ("emailservice", f"{echo_service}.send_sign_in_email"),
    }
    for text, (machine, handler) in rows.items():
        row = next(line for line in out.splitlines() if text in line)
        assert machine in row.split(), row
        assert handler in row.split(), row
    assert "ok:" in out


@pytest.mark.parametrize(
    ("content", "row", "what"),
    [
        pytest.param(
            "Request\tLog\tMachine\nlogin\tHello\tserver\nlogin\tOnly two cells\n",
            3,
            "column",
            id="wrong-column-count",
        ),
        pytest.param(
            "Request\tLog\tMachine\nlogin\tHello\tserver\n\nlogin\t\tserver\n",
            4,
            "empty",
            id="empty-log-cell",
        ),
        pytest.param(
            "login,Hello,server\nlogin,Again,server\nlogin,Hello,server\n",
            3,
            "Hello",
            id="same-line-twice",
        ),
    ],
)
def test_check_malformed_flow_file(mesh_dir: MeshDir, content: str, row: int, what: str) -> None:
    """`mesh check` on a malformed flow file exits 1 with one PATH:ROW: line, no traceback."""
    path = mesh_dir.flow(content)
    mesh_dir.write_config({"server": True})

    line = one_line_error(mesh_cmd("check", "-c", mesh_dir.config))

    assert f"{path}:{row}: " in line
    assert what.lower() in line.lower()


@pytest.mark.parametrize(
    ("machines", "extra", "fragment"),
    [
        pytest.param({"client": False}, "", "[machines] has no entry for 'server'", id="machine"),
        pytest.param(
            {"client": False, "server": "nohost"},
            "",
            "machines.server: address 'nohost' is malformed",
            id="address",
        ),
        pytest.param(
            {"client": False, "server": True},
            "[tls]\nca = 3",
            "tls.ca must be a file name",
            id="tls",
        ),
        pytest.param(
            {"client": False, "server": True},
            'token_file = "no-such-token"',
            "token_file: no such file",
            id="token-file",
        ),
    ],
)
def test_config_errors_are_one_line_naming_file_and_key(
    mesh_dir: MeshDir,
    machines: dict[str, bool | str],
    extra: str,
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unknown machine, malformed address, bad [tls], missing token file: exit 1, one line
    that starts with the config's path."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)  # it would stand in for the token file
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.write_config(machines, extra=extra)
    line = one_line_error(mesh_cmd("check", "-c", mesh_dir.config))
    assert line.startswith(f"mesh check: {mesh_dir.config}: ")
    assert fragment in line


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        pytest.param(None, "services: cannot import", id="missing"),
        pytest.param("raise RuntimeError('boom')", "failed: RuntimeError: boom", id="raising"),
    ],
)
def test_services_that_cannot_be_imported(
    mesh_dir: MeshDir, code: str | None, fragment: str
) -> None:
    """A services module that is missing or raises: exit 1 from check and peer, one line."""
    mesh_dir.flow(LOGIN_FLOW)
    module = mesh_dir.service(code or "")
    if code is None:
        (mesh_dir.root / f"{module}.py").unlink()
    mesh_dir.write_config({"client": False, "server": True})
    for args in (["check"], ["peer", "server"]):
        line = one_line_error(mesh_cmd(*args, "-c", mesh_dir.config))
        assert line.startswith(f"mesh {args[0]}: {mesh_dir.config}: services")
        assert fragment in line
        assert module in line


def test_missing_config_and_unknown_machine(mesh_dir: MeshDir) -> None:
    """A -c path that does not exist, and `mesh peer` for a machine [machines] lacks."""
    missing = one_line_error(mesh_cmd("check", "-c", mesh_dir.root / "nope.toml"))
    assert missing.endswith("nope.toml: config given with -c does not exist")
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.write_config({"client": False, "server": True})
    unknown = one_line_error(mesh_cmd("peer", "sever", "-c", mesh_dir.config))
    assert unknown == (
        f"mesh peer: {mesh_dir.config}: machine 'sever' is not in [machines]"
        " (did you mean 'server'?)"
    )
    unknown = one_line_error(mesh_cmd("peer", "zebra", "-c", mesh_dir.config))
    assert unknown.endswith("machine 'zebra' is not in [machines] (known: client, server)")
    unknown = one_line_error(mesh_cmd("call", "login", "--as", "clinet", "-c", mesh_dir.config))
    assert unknown.endswith("machine 'clinet' is not in [machines] (did you mean 'client'?)")


def test_check_handler_for_a_line_no_flow_has(mesh_dir: MeshDir) -> None:
    """A handler for a line missing from the flow file fails `mesh check` and `mesh peer`."""
    mesh_dir.flow(LOGIN_FLOW)
    module = mesh_dir.service(
        """
        import mesh


        @mesh.handler("login", "Testing passwd for :username")
        def test_passwd(ctx):
            pass
        """
    )
    mesh_dir.write_config({"client": False, "server": True})

    line = one_line_error(mesh_cmd("check", "-c", mesh_dir.config))
    assert f"{module}.test_passwd" in line
    assert "Testing passwd for :username" in line
    assert "Testing password for :username" in line  # the near miss is suggested

    peer = one_line_error(mesh_cmd("peer", "server", "-c", mesh_dir.config, timeout=30))
    assert f"{module}.test_passwd" in peer
    assert "Testing passwd for :username" in peer


def test_check_line_an_address_less_machine_cannot_receive(mesh_dir: MeshDir) -> None:
    """A line for a machine with no address, not upstream at that point, is reported at file:row."""
    flow = mesh_dir.flow(
        "Request\tLog\tMachine\n"
        "notify\tAsked to notify\tclient\n"
        "notify\tQueueing notification\tserver\n"
        "notify\tRinging the phone\tphone\n"
    )
    mesh_dir.write_config({"client": False, "server": True, "phone": False})

    line = one_line_error(mesh_cmd("check", "-c", mesh_dir.config))

    assert f"{flow}:4: " in line
    assert "phone" in line
    assert "no address" in line


def test_config_from_env_or_current_folder(cli_mesh: MeshDir, tmp_path: Path) -> None:
    """Without -c, commands use $MESH_CONFIG, else ./mesh.toml; a missing one is named."""
    env = mesh_env()
    run = [sys.executable, "-m", "mesh", "check"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    by_env = subprocess.run(
        run,
        capture_output=True,
        text=True,
        env={**env, "MESH_CONFIG": str(cli_mesh.config)},
        cwd=elsewhere,
        timeout=60,
        check=False,
    )
    assert by_env.returncode == 0, by_env.stderr
    assert "Testing password for :username" in by_env.stdout

    by_cwd = subprocess.run(
        run, capture_output=True, text=True, env=env, cwd=cli_mesh.root, timeout=60, check=False
    )
    assert by_cwd.returncode == 0, by_cwd.stderr

    missing = subprocess.run(
        run, capture_output=True, text=True, env=env, cwd=elsewhere, timeout=60, check=False
    )
    line = one_line_error(missing)
    assert "mesh.toml" in line


# -- mesh call ---------------------------------------------------------------------------


def test_call_json_prints_one_object(cli_mesh: MeshDir, peers: Peers) -> None:
    """`mesh call --json` prints exactly one JSON object: flow_id, masked context, steps."""
    server = peers.start(cli_mesh, "server")

    done = mesh_cmd(
        "call", "login", "username=ada", f"password={PASSWORD}", "--json", "-c", cli_mesh.config
    )

    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout
    out = json.loads(done.stdout)
    assert set(out) == {"flow_id", "context", "steps"}
    assert out["context"] == {
        "username": "ada",
        "password": "***",
        "verified": True,
        "session": "session-ada",
    }
    assert [(s["index"], s["machine"]) for s in out["steps"]] == [
        (0, "client"),
        (1, "server"),
        (2, "server"),
        (3, "server"),
        (4, "server"),
        (5, "client"),
    ]
    assert out["steps"][0]["line"] == "User attempted login as ada and ***"
    assert all(isinstance(s["ms"], int | float) and s["ms"] >= 0 for s in out["steps"])
    assert out["flow_id"] in done.stderr  # the client's log lines go to stderr
    assert out["flow_id"] in server.log_text()
    for text in (done.stdout, done.stderr, server.log_text()):
        assert PASSWORD not in text


def test_call_params_are_strings_or_json(cli_mesh: MeshDir, peers: Peers) -> None:
    """key=value arrives as a string and key:=json as its JSON type (qty:=3 is the int 3)."""
    peers.start(cli_mesh, "server")

    done = mesh_cmd(
        "call",
        "echo",
        "name=3",
        "qty:=3",
        "ok:=true",
        'tags:=["a"]',
        "price:=1.5",
        "--json",
        "-c",
        cli_mesh.config,
    )

    assert done.returncode == 0, done.stderr
    context = json.loads(done.stdout)["context"]
    assert context["name"] == "3"
    assert context["qty"] == 3
    assert context["ok"] is True
    assert context["tags"] == ["a"]
    assert context["types"] == {
        "name": "str",
        "qty": "int",
        "ok": "bool",
        "tags": "list",
        "price": "float",
    }


def test_call_failure_is_one_line(cli_mesh: MeshDir, peers: Peers) -> None:
    """A failed step makes `mesh call` exit 1 with one line naming machine and line, no secret."""
    peers.start(cli_mesh, "server")

    done = mesh_cmd("call", "login", "username=ada", "password=not-hunter2", "-c", cli_mesh.config)

    line = one_line_error(done)
    assert "server" in line
    assert "line 2" in line
    assert "PermissionError: invalid credentials" in line
    assert "not-hunter2" not in done.stdout + done.stderr


def test_call_unknown_request_and_bad_params(cli_mesh: MeshDir) -> None:
    """An unknown request or a bad key:=json argument is a one-line error, exit 1."""
    line = one_line_error(mesh_cmd("call", "logout", "-c", cli_mesh.config))
    assert "'logout'" in line
    assert "login" in line

    line = one_line_error(mesh_cmd("call", "echo", "qty:=three", "-c", cli_mesh.config))
    assert "qty:=three" in line


def test_call_with_peer_down_is_unavailable(cli_mesh: MeshDir) -> None:
    """`mesh call` with no server running says the server is unavailable, at once: it does
    not wait for the flow's deadline, an hour here, far past the command's 60 s timeout."""
    done = mesh_cmd("call", "echo", "--timeout", "3600", "-c", cli_mesh.config)

    line = one_line_error(done)
    assert "server is unavailable" in line
    assert cli_mesh.addresses["server"] in line


# -- mesh up -----------------------------------------------------------------------------


def test_up_serves_calls_and_stops_its_peers(cli_mesh: MeshDir, up) -> None:
    """`mesh up` starts every addressed machine, calls work, SIGTERM stops all its peers."""
    cli_mesh.fix_ports()  # mesh up binds the ports its config names
    running = up(cli_mesh.config)
    running.wait_healthy(2)
    assert set(running.peer_pids) == {"server", "emailservice"}
    assert all(alive(pid) for pid in running.peer_pids.values())

    login = mesh_cmd(
        "call", "login", "username=ada", f"password={PASSWORD}", "--json", "-c", cli_mesh.config
    )
    assert login.returncode == 0, login.stderr
    assert json.loads(login.stdout)["context"]["session"] == "session-ada"
    index = mesh_cmd("call", "index", "username=ada", "--json", "-c", cli_mesh.config)
    assert index.returncode == 0, index.stderr
    steps = json.loads(index.stdout)["steps"]
    assert [s["machine"] for s in steps] == ["server", "server", "emailservice"]

    os.kill(running.pid, signal.SIGTERM)
    assert running.proc.wait(30) == 0
    for name, pid in running.peer_pids.items():
        assert not alive(pid), f"peer {name} (pid {pid}) outlived mesh up"


def test_up_log_dir_keeps_json_logs_for_mesh_logs(mesh_dir: MeshDir, up, tmp_path: Path) -> None:
    """`mesh up --log-dir DIR` writes each peer's JSON log to DIR/MACHINE.log (replica K:
    MACHINE.K.log) while the console still shows readable lines; `mesh logs DIR/*.log`
    right after a call reports the flow ok. Before, mesh up relayed console text only, so
    there was nothing for mesh logs to read."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": 2})
    mesh_dir.fix_ports()
    logs = tmp_path / "logs"
    running = up(mesh_dir.config, "--log-dir", str(logs))
    running.wait_healthy(2)

    call = mesh_cmd(
        "call", "login", "username=ada", f"password={PASSWORD}", "--json",
        "--log-file", logs / "client.log", "-c", mesh_dir.config,
    )  # fmt: skip
    assert call.returncode == 0, call.stderr
    flow_id = json.loads(call.stdout)["flow_id"]
    running.expect(r"^server\.\d \| .*Finish handling user login")
    os.kill(running.pid, signal.SIGTERM)
    assert running.proc.wait(30) == 0

    assert sorted(p.name for p in logs.iterdir()) == ["client.log", "server.1.log", "server.2.log"]
    served = [json.loads(line) for p in logs.glob("server.*.log") for line in p.open()]
    assert any(e.get("event") == "mesh.peer_ready" for e in served)
    assert not any(line.startswith("server.1 | {") for line in running.seen)  # not raw JSON
    report = mesh_cmd("logs", *sorted(logs.glob("*.log")), "-c", mesh_dir.config)
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"login  flow {flow_id}  6 of 6 lines  ok" in report.stdout


def test_up_reports_a_peer_that_dies(cli_mesh: MeshDir, up) -> None:
    """When one of its peers dies, `mesh up` says which; SIGTERM still stops the others."""
    cli_mesh.fix_ports()  # mesh up binds the ports its config names
    running = up(cli_mesh.config)
    running.wait_healthy(2)

    os.kill(running.peer_pids["emailservice"], signal.SIGKILL)
    line = running.expect(r"^mesh up: .*emailservice.*exited")

    assert str(running.peer_pids["emailservice"]) in line
    assert running.proc.poll() is None
    os.kill(running.pid, signal.SIGTERM)
    running.proc.wait(30)
    assert not alive(running.peer_pids["server"])


def test_up_fails_at_once_when_a_port_is_taken(cli_mesh: MeshDir, peers: Peers) -> None:
    """A peer left from an earlier run still holds server's port: `mesh up` exits 1 with one
    line naming the taken port, never says its peers are healthy, and leaves none of its own
    running. Before, the leftover answered the health probe, `mesh up` reported "2 peers
    healthy" and its own server died with "address in use" behind it."""
    leftover = peers.start(cli_mesh, "server")  # its port goes into the config
    cli_mesh.fix_ports("emailservice")
    port = cli_mesh.addresses["server"]

    done = mesh_cmd("up", "-c", cli_mesh.config)

    line = one_line_error(done)
    assert port in line and "in use" in line, line
    assert "server" in line
    assert "peers healthy" not in done.stdout
    for pid in re.findall(r"\(pid (\d+)\)", done.stdout):
        assert int(pid) == leftover.pid or not alive(int(pid)), done.stdout
    assert leftover.alive()  # the process that held the port is not ours to stop


def test_check_warns_when_only_an_address_less_starter_reaches_a_line(mesh_dir: MeshDir) -> None:
    """A flow that comes back to an address-less client works when the client starts it."""
    mesh_dir.flow("Request\tLog\tMachine\nping\tPinging\tserver\nping\tPonged\tclient\n")
    mesh_dir.write_config({"client": False, "server": True})

    done = mesh_cmd("check", "-c", mesh_dir.config)

    assert done.returncode == 0, done.stderr
    assert "ping reaches client only when started by client" in done.stderr
    assert "mesh call --as client" in done.stderr


def test_parse_params_types_and_reserved_names() -> None:
    """key=value is a string, key:=json is JSON; "timeout" is an ordinary context key."""
    from mesh.cli import parse_params
    from mesh.errors import MeshError

    assert parse_params(["a=1", "b:=1", "ok:=true", 'tags:=["x"]', "url=http://h:=1"]) == {
        "a": "1",
        "b": 1,
        "ok": True,
        "tags": ["x"],
        "url": "http://h:=1",
    }
    assert parse_params(["timeout=5"]) == {"timeout": "5"}
    with pytest.raises(MeshError, match="expected key=value"):
        parse_params(["novalue"])
    with pytest.raises(MeshError, match="is not JSON"):
        parse_params(["n:={bad"])


# -- replicas ----------------------------------------------------------------------------


def test_up_starts_every_replica_and_they_share_calls(mesh_dir: MeshDir, up) -> None:
    """`mesh up` with server at 2 replicas starts server.1 and server.2; calls reach both."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": 2})
    mesh_dir.fix_ports()  # mesh up binds the ports its config names
    running = up(mesh_dir.config)
    running.wait_healthy(2)
    assert set(running.peer_pids) == {"server.1", "server.2"}

    # Each `mesh call` is a new process whose round_robin may start at either replica:
    # call until both have served one (each call must succeed), with a generous limit.
    served: set[str] = set()
    for n in range(40):
        user = f"user{n}"
        done = mesh_cmd(
            "call",
            "login",
            f"username={user}",
            f"password={password_of(user)}",
            "-c",
            mesh_dir.config,
        )
        assert done.returncode == 0, done.stderr
        line = running.expect(rf"Testing password for {user}\b")
        served.add(line.split(" | ")[0].strip())
        if served == {"server.1", "server.2"}:
            break
    assert served == {"server.1", "server.2"}

    os.kill(running.pid, signal.SIGTERM)
    assert running.proc.wait(30) == 0
    assert not any(alive(pid) for pid in running.peer_pids.values())


def test_peer_says_where_it_listens(login_mesh: MeshDir, connect) -> None:
    """`mesh peer --listen 127.0.0.1:0` prints the port the kernel gave it and its pid, in
    one line on stderr a parent process can read (the tests find their peers by it)."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mesh", "peer", "server", "--listen", "127.0.0.1:0"),
            *("--log-file", os.devnull, "-c", str(login_mesh.config)),
        ],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=mesh_env(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().rstrip("\n")
        m = re.fullmatch(r"mesh peer server listening on 127\.0\.0\.1:(\d+) \(pid (\d+)\)", line)
        assert m, line
        assert int(m.group(1)) > 0
        assert int(m.group(2)) == proc.pid
        config = login_mesh.write_config(
            {"client": False, "server": f"127.0.0.1:{m.group(1)}"}, name="bound.toml"
        )
        result = connect(config, "client").start("login", username="ada", password=PASSWORD)
        assert result.steps[1].machine == "server"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_peer_of_a_replicated_machine_needs_a_replica(mesh_dir: MeshDir) -> None:
    """`mesh peer server` with 2 replicas and no --replica, or a wrong one, is one line."""
    mesh_dir.flow(CLI_FLOW)
    mesh_dir.write_config({"client": False, "server": 2})

    none = one_line_error(mesh_cmd("peer", "server", "-c", mesh_dir.config))
    assert (
        none == "mesh peer: server has 2 replicas; pick one with --replica 1..2 (or give --listen)"
    )
    wrong = one_line_error(mesh_cmd("peer", "server", "--replica", "3", "-c", mesh_dir.config))
    assert wrong == "mesh peer: server has 2 replicas; --replica 3 is not in 1..2"


def test_check_lists_every_replica(mesh_dir: MeshDir) -> None:
    """`mesh check` shows a replicated machine's dial target and each replica's bind."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.write_config({"client": False, "server": 2})
    first, second = mesh_dir.replicas["server"]

    done = mesh_cmd("check", "-c", mesh_dir.config)

    assert done.returncode == 0, done.stderr
    assert f"ipv4:{first},{second}  listens on {first}, {second}" in done.stdout
