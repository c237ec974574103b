"""Who may call a peer, over what: tokens, the flow file as access list, TLS and mutual TLS.

Real peers in separate processes, certificates made in the test with ``mesh.tools.certs``, and
callers that are the real originator (``mesh.connect``) or a raw gRPC channel where the test
needs to misbehave on purpose.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cli import mesh_env, run_mesh
from support.meshdir import LOGIN_FLOW, MeshDir, password_of
from support.peers import Peer, Peers

import mesh
from mesh import runtime
from mesh.addresses import is_loopback
from mesh.config import load_config
from mesh.tools.certs import make_certs
from mesh.transport import Transport
from mesh.v1 import mesh_pb2 as _pb2
from mesh.v1 import mesh_pb2_grpc as _pb2_grpc

TOKEN = "tok-" + "7f3a9c" * 5

MTLS = """
[tls]
ca = "certs/ca.pem"
cert = "certs/{machine}.pem"
key = "certs/{machine}.key"
require_client_cert = true
"""


def session_steps(peer: Peer) -> list[dict[str, object]]:
    """The events of lines 1-4 (the server's handlers and pass-throughs) in a peer's log."""
    return [
        e
        for e in peer.events()
        if e.get("request") == "login" and e.get("event", "").startswith(("Testing", "Setting"))
    ]


def refusals(peer: Peer) -> list[dict[str, object]]:
    return [e for e in peer.events() if e.get("event") == "mesh.refused"]


# --- the token -----------------------------------------------------------------------------


@pytest.fixture
def token_mesh(login_mesh: MeshDir) -> MeshDir:
    """The login mesh with ``token_file = "token"`` in its mesh.toml."""
    (login_mesh.root / "token").write_text(TOKEN + "\n")
    login_mesh.write_config({"client": False, "server": True}, extra='token_file = "token"')
    return login_mesh


def test_login_with_the_token(token_mesh: MeshDir, peers: Peers, connect, monkeypatch) -> None:
    """With a token on both sides, login runs across the peers, hand-back included."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    server = peers.start(token_mesh, "server")
    node = connect(token_mesh.config, "client")
    result = node.start("login", username="ada", password=password_of("ada"))
    assert result.context["session"] == "session-ada"
    assert [s.machine for s in result.steps] == ["client"] + ["server"] * 4 + ["client"]
    assert TOKEN not in server.log_text()
    assert not [e for e in server.events() if e.get("event") == "mesh.plaintext"]  # loopback


def test_no_token_is_unauthenticated(
    token_mesh: MeshDir, peers: Peers, connect, monkeypatch
) -> None:
    """A caller without the token is refused UNAUTHENTICATED, and no line runs on the peer."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    server = peers.start(token_mesh, "server")
    no_token = token_mesh.write_config({"client": False, "server": True}, name="no-token.toml")
    node = connect(no_token, "client")
    with pytest.raises(mesh.AccessDenied, match=r"server.*missing or wrong token.*UNAUTHENTICATED"):
        node.start("login", username="ada", password=password_of("ada"))
    assert not session_steps(server)
    assert not [e for e in server.events() if e.get("event") == "Received request to login as ada"]
    assert [e["code"] for e in refusals(server)] == ["UNAUTHENTICATED"]


def test_wrong_token_is_unauthenticated(
    token_mesh: MeshDir, peers: Peers, connect, monkeypatch
) -> None:
    """$MESH_TOKEN overrides the file; a wrong one is refused like none, never shown."""
    server = peers.start(token_mesh, "server")
    monkeypatch.setenv("MESH_TOKEN", "not-the-token-" + "0" * 10)
    node = connect(token_mesh.config, "client")
    with pytest.raises(mesh.AccessDenied, match="UNAUTHENTICATED") as info:
        node.start("login", username="ada", password=password_of("ada"))
    assert isinstance(info.value, mesh.PeerRefused)
    assert not session_steps(server)
    assert "not-the-token" not in server.log_text()
    assert "not-the-token" not in str(info.value)


def test_refusal_further_down_arrives_as_access_denied(
    mesh_dir: MeshDir, peers: Peers, connect, monkeypatch
) -> None:
    """A peer two hops away that refuses the token: the originator gets AccessDenied naming
    that peer, carried back through the one in between."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    mesh_dir.flow(AUDIT_FLOW)
    (mesh_dir.root / "token").write_text(TOKEN)
    mesh_dir.write_config(
        {"client": False, "server": True, "audit": True}, extra='token_file = "token"'
    )
    audit = peers.start(mesh_dir, "audit", env={"MESH_TOKEN": "another-token-" + "9" * 10})
    peers.start(mesh_dir, "server")  # after audit, which it dials
    node = connect(mesh_dir.config, "client")
    with pytest.raises(mesh.AccessDenied) as info:
        node.start("login", username="ada", password="pw")
    assert info.value.machine == "audit"
    assert "UNAUTHENTICATED" in str(info.value)
    assert [e["code"] for e in refusals(audit)] == ["UNAUTHENTICATED"]


def test_health_needs_no_token(token_mesh: MeshDir, peers: Peers) -> None:
    """peers.start waited on gRPC health without a token: probes stay open."""
    server = peers.start(token_mesh, "server")
    assert server.alive()
    assert not refusals(server)


# --- the flow file as access list ----------------------------------------------------------


def send_line(node: mesh.Node, state: Any, machine: str, index: int) -> Any:
    """Send line ``index`` of ``state``'s flow to ``machine`` over the node's link, as the
    runtime would if the flow file let this machine do so; the reply, absorbed."""
    payload = runtime.request_bytes(state, machine, index)
    return runtime.absorb(state, machine, index, node.call(machine, payload, state.deadline, ""))


def test_line_3_sent_directly_is_refused(
    token_mesh: MeshDir, peers: Peers, connect, monkeypatch
) -> None:
    """An authenticated client sending login line 3 itself is PERMISSION_DENIED: only server,
    which runs line 2, may hand the flow on to line 3. Its handler never runs."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    server = peers.start(token_mesh, "server")
    node = connect(token_mesh.config, "client")
    state = node.new_state(node.flows["login"], {"username": "ada", "password": "x" * 8})
    with pytest.raises(mesh.AccessDenied) as info:
        send_line(node, state, "server", 3)
    message = str(info.value)
    assert "PERMISSION_DENIED" in message
    assert "client may not send login line 3 'Setting session for :username'" in message
    assert "only server, which runs line 2" in message
    assert not session_steps(server)
    [refused] = refusals(server)
    assert refused["code"] == "PERMISSION_DENIED"
    assert refused["caller"] == "client"
    assert refused["line_index"] == 3
    # The same client may still start a flow: line 0's sender is anyone authenticated.
    assert node.start("login", username="ada", password=password_of("ada")).context["verified"]


def test_access_list_holds_without_a_token(login_mesh: MeshDir, peers: Peers, connect) -> None:
    """Without a token the access list still refuses a line from the wrong machine."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")
    state = node.new_state(node.flows["login"], {"username": "ada", "password": "x" * 8})
    with pytest.raises(mesh.AccessDenied, match="PERMISSION_DENIED"):
        send_line(node, state, "server", 4)
    assert [e["line_index"] for e in refusals(server)] == [4]


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_mesh(login_mesh: MeshDir, dev_certs: Path) -> MeshDir:
    """The login mesh with the mutual-TLS [tls] table ``mesh certs`` suggests."""
    login_mesh.write_config({"client": False, "server": True}, extra=MTLS)
    return login_mesh


