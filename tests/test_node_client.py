"""A client in another language: the Node.js example (examples/node/), against real peers.

The client was written from the docs alone (docs/wire-protocol.md, docs/clients.md): it
reads the flow files and computes each request's digest itself, makes flow ids, renders and
masks its own lines, and calls the Python peers with the unary ``Continue``. These tests
run it as a JavaScript team would (``node cli.js …``, its output one JSON object) and check
what a user would: the result, the timeline, the peers' logs, the refusals, and that a
secret shows nowhere. ``@grpc/grpc-js`` and ``@grpc/proto-loader`` are installed with npm
from the example's package-lock.json into ``.venv/node-client`` (kept between runs); without
node, npm or the registry the tests are skipped, naming what is missing. The tests with
peers are marked slow (``make test`` runs them; ``make test-fast`` leaves them out).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.meshdir import LOGIN_FLOW, LOGIN_SERVICE, MeshDir, password_of
from support.peers import Peer, Peers

from mesh.config import load_config
from mesh.tools.certs import make_certs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "node"
TOKEN = "tok-" + "9b2e4c" * 5

INDEX_FLOW = (
    "index,Checking if signed in,server\n"
    "index,Generating list of questions,server\n"
    "index,Sending sign in email,emailservice\n"
)

INDEX_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("index", "Checking if signed in")
def check_signed_in(ctx):
    log.info("next", signed_in=ctx.get("session") == "session-" + str(ctx.get("username")))


@mesh.handler("index", "Generating list of questions")
def generate_questions(ctx):
    log.info("next", questions=[{"id": 1, "title": "How does a flow find the next machine?"}])


@mesh.handler("index", "Sending sign in email")
def send_sign_in_email(ctx):
    log.info("next", email_to=ctx.get("username", "guest"))
"""

MTLS = """
token_file = "token"
[tls]
ca = "certs/ca.pem"
cert = "certs/{machine}.pem"
key = "certs/{machine}.key"
require_client_cert = true
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH (Node.js 18 or later runs examples/node)")
    return node


def _install(cache: Path) -> Path:
    """``npm ci`` of the example's lock file into ``cache``, unless it is there already."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH: cannot install @grpc/grpc-js and @grpc/proto-loader")
    lock = (EXAMPLE / "package-lock.json").read_bytes()
    stamp = cache / "installed-lock.sha256"
    want = hashlib.sha256(lock).hexdigest()
    modules = cache / "node_modules"
    if stamp.exists() and stamp.read_text() == want and (modules / "@grpc" / "grpc-js").is_dir():
        return modules
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(EXAMPLE / name, cache / name)
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci took over 300 s: the npm registry is unreachable from here?")
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        pytest.skip(f"npm could not install @grpc/grpc-js and @grpc/proto-loader: {tail}")
    stamp.write_text(want)
    return modules


