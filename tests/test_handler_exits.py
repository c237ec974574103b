"""Handlers that raise what ``except Exception`` does not catch: SystemExit, KeyboardInterrupt.

A handler calling ``sys.exit()`` (a library that does, a stray ``exit()``) or interrupted
by a KeyboardInterrupt fails its step like any exception: a ``FlowError`` at once, logged
where it ran, and the peer keeps serving. On a real peer process, in ``node.start``
and in inline code alike.
"""

from __future__ import annotations

import time

import pytest
import structlog
from support.meshdir import MeshDir
from support.peers import Peers

import mesh

EXITS_FLOW = (
    "Request\tLog\tMachine\n"
    "exits\tAsked to exit with :how\tclient\n"
    "exits\tExiting with :how\tserver\n"
    "exits\tStill here\tclient\n"
    "local\tRunning locally with :how\tclient\n"
    "local\tExiting here with :how\tclient\n"
    "local\tLocal done\tclient\n"
    "fine\tAsked for nothing\tclient\n"
    "fine\tDoing nothing\tserver\n"
)

EXITS_SERVICE = """
import sys

import structlog

import mesh

log = structlog.get_logger()


def _leave(how):
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt("interrupted in a handler")
    log.info("next")


@mesh.handler("exits", "Exiting with :how")
def exit_remotely(ctx):
    _leave(ctx["how"])


@mesh.handler("local", "Exiting here with :how")
def exit_here(ctx):
    _leave(ctx["how"])


@mesh.handler("fine", "Doing nothing")
def nothing(ctx):
    log.info("next", fine=True)
"""

HOWS = [("exit", "SystemExit"), ("interrupt", "KeyboardInterrupt")]


@pytest.fixture
def exits_mesh(mesh_dir: MeshDir) -> MeshDir:
    mesh_dir.flow(EXITS_FLOW)
    mesh_dir.service(EXITS_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    return mesh_dir


@pytest.mark.parametrize(("how", "error_type"), HOWS)
def test_a_peer_handler_that_exits_fails_its_step_at_once(
    exits_mesh: MeshDir, peers: Peers, connect, how: str, error_type: str
) -> None:
    """sys.exit() or KeyboardInterrupt in a peer's handler: before, the call never got a
    reply and the flow hung until its deadline (FlowTimeout), with nothing in the peer's
    log. Now the originator gets a FlowError naming the machine, line and exception well
    before the deadline; the peer logs mesh.step_failed and serves the next flow."""
    server = peers.start(exits_mesh, "server")
    node = connect(exits_mesh.config, "client")

    began = time.monotonic()
    with pytest.raises(mesh.FlowError) as info:
        node.start("exits", how=how, timeout=30)
    elapsed = time.monotonic() - began

    assert elapsed < 15, f"the flow took {elapsed:.1f} s of its 30 s deadline"
    assert info.value.machine == "server"
    assert info.value.line_index == 1
    assert info.value.error_type == error_type
    failed = [e for e in server.events() if e.get("event") == "mesh.step_failed"]
    assert [(e["flow_id"], e["line_index"]) for e in failed] == [(info.value.flow_id, 1)]
    assert error_type in failed[0]["error"]
    assert node.start("fine", timeout=10).context == {"fine": True}
    assert server.alive()


@pytest.mark.parametrize(("how", "error_type"), HOWS)
def test_a_local_handler_that_exits_fails_its_step(
    exits_mesh: MeshDir, connect, capsys, how: str, error_type: str
) -> None:
    """The same handler run in this process by node.start: before, SystemExit or
    KeyboardInterrupt went straight through node.start (a flow step ending the caller's
    program); now it is the step's FlowError, logged, and the node runs the next flow."""
    node = connect(exits_mesh.config, "client")

    with pytest.raises(mesh.FlowError) as info:
        node.start("local", how=how, timeout=10)

    assert info.value.machine == "client"
    assert info.value.line_index == 1
    assert info.value.error_type == error_type
    logged = [line for line in capsys.readouterr().out.splitlines() if "mesh.step_failed" in line]
    assert len(logged) == 1 and error_type in logged[0], logged
    assert node.start("local", how="fine", timeout=10).steps[-1].index == 2


@pytest.mark.parametrize(("how", "error_type"), HOWS)
def test_an_inline_next_into_a_handler_that_exits_fails_the_flow(
    exits_mesh: MeshDir, connect, how: str, error_type: str
) -> None:
    """Inline code logging line 0 and "next", whose following line's handler exits: the
    "next" raises the step's FlowError, not SystemExit or KeyboardInterrupt."""
    connect(exits_mesh.config, "client")
    log = structlog.get_logger()

    log.info("Running locally with :how", how=how)
    with pytest.raises(mesh.FlowError) as info:
        log.info("next")

    assert info.value.line_index == 1
    assert info.value.error_type == error_type