def test_login_over_mutual_tls(tls_mesh: MeshDir, peers: Peers, connect) -> None:
    """With certificates from mesh certs, login runs over mTLS across the peers."""
    server = peers.start(tls_mesh, "server", tls=True)
    node = connect(tls_mesh.config, "client")
    result = node.start("login", username="ada", password=password_of("ada"))
    assert result.context["session"] == "session-ada"
    assert len(session_steps(server)) == 2
    assert not [e for e in server.events() if e.get("event") == "mesh.plaintext"]


def test_replicas_behind_mutual_tls_and_a_token(
    login_mesh: MeshDir, dev_certs: Path, peers: Peers, connect, monkeypatch
) -> None:
    """Reliability and security together: two replicas of server, each serving mTLS and
    requiring the token. gRPC's client-side health checks pass the guard (they need no
    token), so round_robin keeps both replicas in use and every login succeeds."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    (login_mesh.root / "token").write_text(TOKEN + "\n")
    login_mesh.write_config({"client": False, "server": 2}, extra='token_file = "token"\n' + MTLS)
    replicas = [peers.start(login_mesh, "server", replica=k, tls=True) for k in (1, 2)]
    node = connect(login_mesh.config, "client")

    users = [f"user{n}" for n in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda u: node.start("login", username=u, password=password_of(u)), users)
        )

    assert [r.context["session"] for r in results] == [f"session-{u}" for u in users]
    counts = [len(session_steps(r)) // 2 for r in replicas]  # two logged lines per login
    assert sum(counts) == len(users), counts
    assert min(counts) >= len(users) // 4, counts  # both replicas serve, roughly evenly
    for replica in replicas:
        assert not refusals(replica)
        assert TOKEN not in replica.log_text()


def test_plaintext_caller_to_a_tls_peer(tls_mesh: MeshDir, peers: Peers, connect) -> None:
    """A caller whose config has no [tls] fails with PeerUnavailable naming the machine."""
    server = peers.start(tls_mesh, "server", tls=True)
    plain = tls_mesh.write_config({"client": False, "server": True}, name="plain.toml")
    node = connect(plain, "client")
    with pytest.raises(mesh.PeerUnavailable) as info:
        node.start("login", username="ada", password=password_of("ada"))
    assert info.value.machine == "server"
    assert str(info.value).startswith(f"server is unavailable at {server.address}")
    assert "if server serves TLS, this machine dials it in plaintext" in str(info.value)
    assert not session_steps(server)


def test_client_certificate_from_another_ca_is_refused(
    tls_mesh: MeshDir, peers: Peers, connect
) -> None:
    """A caller presenting a certificate that another CA signed never reaches a line."""
    server = peers.start(tls_mesh, "server", tls=True)
    make_certs(tls_mesh.root / "rogue", ["client"])
    rogue = tls_mesh.write_config(
        {"client": False, "server": True},
        name="rogue.toml",
        extra=MTLS.replace('cert = "certs/', 'cert = "rogue/').replace(
            'key = "certs/', 'key = "rogue/'
        ),
    )
    node = connect(rogue, "client")
    with pytest.raises(mesh.PeerUnavailable, match="TLS handshake with server failed"):
        node.start("login", username="ada", password=password_of("ada"))
    assert not session_steps(server)


def test_server_certificate_from_another_ca_is_refused(
    tls_mesh: MeshDir, peers: Peers, connect
) -> None:
    """A caller refuses a peer whose certificate its CA did not sign."""
    make_certs(tls_mesh.root / "rogue", ["server"])
    rogue_server = tls_mesh.write_config(
        {"client": False, "server": True},
        name="rogue-server.toml",
        extra=MTLS.replace('"certs/ca.pem"', '"rogue/ca.pem"')
        .replace('cert = "certs/', 'cert = "rogue/')
        .replace('key = "certs/', 'key = "rogue/'),
    )
    server = peers.start(tls_mesh, "server", config=rogue_server, tls=True)
    node = connect(tls_mesh.config, "client")
    with pytest.raises(mesh.PeerUnavailable, match=r"server is unavailable.*handshake"):
        node.start("login", username="ada", password=password_of("ada"))
    assert not session_steps(server)


def test_certificate_decides_who_calls(tls_mesh: MeshDir, peers: Peers) -> None:
    """Under mTLS the certificate names the caller: mesh-call's certificate claiming to be
    client (via) for line 1 is refused, and the refusal names the certificate."""
    server = peers.start(tls_mesh, "server", tls=True)
    config = load_config(tls_mesh.config)
    flow = config.flows["login"]
    channel = Transport.of(config, "mesh-call").open_channel("server", server.address)
    with channel:
        stub = _pb2_grpc.MeshStub(channel)
        request = _pb2.ContinueRequest(
            request="login",
            line_index=1,
            context=json.dumps({"username": "ada", "password": "x" * 8}).encode(),
            flow_id="a" * 32,
            digest=flow.digest,
            via=["client"],
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Continue(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate for mesh-call may not send login line 1" in info.value.details()
    assert not session_steps(server)


def test_mesh_call_and_mesh_up_over_mutual_tls(tls_mesh: MeshDir, tmp_path: Path) -> None:
    """The CLI end to end: mesh up probes its TLS peers' health, mesh call runs login as
    client, and a flow that starts on server from outside, presenting mesh-call's
    certificate."""
    tls_mesh.flow(LOGIN_FLOW + "ping\tPinging for :who\tserver\n")
    tls_mesh.fix_ports()  # mesh up binds the ports its config names
    env = mesh_env()
    up = subprocess.Popen(
        [sys.executable, "-m", "mesh", "up", "-c", str(tls_mesh.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert up.stdout is not None
        for raw in up.stdout:
            if b"peers healthy" in raw:
                break
        else:
            pytest.fail("mesh up ended before its peers were healthy")
        call = run_mesh(
            *("call", "login", "username=ada", f"password={password_of('ada')}"),
            *("--json", "-c", tls_mesh.config),
            cwd=tmp_path,
        )
        assert call.returncode == 0, call.stderr
        assert json.loads(call.stdout)["context"]["session"] == "session-ada"
        ping = run_mesh("call", "ping", "who=x", "-c", tls_mesh.config, cwd=tmp_path)
        assert ping.returncode == 0, ping.stderr
        assert "Pinging for x" in ping.stdout
    finally:
        up.terminate()
        up.wait(30)


def _in_a_network_namespace() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "-rn", "true"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_plaintext_beyond_loopback_warns(login_mesh: MeshDir, tmp_path: Path) -> None:
    """A plaintext peer listening on 0.0.0.0 logs a mesh.plaintext warning. It runs in a
    network namespace of its own (unshare), so nothing outside can reach it."""
    if not _in_a_network_namespace():
        pytest.skip("needs `unshare -rn` (util-linux, user namespaces) for a private network")
    log = tmp_path / "namespaced-peer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *("unshare", "-rn", sys.executable, "-m", "mesh", "peer", "server"),
                *("-c", str(login_mesh.config), "--listen", "0.0.0.0:50052", "--json"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=mesh_env(),
        )
    try:
        deadline = time.monotonic() + 60
        while b"mesh.peer_ready" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    [warning] = [e for e in events if e["event"] == "mesh.plaintext"]
    assert warning["level"] == "warning"
    assert warning["listen"] == "0.0.0.0:50052"
    assert "configure [tls]" in warning["advice"]


def test_loopback_is_the_only_plaintext_without_a_warning() -> None:
    """Which listen addresses make a plaintext peer warn (the peer logs mesh.plaintext)."""
    assert is_loopback("127.0.0.1:50052")
    assert is_loopback("[::1]:50052")
    assert is_loopback("localhost:50052")
    assert not is_loopback("0.0.0.0:50052")
    assert not is_loopback("[::]:50052")
    assert not is_loopback("10.0.0.5:50052")
    assert not is_loopback("server.internal:50052")


# --- secrets: nothing anywhere -------------------------------------------------------------

SECRET = "correct-horse-battery-staple"

#: login with a third machine, audit, that logs the secret on purpose, and a step whose
#: exception message quotes it.
AUDIT_FLOW = LOGIN_FLOW.replace(
    "login\tSetting session for :username\tserver\n",
    "login\tAuditing login of :username\taudit\nlogin\tSetting session for :username\tserver\n",
)

AUDIT_SERVICE = f"""
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Testing password for :username")
def test_password(ctx):
    if ctx["password"] != {SECRET!r}:
        raise PermissionError(f"wrong password {{ctx['password']}} for {{ctx['username']}}")
    log.info("next", verified=True)