@dataclass
class Node:
    """``node cli.js …`` from examples/node, with its npm packages found on NODE_PATH."""

    node: str
    modules: Path

    def run(
        self, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "MESH_TOKEN"}
        environ["NODE_PATH"] = str(self.modules)
        return subprocess.run(
            [self.node, "cli.js", *map(str, args)],
            cwd=EXAMPLE,
            env={**environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def call(self, *args: str | Path, ok: bool = True, **kwargs: Any) -> dict[str, Any]:
        """The one JSON object the client prints; ``ok``: the exit code it must have."""
        done = self.run(*args, **kwargs)
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        out: dict[str, Any] = json.loads(done.stdout)
        out["_stderr"] = done.stderr
        return out


@pytest.fixture(scope="module")
def node_client() -> Node:
    node = _node()
    venv = ROOT / ".venv"
    cache = venv / "node-client" if venv.is_dir() else ROOT / "test-artifacts" / "node-client"
    return Node(node, _install(cache))


@dataclass
class Mesh:
    """A mesh with login and index on real peers, and what the Node client needs of it."""

    root: Path
    server: Peer
    emailservice: Peer

    def args(self, *, tls_as: str | None = None) -> list[str | Path]:
        out: list[str | Path] = [
            "--flow",
            self.root / "flow.tsv",
            "--flow",
            self.root / "index.csv",
        ]
        for peer in (self.server, self.emailservice):
            out += ["--machine", f"{peer.machine}={peer.address}"]
        if tls_as is not None:
            certs = self.root / "certs"
            out += ["--ca", certs / "ca.pem", "--cert", certs / f"{tls_as}.pem"]
            out += ["--key", certs / f"{tls_as}.key"]
        return out

    def digest(self, request: str) -> str:
        return load_config(self.root / "mesh.toml").flows[request].digest


def _start(root: Path, extra: str = "") -> Callable[[], Iterator[Mesh]]:
    def start() -> Iterator[Mesh]:
        mesh_dir = MeshDir(root / "meshdir", root.name)
        mesh_dir.flow(LOGIN_FLOW)
        mesh_dir.flow(INDEX_FLOW, "index.csv")
        mesh_dir.service(LOGIN_SERVICE)
        mesh_dir.service(INDEX_SERVICE)
        tls = bool(extra)
        if tls:
            (mesh_dir.root / "token").write_text(TOKEN + "\n")
            make_certs(mesh_dir.root / "certs", ["server", "emailservice", "client", "mesh-call"])
        mesh_dir.write_config(
            {"client": False, "server": True, "emailservice": True},
            flow=["flow.tsv", "index.csv"],
            extra=extra,
        )
        peers = Peers(root)
        try:
            email = peers.start(mesh_dir, "emailservice", tls=tls)  # server dials it: first
            server = peers.start(mesh_dir, "server", tls=tls)
            yield Mesh(mesh_dir.root, server, email)
        finally:
            peers.stop_all()
            mesh_dir.close()

    return start


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """login and index on server and emailservice, plaintext, no token."""
    yield from _start(tmp_path_factory.mktemp("node_plain"))()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The same mesh over mutual TLS (certificates from mesh certs) with a token."""
    yield from _start(tmp_path_factory.mktemp("node_mtls"), MTLS)()


#: The keys of the event a peer logs for each line it runs (its handlers' own have more).
LINE_KEYS = {"event", "flow_id", "request", "line_index", "machine", "level", "timestamp"}


def lines_run(peer: Peer, flow_id: str) -> list[int]:
    """The lines ``peer`` logged running for flow ``flow_id``, in order."""
    return [
        e["line_index"]
        for e in peer.events()
        if e.get("flow_id") == flow_id
        and set(e) == LINE_KEYS
        and not str(e["event"]).startswith("mesh.")
    ]


# --- without a peer ---------------------------------------------------------------------


def test_the_node_client_reads_every_digest_vector() -> None:
    """The client's own flow-file reader and digest (lib/flowfile.js, written from the
    docs) agree with every case of protos/mesh/v1/testdata/digests.json."""
    done = subprocess.run(
        [_node(), "vectors.js"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cases = json.loads((ROOT / "protos/mesh/v1/testdata/digests.json").read_text())["cases"]
    assert f"{len(cases)} cases" in done.stdout
    assert "every digest agrees" in done.stdout


# --- plaintext ----------------------------------------------------------------------------


@pytest.mark.slow  # peers and a Node process per call: 20-30 s in all
def test_index_started_from_outside_the_mesh(node_client: Node, plain: Mesh) -> None:
    """Node starts index at line 0 on server naming no machine (via []): server runs lines
    0 and 1, calls emailservice for line 2, and Node gets the final context and the whole
    timeline; the digest it computed is the peers' (or they would have refused it)."""
    out = node_client.call("index", "username=ada", *plain.args())
    assert out["digest"] == plain.digest("index")
    assert len(out["flow_id"]) == 32 and int(out["flow_id"], 16) >= 0
    assert [(s["index"], s["machine"]) for s in out["steps"]] == [
        (0, "server"),
        (1, "server"),
        (2, "emailservice"),
    ]
    assert out["context"]["signed_in"] is False
    assert out["context"]["email_to"] == "ada"
    assert out["context"]["questions"][0]["id"] == 1
    assert lines_run(plain.server, out["flow_id"]) == [0, 1]
    assert lines_run(plain.emailservice, out["flow_id"]) == [2]


@pytest.mark.slow  # peers and a Node process per call: 20-30 s in all
def test_login_played_as_client(node_client: Node, plain: Mesh) -> None:
    """Node plays the address-less client: it runs line 0 itself (the password masked),
    calls server for line 1 (via [client], so the access list lets it in), gets the flow
    handed back at line 5 and runs it: six steps, and the session server made."""
    password = password_of("ada")
    out = node_client.call(
        "login", "username=ada", f"password={password}", "--as", "client", *plain.args()
    )
    assert out["digest"] == plain.digest("login")
    assert [(s["index"], s["machine"]) for s in out["steps"]] == [
        (0, "client"),
        (1, "server"),
        (2, "server"),
        (3, "server"),
        (4, "server"),
        (5, "client"),
    ]
    assert out["steps"][0]["line"] == "User attempted login as ada and ***"
    assert out["steps"][2]["line"] == "Testing password for ada"
    assert out["context"] == {
        "username": "ada",
        "password": "***",
        "verified": True,
        "session": "session-ada",
    }
    assert "[client] login 5: Login successful" in out["_stderr"]
    assert lines_run(plain.server, out["flow_id"]) == [1, 2, 3, 4]
    assert password not in json.dumps(out)
    assert password not in plain.server.log_text()


@pytest.mark.slow  # peers and a Node process per call: 20-30 s in all
def test_login_with_a_wrong_password(node_client: Node, plain: Mesh) -> None:
    """The server's handler raises: Node gets the Failure (STEP, server, line 2, the
    exception's class and message) and exits 1; the lines before it are in the timeline;
    the wrong password is in no output."""
    out = node_client.call(
        "login", "username=ada", "password=not-the-password", "--as", "client", *plain.args(),
        ok=False,
    )  # fmt: skip
    error = out["error"]
    assert error["kind"] == "STEP"
    assert (error["machine"], error["line_index"], error["error_type"]) == (
        "server",
        2,
        "PermissionError",
    )
    assert error["message"] == (
        'login line 2 "Testing password for :username" failed on server:'
        " PermissionError: invalid credentials"
    )
    assert f"error: {error['message']}" in out["_stderr"]
    # The lines that ran before the failure; the failed line is not among them.
    assert [(s["index"], s["machine"]) for s in out["steps"]] == [(0, "client"), (1, "server")]
    assert "not-the-password" not in json.dumps(out) + out["_stderr"]
    assert lines_run(plain.server, out["flow_id"]) == [1, 2]


@pytest.mark.slow  # peers and a Node process per call: 20-30 s in all
def test_a_stale_flow_file_is_refused_naming_both_digests(
    node_client: Node, plain: Mesh, tmp_path: Path
) -> None:
    """Node reading login with one line edited is refused FAILED_PRECONDITION by server,
    and the message names the digest server runs and the one Node sent."""
    edited = tmp_path / "flow.tsv"
    edited.write_text(LOGIN_FLOW.replace("Finish handling user login", "Finish the login"))
    args = [str(a) for a in plain.args()]
    args[args.index(str(plain.root / "flow.tsv"))] = str(edited)
    out = node_client.call("login", "username=ada", "password=x", "--as", "client", *args, ok=False)
    error = out["error"]
    assert (error["kind"], error["machine"], error["code"]) == ("REFUSED", "server", 9)
    assert f"server has digest {plain.digest('login')}, the call has '" in error["message"]
    assert "(FAILED_PRECONDITION)" in error["message"]


# --- mutual TLS and a token -----------------------------------------------------------------


@pytest.mark.slow  # peers and a Node process per call: 20-30 s in all
def test_over_mutual_tls_with_a_token(node_client: Node, secured: Mesh) -> None:
    """With certificates from mesh certs and the token: login played as client (with
    client's certificate) and index from outside (with mesh-call's) both run; without the
    token the call is UNAUTHENTICATED and nothing runs."""
    token = ["--token-file", secured.root / "token"]
    login = node_client.call(
        "login", "username=ada", f"password={password_of('ada')}", "--as", "client",
        *secured.args(tls_as="client"), *token,
    )  # fmt: skip
    assert login["context"]["session"] == "session-ada"
    assert [s["machine"] for s in login["steps"]] == ["client"] + ["server"] * 4 + ["client"]

    index = node_client.call("index", "username=ada", *secured.args(tls_as="mesh-call"), *token)
    assert [s["machine"] for s in index["steps"]] == ["server", "server", "emailservice"]

    refused = node_client.call("index", *secured.args(tls_as="mesh-call"), ok=False)
    assert (refused["error"]["kind"], refused["error"]["error_type"]) == ("REFUSED", "AccessDenied")
    assert "missing or wrong token (UNAUTHENTICATED)" in refused["error"]["message"]
    assert lines_run(secured.server, refused["flow_id"]) == []
    for peer in (secured.server, secured.emailservice):
        assert TOKEN not in peer.log_text()
