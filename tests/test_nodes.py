"""Several nodes in one process: each one's lifetime is its own.

A process may embed a peer (``node.serve()``) and also originate flows as another
machine; closing one of them must leave the other working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_start_async_takes_starts_arguments_and_raises_its_errors(
    login_mesh: MeshDir, peers: Peers, connect
) -> None:
    """``await node.start_async(...)`` is ``node.start`` for async code: the same keywords
    (a context key beside ``timeout``), the same result, the same errors; flows awaited
    together run together, each with its own context."""
    import asyncio

    peers.start(login_mesh, "server")
    client = connect(login_mesh.config, "client")

    async def main() -> list[mesh.FlowResult]:
        return await asyncio.gather(
            *(
                client.start_async("login", username=n, password=password_of(n), timeout=20)
                for n in ("ada", "grace", "alan")
            )
        )

    results = asyncio.run(main())
    assert [r.context["session"] for r in results] == [
        "session-ada",
        "session-grace",
        "session-alan",
    ]
    assert len({r.flow_id for r in results}) == 3
    try:
        asyncio.run(client.start_async("login", username="ada", password="wrong-one"))
    except mesh.FlowError as exc:
        assert (exc.machine, exc.error_type) == ("server", "PermissionError")
    else:
        raise AssertionError("a wrong password did not fail the flow")


ON_THE_LOOP_FLOW = (
    "Request\tLog\tMachine\n"
    "tour\tLeaving with :n\tclient\n"
    "tour\tSync on the server :n\tserver\n"
    "tour\tAsync on the server :n\tserver\n"
    "tour\tHome again :n\tclient\n"
)

ON_THE_LOOP_SERVICE = """
import asyncio
import threading

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("tour", "Sync on the server :n")
def sync_step(ctx):
    log.info("next", sync_thread=threading.current_thread().name)


@mesh.handler("tour", "Async on the server :n")
async def async_step(ctx):
    await asyncio.sleep(0.01)
    log.info("next", async_thread=threading.current_thread().name)


@mesh.handler("tour", "Home again :n")
async def home(ctx):
    await asyncio.sleep(0)
    log.info("next", home_thread=threading.current_thread().name)
"""


def test_connect_async_runs_the_nodes_flows_on_the_applications_loop(
    mesh_dir: MeshDir, peers: Peers
) -> None:
    """``await mesh.connect_async(...)``: the node's links, its flows and its async handler
    run on the application's loop (no loop thread of the node's), many flows at once; a
    blocking ``node.start`` works from another thread and is refused on the loop; once
    that loop has closed the node says so instead of hanging."""
    import asyncio
    import threading

    mesh_dir.flow(ON_THE_LOOP_FLOW)
    mesh_dir.service(ON_THE_LOOP_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    peers.start(mesh_dir, "server")

    async def main() -> tuple[list[mesh.FlowResult], mesh.FlowResult, str, list[str]]:
        node = await mesh.connect_async(mesh_dir.config, machine="client")
        try:
            flows = await asyncio.gather(
                *(node.start_async("tour", n=n, timeout=30) for n in range(50))
            )
            threads = [t.name for t in threading.enumerate()]
            # From a thread of the application's, a blocking flow is handed to the loop.
            blocking = await asyncio.to_thread(node.start, "tour", n=99, timeout=30)
            try:
                node.start("tour", n=100, timeout=30)
            except mesh.MeshError as exc:
                refused = str(exc)
            else:
                refused = ""
        finally:
            await node.aclose()
        return flows, blocking, refused, threads

    flows, blocking, refused, threads = asyncio.run(main())
    main_thread = threading.current_thread().name
    assert [r.context["n"] for r in flows] == list(range(50))
    for result in (*flows, blocking):
        assert result.context["home_thread"] == main_thread  # the application's loop
        assert result.context["sync_thread"].startswith("mesh-server-")
        assert [s.machine for s in result.steps] == ["client", "server", "server", "client"]
    assert "mesh-client-loop" not in threads
    assert "start_async" in refused and "own event loop" in refused

    async def left_open() -> mesh.Node:
        node = await mesh.connect_async(mesh_dir.config, machine="client")
        await node.start_async("tour", n=1, timeout=30)
        return node  # not closed: its loop ends with asyncio.run

    node = asyncio.run(left_open())
    try:
        node.start("tour", n=2, timeout=5)
    except mesh.MeshError as exc:
        assert "connect_async" in str(exc) and "closed" in str(exc)
    else:
        raise AssertionError("a node whose loop has closed started a flow")
    finally:
        node.close()


def test_a_node_of_connect_async_serves_on_the_applications_loop(mesh_dir: MeshDir) -> None:
    """An asyncio application that is also a machine: ``await node.serve_async()`` serves on
    its loop (async handlers run there, sync ones on workers), ``mesh call`` runs a flow
    through it, and ``await node.stop_async()`` / ``aclose()`` stop it on the loop."""
    import asyncio
    import threading

    mesh_dir.flow(ON_THE_LOOP_FLOW)
    mesh_dir.service(ON_THE_LOOP_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    mesh_dir.fix_ports()

    async def main() -> tuple[int, Any, list[Any], list[str]]:
        node = await mesh.connect_async(mesh_dir.config, machine="server")
        try:
            port = await node.serve_async()
            done = await asyncio.to_thread(
                run_mesh, "call", "tour", "n=7", "--json", "-c", mesh_dir.config
            )
            threads = [t.name for t in threading.enumerate()]
            abandoned = await node.stop_async(1)
        finally:
            await node.aclose()
        return port, done, abandoned, threads

    port, done, abandoned, threads = asyncio.run(main())
    assert done.returncode == 0, done.stderr
    context = json.loads(done.stdout)["context"]
    assert context["async_thread"] == threading.current_thread().name  # the app's loop
    assert context["sync_thread"].startswith("mesh-server-")  # a worker thread
    assert f":{port}" in Path(mesh_dir.config).read_text()
    assert "mesh-server-loop" not in threads
    assert abandoned == []