@mesh.handler("login", "Setting session for :username")
def set_session(ctx):
    log.info("next", session="session-" + ctx["username"])


@mesh.handler("login", "Auditing login of :username")
def audit(ctx):
    password = ctx["password"]
    log.info("audit", password=password, note=f"the password is {{password}}")
    log.warning(f"free text with {{password}} inside")
    try:
        raise RuntimeError(f"while auditing {{password}}")
    except RuntimeError:
        log.exception("audit trace", echoed=[password, {{"deep": password}}])
    if ctx["username"] == "mallory":
        raise ValueError(f"bad {{password}}")
    log.info("next", audited=f"audited {{password}}")
"""


def test_secret_appears_in_no_output(
    mesh_dir: MeshDir, peers: Peers, tmp_path: Path, monkeypatch
) -> None:
    """login across three machines, one logging the secret on purpose, two failing with it
    in their exceptions: the secret (and the token) appear in no stdout, stderr or log file."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    mesh_dir.flow(AUDIT_FLOW)
    mesh_dir.service(AUDIT_SERVICE)
    (mesh_dir.root / "token").write_text(TOKEN)
    mesh_dir.write_config(
        {"client": False, "server": True, "audit": True}, extra='token_file = "token"'
    )
    audit_log = tmp_path / "audit-events.log"
    audit = peers.start(mesh_dir, "audit", args=["--log-file", str(audit_log)])
    server = peers.start(mesh_dir, "server")  # after audit, which it dials
    cases = {
        "ok": ["username=ada", f"password={SECRET}"],
        "ok-json": ["username=ada", f"password={SECRET}", "--json"],
        "mallory": ["username=mallory", f"password={SECRET}"],  # fails on audit
        "wrong": ["username=ada", f"password={SECRET}-wrong", "--json"],  # fails on server
    }
    outputs: dict[str, bytes] = {}
    codes = {}
    for name, args in cases.items():
        done = subprocess.run(
            [sys.executable, "-m", "mesh", "call", "login", *args, "-c", str(mesh_dir.config)],
            capture_output=True,
            env=mesh_env(),
            timeout=60,
            check=False,
        )
        codes[name] = done.returncode
        outputs[f"{name} stdout"] = done.stdout
        outputs[f"{name} stderr"] = done.stderr
    audit.stop()
    server.stop()
    outputs["server output"] = server.log_path.read_bytes()
    outputs["audit output"] = audit.log_path.read_bytes()
    outputs["audit log file"] = audit_log.read_bytes()

    assert codes == {"ok": 0, "ok-json": 0, "mallory": 1, "wrong": 1}, outputs
    assert b'password = "***"' in outputs["ok stdout"]
    assert b"Auditing login of ada" in outputs["ok stdout"]  # the timeline
    assert json.loads(outputs["ok-json stdout"])["context"]["audited"] == "audited ***"
    assert b"ValueError: bad ***" in outputs["mallory stderr"]
    assert b"PermissionError: wrong password *** for ada" in outputs["wrong stderr"]
    events = [json.loads(line) for line in outputs["audit log file"].splitlines()]
    audits = [e for e in events if e.get("event") == "audit"]
    assert len(audits) == 3
    assert all(e["password"] == "***" for e in audits)
    assert any("Traceback" in str(e.get("exception", "")) for e in events)
    for where, data in outputs.items():
        assert SECRET.encode() not in data, f"the secret leaked into {where}"
        assert TOKEN.encode() not in data, f"the token leaked into {where}"


