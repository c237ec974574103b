"""Several nodes in one process: each one's lifetime is its own.

A process may embed a peer (``node.serve()``) and also originate flows as another
machine; closing one of them must leave the other working.
"""

from __future__ import annotations

import json

import structlog
from support.cli import run_mesh
from support.meshdir import MeshDir, password_of
from support.peers import Peers

import mesh

PASSWORD = password_of("ada")


def call_login(login_mesh: MeshDir) -> dict:
    done = run_mesh(
        "call",
        "login",
        "username=ada",
        f"password={PASSWORD}",
        "--json",
        "-c",
        login_mesh.config,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_closing_one_node_leaves_an_embedded_peer_serving(login_mesh: MeshDir, connect) -> None:
    """An embedded ``server`` peer and an in-process ``client`` node; the client is closed.
    Before, closing it cleared the process's routing, and every flow into the embedded
    peer then failed with 'returned without logging "next"'. Now the peer serves on."""
    login_mesh.fix_ports()  # node.serve() binds the address the config gives
    server = connect(login_mesh.config, "server")
    server.serve()
    client = connect(login_mesh.config, "client")
    assert client.start("login", username="ada", password=PASSWORD).context["verified"]

    client.close()

    out = call_login(login_mesh)
    assert out["context"]["session"] == "session-ada"
    assert [s["machine"] for s in out["steps"]] == ["client"] + ["server"] * 4 + ["client"]


def test_closing_the_newer_node_gives_inline_flows_back_to_the_older(
    login_mesh: MeshDir, peers: Peers, connect
) -> None:
    """Two in-process client nodes, the newer closed: inline code logging a line 0 still
    starts a flow, on the older node, and its "next" reaches the server. Before, closing
    the newer one made the process ignore flow lines, as if no node were left."""
    server = peers.start(login_mesh, "server")
    connect(login_mesh.config, "client")
    login_mesh.write_config({"client": False, "server": True}, name="other.toml")
    newer = connect(login_mesh.root / "other.toml", "client")
    newer.close()
    log = structlog.get_logger()

    log.info("Fetching feed information", reader="ada")
    log.info("next")

    assert mesh.current_context() == {"reader": "ada"}
    assert any(e.get("event") == "Retrieving feed information" for e in server.events())
