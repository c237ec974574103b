"""Links between peers, for real: persistent streams, broken under load, cancelled, crowded.

Every peer is a ``mesh peer`` process; the originator is this process. What is
asserted is what a user would check: every flow ends, no step runs twice (each
handler appends to a ledger file), a cancelled flow goes no further, and a peer
with a handful of worker threads carries thousands of flows that wait below it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support.meshdir import MeshDir
from support.peers import Peers

import mesh

CHARGE_FLOW = (
    "Request\tLog\tMachine\n"
    "charge\tCharging :n\tclient\n"
    "charge\tForwarding charge :n\tserver\n"
    "charge\tTaking payment :n\tbank\n"
    "charge\tRecording payment :n\tbank\n"
    "charge\tCharged :n\tclient\n"
)

BANK_SERVICE = """
import asyncio
import os
import socket
import time

import structlog

import mesh

log = structlog.get_logger()


def _ledger(ctx, what):
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"{what} {ctx['n']} {os.getpid()}\\n")


@mesh.handler("charge", "Taking payment :n")
def take_payment(ctx):
    if "tell_port" in ctx:  # let the test know the step has begun
        socket.create_connection(("127.0.0.1", ctx["tell_port"])).close()
    time.sleep(ctx.get("seconds", 0))
    _ledger(ctx, "paid")
    log.info("next", paid=True)


@mesh.handler("charge", "Recording payment :n")
async def record_payment(ctx):
    await asyncio.sleep(0)
    _ledger(ctx, "recorded")
    log.info("next", recorded=True)
"""


def ledger_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture
def bank_mesh(mesh_dir: MeshDir, reply_dropper) -> tuple[MeshDir, Any]:
    """client → server → bank, where peers dial bank through a TCP proxy."""
    mesh_dir.flow(CHARGE_FLOW)
    mesh_dir.service(BANK_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "bank": True})
    mesh_dir.fix_ports("bank")  # the proxy in front of bank is made before bank starts
    bank_listen = mesh_dir.addresses["bank"]
    host, port = bank_listen.rsplit(":", 1)
    proxy = reply_dropper((host, int(port)), marker=b"charge", drops=0)
    text = mesh_dir.config.read_text(encoding="utf-8").replace(
        f'bank = "{bank_listen}"',
        f'bank = {{ address = "{proxy.address}", listen = "{bank_listen}" }}',
    )
    mesh_dir.config.write_text(text, encoding="utf-8")
    return mesh_dir, proxy


@pytest.mark.parametrize("cuts", [1, 3])
def test_a_link_cut_with_calls_in_flight_loses_and_doubles_nothing(
    bank_mesh: tuple[MeshDir, Any], peers: Peers, connect, tmp_path: Path, cuts: int
) -> None:
    """40 flows in flight on server's link to bank when the proxy cuts it: server dials
    bank again and sends the calls again; bank's reply record answers those it had, so
    every flow succeeds and every step is in bank's ledger exactly once. Cut three times
    in a row (a network that flaps), the link that resends the calls breaks too: it is
    dialled again within the same window, and still nothing is lost or doubled."""
    mesh_dir, proxy = bank_mesh
    bank = peers.start(mesh_dir, "bank")
    peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"
    node.start("charge", n=-1, ledger=str(ledger), timeout=20)  # the links are up
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(40) as pool:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        flows = [
            pool.submit(
                node.start,
                "charge",
                n=n,
                ledger=str(ledger),
                seconds=0.3,
                timeout=30,
                **({"tell_port": port} if n == 0 else {}),
            )
            for n in range(40)
        ]
        listener.accept()[0].close()  # bank runs the steps now
        time.sleep(0.1)
        for _ in range(cuts):
            proxy.cut_all()
            time.sleep(0.05)
        results = [f.result(timeout=60) for f in flows]

    assert proxy.connections >= 2  # the link was dialled again
    assert all(r.context["recorded"] for r in results)
    lines = ledger_lines(ledger)
    for n in range(40):
        assert lines.count(f"paid {n} {bank.pid}") == 1, n
        assert lines.count(f"recorded {n} {bank.pid}") == 1, n
    assert any(e.get("event") == "mesh.step_repeated" for e in bank.events())


CANCEL_FLOW = (
    "Request\tLog\tMachine\n"
    "audit\tAsked to audit :n\tclient\n"
    "audit\tPassing audit :n on\tserver\n"
    "audit\tAuditing :n\tauditor\n"
    "audit\tFiling audit :n\tauditor\n"
    "audit\tAudited :n\tclient\n"
)

AUDITOR_SERVICE = """
import socket
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("audit", "Auditing :n")
def audit(ctx):
    socket.create_connection(("127.0.0.1", ctx["tell_port"])).close()  # it has begun
    time.sleep(ctx["seconds"])
    log.info("next", audited=True)