# --- secrets in every form a value takes ---------------------------------------------------

#: A password with backslashes: its repr and its JSON double them.
BACKSLASH_SECRET = r"C:\Users\ada\pw-2024"
PIN = 4829135071  # given as pin:=4829135071, a number
SESSION_TOKEN = "sess-9f8e7d6c5b4a"

FORMS_FLOW = (
    "Request\tLog\tMachine\n"
    "login\tUser attempted login as :username with #password, #pin and #token\tclient\n"
    "login\tReceived request to login as :username\tserver\n"
    "login\tAuditing login of :username\taudit\n"
    "login\tSetting session for :username\tserver\n"
    "login\tLogin successful\tclient\n"
)

FORMS_SERVICE = """
import json

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Auditing login of :username")
def audit(ctx):
    password, pin, token = ctx["password"], ctx["pin"], ctx["token"]
    sessions = {token: ctx["username"]}
    log.info(f"password is {password!r}")
    log.info(
        "audit",
        shown=repr(password),
        dump=json.dumps({"pw": password, "pin": pin}),
        code=pin,
        codes=[pin, {"pin": pin}, (pin,)],
        sessions=sessions,
        nested={"by": {token: [password]}},
    )
    log.info("by token", **{token: ctx["username"]})
    try:
        {}[password]
    except KeyError:
        log.exception("lookup failed")
    if ctx["username"] == "mallory":
        {}[password]
    if ctx["username"] == "eve":
        raise KeyError(pin)
    if ctx["username"] == "trudy":
        raise ValueError(sessions)
    log.info(
        "next",
        sessions=sessions,
        pin_copy=pin,
        pins=[pin],
        dumped=json.dumps([password]),
        shown=f"{password!r}",
    )


@mesh.handler("login", "Setting session for :username")
def set_session(ctx):
    log.info("sessions", sessions={ctx["token"]: ctx["username"]}, pin=str(ctx["pin"]))
    log.info("next", session=ctx["token"])
"""


