"""mesh.current_flow(): a handler reads which flow, line and machine it runs, as a value."""

from __future__ import annotations

import dataclasses

import pytest
import structlog
from support.meshdir import LOGIN_FLOW, MeshDir, password_of
from support.peers import Peers

import mesh

#: The login service, its password check also reporting where it ran.
WHERE_SERVICE = """
import dataclasses

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Testing password for :username")
def test_password(ctx):
    log.info("next", where=dataclasses.asdict(mesh.current_flow()))


@mesh.handler("login", "Setting session for :username")
def set_session(ctx):
    log.info("next", session="session-" + ctx["username"])
"""


def test_a_handler_on_a_peer_reads_its_flow(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """A handler on another machine gets the flow id the originator sees, its request,
    its own line and machine."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(WHERE_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")

    result = node.start("login", username="ada", password=password_of("ada"))

    assert result.context["where"] == {
        "flow_id": result.flow_id,
        "request": "login",
        "line_index": 2,
        "line": "Testing password for :username",
        "machine": "server",
    }


def test_inline_code_reads_its_flow_between_lines(login_mesh: MeshDir, connect) -> None:
    """Inline code sees the line it logged; the value is frozen; outside a flow it raises."""
    connect(login_mesh.config, "client")
    log = structlog.get_logger()
    with pytest.raises(mesh.MeshError, match="no flow is active here"):
        mesh.current_flow()

    log.info("Fetching feed information")
    here = mesh.current_flow()

    assert (here.request, here.line_index, here.machine) == ("feed", 0, "client")
    assert here.line == "Fetching feed information"
    assert len(here.flow_id) == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        here.line_index = 1  # type: ignore[misc]