@mesh.handler("audit", "Filing audit :n")
def file_audit(ctx):
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"filed {ctx['n']}\\n")
    log.info("next", filed=True)
"""


def test_a_caller_that_gives_up_cancels_the_call_down_to_the_last_hop(
    mesh_dir: MeshDir, peers: Peers, connect, tmp_path: Path
) -> None:
    """An asyncio caller cancels its flow (a web request gone, say) while the auditor, two
    hops down, runs its step: the cancel travels server → auditor, so the auditor stops
    the flow when its handler returns ('cancelled by its caller'), and the line after it
    never runs, long before the flow's own deadline."""
    mesh_dir.flow(CANCEL_FLOW)
    mesh_dir.service(AUDITOR_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "auditor": True})
    auditor = peers.start(mesh_dir, "auditor")
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"

    async def start_and_cancel(port: int, listener: socket.socket) -> str:
        flow = asyncio.ensure_future(
            node.start_async(
                "audit", n=1, tell_port=port, seconds=1.0, ledger=str(ledger), timeout=60
            )
        )
        await asyncio.get_running_loop().run_in_executor(None, lambda: listener.accept()[0])
        flow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flow
        return "cancelled"

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        assert asyncio.run(start_and_cancel(listener.getsockname()[1], listener)) == "cancelled"

    def expired(peer: Any) -> list[dict[str, Any]]:
        return [e for e in peer.events() if e.get("event") == "mesh.flow_expired"]

    deadline = time.monotonic() + 30
    while not expired(auditor) and time.monotonic() < deadline:
        time.sleep(0.05)
    [stopped] = expired(auditor)
    assert stopped["cause"] == "cancelled by its caller"
    assert stopped["line_index"] == 3  # the line it did not run
    assert not ledger_lines(ledger)
    assert [e["cause"] for e in expired(server)] == ["cancelled by its caller"]
    assert server.alive() and auditor.alive()


CROWD_FLOW = (
    "Request\tLog\tMachine\n"
    "crowd\tCrowding in :n\tclient\n"
    "crowd\tLetting :n through\tgate\n"
    "crowd\tHolding :n a while\tslow\n"
    "crowd\tLet out :n\tclient\n"
)

CROWD_SERVICE = """
import asyncio

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("crowd", "Letting :n through")
def let_through(ctx):
    log.info("next", gate=True)


@mesh.handler("crowd", "Holding :n a while")
async def hold(ctx):
    await asyncio.sleep(ctx["seconds"])
    log.info("next", held=True)
"""


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