def _leaks(data: bytes) -> list[str]:
    """Which secret shows in ``data`` in any form: the password with its backslashes escaped
    any number of times (repr, JSON, JSON of a repr), the pin's digits, the token."""
    found = []
    if BACKSLASH_SECRET.replace("\\", "").encode() in data.replace(b"\\", b""):
        found.append("password")
    if str(PIN).encode() in data:
        found.append("pin")
    if SESSION_TOKEN.encode() in data:
        found.append("token")
    return found


def test_secret_in_every_form_appears_in_no_output(
    mesh_dir: MeshDir, peers: Peers, tmp_path: Path
) -> None:
    """login across three machines with three secrets a careless handler shows in every form
    a value takes: a password with backslashes in repr (``{x!r}``, a KeyError's message, a
    traceback) and JSON (``json.dumps``, the JSON log), a token as a dict key (logged,
    returned in the context, an event key, an exception), a number (``pin:=…``) under other
    keys and inside lists. None of them appears in any stdout, stderr or log file of the
    peers and of ``mesh call`` (text, ``--json``, ``--log-file``); before, each of these
    forms leaked."""
    mesh_dir.flow(FORMS_FLOW)
    mesh_dir.service(FORMS_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "audit": True})
    audit_log = tmp_path / "audit-events.log"
    audit = peers.start(mesh_dir, "audit", args=["--log-file", str(audit_log)])
    server = peers.start(mesh_dir, "server")  # after audit, which it dials
    secrets = [f"password={BACKSLASH_SECRET}", f"pin:={PIN}", f"token={SESSION_TOKEN}"]
    call_log = tmp_path / "call.log"
    cases = {
        "ok": ["username=ada", *secrets],
        "ok-json": ["username=ada", *secrets, "--json", "--log-file", str(call_log)],
        "mallory": ["username=mallory", *secrets],  # KeyError(password) on audit
        "eve": ["username=eve", *secrets, "--json"],  # KeyError(pin) on audit
        "trudy": ["username=trudy", *secrets],  # ValueError({token: ...}) on audit
    }
    outputs: dict[str, bytes] = {}
    codes = {}
    for name, args in cases.items():
        done = subprocess.run(
            [sys.executable, "-m", "mesh", "call", "login", *args, "-c", str(mesh_dir.config)],
            capture_output=True,
            env=mesh_env(),
            timeout=60,
            check=False,
        )
        codes[name] = done.returncode
        outputs[f"{name} stdout"] = done.stdout
        outputs[f"{name} stderr"] = done.stderr
    audit.stop()
    server.stop()
    outputs["server output"] = server.log_path.read_bytes()
    outputs["audit output"] = audit.log_path.read_bytes()
    outputs["audit log file"] = audit_log.read_bytes()
    outputs["call log file"] = call_log.read_bytes()

    assert codes == {"ok": 0, "ok-json": 0, "mallory": 1, "eve": 1, "trudy": 1}, outputs
    text = outputs["ok stdout"].decode()
    assert 'sessions = {"***": "ada"}' in text
    assert 'pin_copy = "***"' in text
    assert 'pins = ["***"]' in text
    context = json.loads(outputs["ok-json stdout"])["context"]
    assert context["sessions"] == {"***": "ada"}
    assert context["session"] == "***"
    assert context["shown"] == "'***'"
    assert json.loads(context["dumped"]) == ["***"]
    assert b"KeyError: '***'" in outputs["mallory stderr"]
    assert b"KeyError: ***\n" in outputs["eve stderr"]
    assert b"ValueError: {'***': 'trudy'}" in outputs["trudy stderr"]
    events = [json.loads(line) for line in outputs["audit log file"].splitlines()]
    audits = [e for e in events if e.get("event") == "audit"]
    assert len(audits) == 5
    assert all(
        e["code"] == "***" and e["sessions"] == {"***": e["sessions"].get("***")} for e in audits
    )
    assert any("Traceback" in str(e.get("exception", "")) for e in events)
    leaks = {where: _leaks(data) for where, data in outputs.items()}
    assert not any(leaks.values()), {where: found for where, found in leaks.items() if found}


# --- replayed flow ids under mutual TLS ------------------------------------------------------


def test_the_same_bytes_from_another_certificate_are_not_a_retry(
    tls_mesh: MeshDir, peers: Peers, connect
) -> None:
    """Under mTLS a retry is the same call from the same certificate. mesh-call's certificate
    sending the very bytes of client's finished ping (line 0, any caller may send it) is
    refused ALREADY_EXISTS, and gets nothing of client's reply (before: client's reply);
    client's own certificate sending them again gets the recorded reply, as gRPC's retry
    would."""
    from mesh.wire import dump_context

    tls_mesh.flow(LOGIN_FLOW + "ping\tPinging for :who\tserver\n")
    server = peers.start(tls_mesh, "server", tls=True)
    config = load_config(tls_mesh.config)
    result = connect(tls_mesh.config, "client").start("ping", who="ada-the-victim")
    request = _pb2.ContinueRequest(
        request="ping",
        line_index=0,
        context=dump_context({"who": "ada-the-victim"}),
        flow_id=result.flow_id,
        digest=config.flows["ping"].digest,
        via=["client"],
    )
    replies = {}
    for who in ("mesh-call", "client"):
        with Transport.of(config, who).open_channel("server", server.address) as channel:
            try:
                reply = _pb2_grpc.MeshStub(channel).Continue(request, timeout=30)
                replies[who] = ("OK", reply.WhichOneof("outcome"))
            except grpc.RpcError as exc:
                replies[who] = (exc.code().name, exc.details())
    assert replies["mesh-call"][0] == "ALREADY_EXISTS", replies
    assert "ada-the-victim" not in replies["mesh-call"][1]
    assert replies["client"] == ("OK", "done")
    pinged = [e for e in server.events() if e.get("event") == "Pinging for ada-the-victim"]
    assert len(pinged) == 1