@pytest.mark.slow
def test_two_thousand_flows_wait_below_a_peer_with_eight_workers(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """2,000 flows in flight through ``gate`` (workers = 8), each waiting 2 s on an async
    step of ``slow``: all succeed, none refused busy, and neither peer grows a thread per
    waiting flow (a flow waiting below is an entry in a table, not a blocked thread)."""
    mesh_dir.flow(CROWD_FLOW)
    mesh_dir.service(CROWD_SERVICE)
    mesh_dir.write_config({"client": False, "gate": True, "slow": True}, extra="workers = 8")
    slow = peers.start(mesh_dir, "slow")
    gate = peers.start(mesh_dir, "gate")
    node = connect(mesh_dir.config, "client")
    most: dict[int, int] = {gate.pid: 0, slow.pid: 0}

    async def crowd() -> list[Any]:
        flows = [
            asyncio.ensure_future(node.start_async("crowd", n=n, seconds=2.0, timeout=120))
            for n in range(2000)
        ]
        while not all(f.done() for f in flows):
            for pid, seen in most.items():
                most[pid] = max(seen, threads_of(pid))
            await asyncio.sleep(0.2)
        return await asyncio.gather(*flows, return_exceptions=True)

    results = asyncio.run(crowd())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(r.context["held"] and r.context["gate"] for r in results)
    # A few threads of gRPC's and the loop's, and at most 8 workers: nowhere near 2,000.
    assert most[gate.pid] < 40, most
    assert most[slow.pid] < 40, most


MIXED_FLOW = (
    "Request\tLog\tMachine\n"
    "mixed\tStarting :n\tclient\n"
    "mixed\tSync on server :n\tserver\n"
    "mixed\tAsync on server :n\tserver\n"
    "mixed\tBack on the client :n\tclient\n"
    "mixed\tAsync on the client :n\tclient\n"
)

MIXED_SERVICE = """
import asyncio
import threading

import structlog
from structlog.contextvars import bind_contextvars, get_contextvars

import mesh

log = structlog.get_logger()


@mesh.handler("mixed", "Sync on server :n")
def sync_step(ctx):
    bind_contextvars(noted=f"note {ctx['n']}")  # the next handler of the flow here sees it
    log.info("next", sync_thread=threading.current_thread().name)


@mesh.handler("mixed", "Async on server :n")
async def async_step(ctx):
    await asyncio.sleep(0.01)
    log.info(
        "next",
        async_thread=threading.current_thread().name,
        noted=get_contextvars().get("noted"),
    )


@mesh.handler("mixed", "Back on the client :n")
def back(ctx):
    log.info("next", back=True)


@mesh.handler("mixed", "Async on the client :n")
async def async_on_client(ctx):
    await asyncio.sleep(0)
    log.info("next", done=mesh.current_context()["n"])
"""


def test_sync_and_async_handlers_in_one_flow(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """A flow whose lines have sync and async handlers, on a peer and on the originator,
    started both ways (node.start and await node.start_async): a sync handler runs on a
    worker thread, an async one on the event loop, and what one binds in context
    variables the next handler of the flow on that machine still sees."""
    mesh_dir.flow(MIXED_FLOW)
    mesh_dir.service(MIXED_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")

    blocking = node.start("mixed", n=1, timeout=30)

    async def started_async() -> mesh.FlowResult:
        return await node.start_async("mixed", n=2, timeout=30)

    awaited = asyncio.run(started_async())
    for n, result in ((1, blocking), (2, awaited)):
        context = result.context
        assert context["noted"] == f"note {n}"
        assert context["sync_thread"].startswith("mesh-server-")
        assert context["async_thread"] == "mesh-server-loop"
        assert context["back"] is True
        assert context["done"] == n
        assert [s.index for s in result.steps] == [0, 1, 2, 3, 4]
    lines = [e["event"] for e in server.events() if e.get("request") == "mixed"]
    assert "Async on server 2" in lines


def test_the_reply_of_a_link_answer_is_the_same_as_a_unary_one(
    login_mesh: MeshDir, peers: Peers, connect
) -> None:
    """The unary Continue keeps working beside links, on the same port and through the same
    door: mesh call's result (links) and a hand-written unary call agree."""
    import grpc

    from mesh.config import load_config
    from mesh.v1 import mesh_pb2 as pb

    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")
    via_link = node.start("login", username="ada", password="hunter2-ada")
    flow = load_config(login_mesh.config).flows["login"]
    request = pb.ContinueRequest(
        request="login",
        line_index=1,
        context=json.dumps({"username": "bob", "password": "hunter2-bob"}).encode(),
        flow_id="b" * 32,
        digest=flow.digest,
        via=["client"],
    )
    with grpc.insecure_channel(server.address) as channel:
        reply = channel.unary_unary(
            "/mesh.v1.Mesh/Continue",
            request_serializer=pb.ContinueRequest.SerializeToString,
            response_deserializer=pb.ContinueReply.FromString,
        )(request, timeout=30)
    assert reply.WhichOneof("outcome") == "hand_off"
    assert (reply.hand_off.machine, reply.hand_off.line_index) == ("client", 5)
    assert [s.line_index for s in reply.steps] == [1, 2, 3, 4]
    assert json.loads(reply.hand_off.context)["session"] == "session-bob"
    assert via_link.context["session"] == "session-ada"


SLOW_FLOW = (
    "Request\tLog\tMachine\n"
    "slow\tAsking :n\tclient\n"
    "slow\tWorking slowly on :n\tserver\n"
    "slow\tThrough the gate :n\tgate\n"
    "slow\tHeld below :n\tbelow\n"
    "slow\tAnswered :n\tclient\n"
)

SLOW_SERVICE = """
import asyncio
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("slow", "Working slowly on :n")
def work(ctx):
    time.sleep(ctx.get("seconds", 0))
    log.info("next", worked=True)


@mesh.handler("slow", "Held below :n")
async def held(ctx):
    await asyncio.sleep(ctx.get("below", 0))
    log.info("next", held=True)
"""


def run_together(node: mesh.Node, count: int, **context: Any) -> list[Any]:
    """Start ``count`` flows at once; each result is a FlowResult or the MeshError raised."""

    async def all_of_them() -> list[Any]:
        flows = [node.start_async("slow", n=n, timeout=30, **context) for n in range(count)]
        return await asyncio.gather(*flows, return_exceptions=True)

    return asyncio.run(all_of_them())


def test_a_full_link_window_refuses_at_once_as_busy(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """link_window = 2 and 5 flows at once, each holding its call on server for 1 s: two run,
    three are refused at once, saying the link is full and which key sets its size,
    never queued without bound."""
    mesh_dir.flow(SLOW_FLOW)
    mesh_dir.service(SLOW_SERVICE)
    mesh_dir.write_config(
        {"client": False, "server": True, "gate": True, "below": True}, extra="link_window = 2"
    )
    peers.start(mesh_dir, "below")
    peers.start(mesh_dir, "gate")
    peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    results = run_together(node, 5, seconds=1.0)
    done = [r for r in results if isinstance(r, mesh.FlowResult)]
    busy = [r for r in results if isinstance(r, mesh.PeerRefused)]
    assert (len(done), len(busy)) == (2, 3), results
    for refused in busy:
        assert refused.machine == "server"
        assert "busy" in str(refused) and "link_window in mesh.toml" in str(refused)


def test_max_calls_counts_steps_running_not_flows_waiting_below(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """max_calls = 10 on ``server`` and ``gate``. Ten flows waiting 3 s on ``below`` (whose
    own limit is higher) hold calls on both all that time; ten more flows started meanwhile
    pass both (a flow waiting below is not a step running there). Fifteen flows at once
    that each run 1 s on ``server`` are refused busy beyond the tenth, saying which key
    limits them."""
    mesh_dir.flow(SLOW_FLOW)
    mesh_dir.service(SLOW_SERVICE)
    machines: dict[str, bool | int | str] = {
        "client": False,
        "server": True,
        "gate": True,
        "below": True,
    }
    roomy = mesh_dir.write_config(machines, name="roomy.toml", extra="max_calls = 100")
    below = peers.start(mesh_dir, "below", config=roomy)
    mesh_dir.write_config(machines, extra="max_calls = 10")
    peers.start(mesh_dir, "gate")
    peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")

    async def waiting_then_more() -> tuple[list[Any], list[Any]]:
        first = [node.start_async("slow", n=n, below=3.0, timeout=30) for n in range(10)]
        waiting = asyncio.gather(*first, return_exceptions=True)
        while sum(1 for e in below.events() if str(e.get("event")).startswith("Held")) < 10:
            await asyncio.sleep(0.05)
        more = asyncio.gather(
            *(node.start_async("slow", n=n, timeout=30) for n in range(10, 20)),
            return_exceptions=True,
        )
        passed = await more  # while the first ten still wait below
        assert not waiting.done()
        return await waiting, passed

    held, passed = asyncio.run(waiting_then_more())
    assert all(isinstance(r, mesh.FlowResult) for r in held + passed), held + passed

    running = run_together(node, 15, seconds=1.0)
    busy = [r for r in running if isinstance(r, mesh.PeerRefused)]
    assert len(busy) == 5, running
    assert all("max_calls in mesh.toml" in str(r) and r.machine == "server" for r in busy)
