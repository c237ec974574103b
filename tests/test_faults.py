"""Faults, for real: replicas behind round_robin, killed peers, overrunning steps, partitions.

Every peer is a separate ``mesh peer`` process; faults are real signals (SIGKILL,
SIGTERM) and, where the machine allows it, a real network namespace whose link
is cut. What is asserted is what a user would check: each flow ends, within its
deadline, as a success or as a MeshError naming the machine; each replica's own
log says what it served.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.cli import mesh_env
from support.meshdir import MeshDir
from support.peers import Peer, Peers

import mesh
from mesh.deadlines import ADOPT_WINDOW

WORK_FLOW = (
    "Request\tLog\tMachine\n"
    "work\tAsked for :n\tclient\n"
    "work\tWorking on :n\tserver\n"
    "work\tDone with :n\tclient\n"
)

WORK_SERVICE = """
import os
import socket
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("work", "Working on :n")
def work(ctx):
    if "tell_port" in ctx:  # let the test know the step has begun
        socket.create_connection(("127.0.0.1", ctx["tell_port"])).close()
    time.sleep(ctx.get("seconds", 0))
    log.info("next", served_by=os.getpid())
"""


def served(peer: Peer) -> set[int]:
    """The flows (by n) this peer's own log says it ran the server line of."""
    return {
        int(e["event"].removeprefix("Working on "))
        for e in peer.events()
        if str(e.get("event", "")).startswith("Working on ")
    }


@pytest.fixture
def replicated(mesh_dir: MeshDir) -> MeshDir:
    """``client`` (no address) and ``server`` at three replicas."""
    mesh_dir.flow(WORK_FLOW)
    mesh_dir.service(WORK_SERVICE)
    mesh_dir.write_config({"client": False, "server": 3})
    return mesh_dir


def run_all(node: mesh.Node, flows: range, concurrency: int, **context: Any) -> list[Any]:
    """Start flow ``work`` for each n; each result is a FlowResult or the MeshError raised."""

    def one(n: int) -> Any:
        try:
            return node.start("work", n=n, **context)
        except mesh.MeshError as exc:
            return exc

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, flows))


@pytest.mark.slow
def test_replicas_share_the_flows(replicated: MeshDir, peers: Peers, connect) -> None:
    """300 flows at concurrency 32 over 3 replicas: each replica serves at least 20%."""
    replicas = [peers.start(replicated, "server", replica=k) for k in (1, 2, 3)]
    node = connect(replicated.config, "client")

    results = run_all(node, range(300), 32, timeout=30)

    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    counts = [len(served(r)) for r in replicas]
    assert sum(counts) == 300, counts
    assert min(counts) >= 60, counts
    pids = Counter(r.context["served_by"] for r in results)
    assert set(pids) == {r.pid for r in replicas}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_replica_under_load(replicated: MeshDir, peers: Peers, connect) -> None:
    """kill -9 one replica with 200 flows in flight: every flow ends by its deadline, as a
    success or as an error naming server; flows it never began succeed; its restart is used."""
    replicas = [peers.start(replicated, "server", replica=k) for k in (1, 2, 3)]
    victim = replicas[1]
    node = connect(replicated.config, "client")
    timeout = 10.0

    def one(n: int) -> tuple[Any, float]:
        began = time.monotonic()
        try:
            result: Any = node.start("work", n=n, seconds=0.3, timeout=timeout)
        except mesh.MeshError as exc:
            result = exc
        return result, time.monotonic() - began

    with ThreadPoolExecutor(200) as pool:
        futures = [pool.submit(one, n) for n in range(200)]
        wait_for(lambda: len(served(victim)) >= 5, 30, "the victim to begin 5 steps")
        victim.kill()
        outcomes = [f.result() for f in futures]

    begun_on_victim = served(victim)
    survivors = served(replicas[0]) | served(replicas[2])
    failed = set()
    for n, (result, elapsed) in enumerate(outcomes):
        # The deadline is the promise under test: a flow whose replica died ends by it, not
        # whenever gRPC gives up (the slack is for 200 threads on a loaded machine).
        assert elapsed < timeout + 10, f"flow {n} took {elapsed:.1f} s of a {timeout} s deadline"
        if isinstance(result, mesh.MeshError):
            assert isinstance(result, mesh.PeerError | mesh.FlowTimeout), repr(result)
            assert result.machine == "server", repr(result)
            # Failed: the victim had it (it acknowledges a call when it reads it, before
            # its handler logs), so it was sent nowhere else: never run twice.
            assert n not in survivors, f"flow {n} ran on a survivor yet failed: {result}"
            failed.add(n)
        else:
            assert n in survivors or n in begun_on_victim, f"flow {n} succeeded, ran nowhere"
    # Calls the victim had not read went to the survivors: only those it held fail, a
    # third of the flows at most (the pick spreads calls over three replicas).
    assert len(failed) <= 200 // 3 + 10, f"{len(failed)} flows failed, more than the victim held"

    restarted = peers.start(replicated, "server", replica=2)

    def restart_serves() -> bool:
        results = run_all(node, range(1000, 1012), 4, timeout=10)
        assert all(not isinstance(r, Exception) for r in results), results
        return bool(served(restarted))

    wait_for(restart_serves, 60, "the restarted replica to be given flows")
    assert all(r.alive() for r in replicas if r is not victim)


CHAIN_FLOW = (
    "Request\tLog\tMachine\n"
    "chain\tAsked for :n\tclient\n"
    "chain\tPassing :n on\tserver\n"
    "chain\tChecking :n\tauth\n"
    "chain\tBack with :n\tclient\n"
    "alone\tAsked the server\tclient\n"
    "alone\tAnswering alone\tserver\n"
)

CHAIN_SERVICE = """
import socket
import time

import structlog

import mesh

log = structlog.get_logger()


def _tell(ctx, key):
    if key in ctx:  # let the test know the step has begun
        socket.create_connection(("127.0.0.1", ctx[key])).close()


@mesh.handler("chain", "Passing :n on")
def pass_on(ctx):
    _tell(ctx, "tell_server")
    time.sleep(ctx.get("server_seconds", 0))
    log.info("slept")
    log.info("next", passed=True)


@mesh.handler("chain", "Checking :n")
def check(ctx):
    _tell(ctx, "tell_auth")
    time.sleep(ctx.get("auth_seconds", 0))
    log.info("next", checked=True)


@mesh.handler("alone", "Answering alone")
def answer(ctx):
    log.info("next", answered=True)
"""


@pytest.fixture
def chain(mesh_dir: MeshDir) -> MeshDir:
    """client (no address) → server → auth, and a flow that needs server alone."""
    mesh_dir.flow(CHAIN_FLOW)
    mesh_dir.service(CHAIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "auth": True})
    return mesh_dir


def step_began(listener: socket.socket) -> None:
    listener.accept()[0].close()


def test_killed_only_peer_of_a_machine(chain: MeshDir, peers: Peers, connect) -> None:
    """kill -9 auth mid-step: the flow fails naming auth within its deadline; the rest serve."""
    auth = peers.start(chain, "auth")
    server = peers.start(chain, "server")  # after auth, which it dials
    node = connect(chain.config, "client")
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        began = time.monotonic()
        flow = pool.submit(node.start, "chain", n=1, tell_auth=port, auth_seconds=30, timeout=10)
        step_began(listener)
        auth.kill()
        with pytest.raises((mesh.PeerUnavailable, mesh.FlowTimeout)) as info:
            flow.result(timeout=30)
        elapsed = time.monotonic() - began

    # The deadline is the promise under test: the flow ends by its 10 s, long before auth's
    # 30 s step would have (the slack is for a loaded machine).
    assert elapsed < 10 + 10, f"ended after {elapsed:.1f} s of a 10 s deadline"
    assert info.value.machine == "auth"
    assert "auth" in str(info.value)
    assert server.alive()
    assert node.start("alone", timeout=10).context == {"answered": True}


def test_step_past_the_deadline_stops_the_flow(chain: MeshDir, peers: Peers, connect) -> None:
    """A server step sleeping past the deadline: FlowTimeout at the client, auth never runs."""
    auth = peers.start(chain, "auth")
    server = peers.start(chain, "server")  # after auth, which it dials
    node = connect(chain.config, "client")

    with pytest.raises(mesh.FlowTimeout) as info:
        node.start("chain", n=7, server_seconds=1.5, timeout=1)

    assert info.value.machine == "server"
    flow_id = info.value.flow_id
    wait_for(
        lambda: any(
            e.get("event") == "mesh.flow_expired" and e.get("flow_id") == flow_id
            for e in server.events()
        ),
        30,
        "the server to give up the flow",
    )
    expired = [e for e in server.events() if e.get("event") == "mesh.flow_expired"]
    assert expired[0]["line_index"] == 2
    assert expired[0]["cause"] == "deadline passed"
    assert not [e for e in auth.events() if e.get("flow_id") == flow_id]
    assert node.start("chain", n=8, timeout=10).context["checked"] is True


def test_deep_overrun_is_named_where_it_happened(chain: MeshDir, peers: Peers, connect) -> None:
    """auth overrunning two hops down: FlowTimeout names auth, not the server between."""
    peers.start(chain, "auth")
    peers.start(chain, "server")  # after auth, which it dials
    node = connect(chain.config, "client")

    with pytest.raises(mesh.FlowTimeout) as info:
        node.start("chain", n=3, auth_seconds=2, timeout=1)

    assert info.value.machine == "auth"
    assert info.value.line_index == 2
    assert "auth" in str(info.value)


@pytest.mark.slow
def test_killed_originator_stops_the_flow_downstream(
    chain: MeshDir, peers: Peers, tmp_path
) -> None:
    """kill -9 the originator mid-step: the server's "next" fails fast, auth never runs."""
    auth = peers.start(chain, "auth")
    server = peers.start(chain, "server")  # after auth, which it dials
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        call = subprocess.Popen(
            [
                *(sys.executable, "-m", "mesh", "call", "chain", "n:=5", f"tell_server:={port}"),
                # server's step outlasts the window a caller has to come back in
                *(f"server_seconds:={ADOPT_WINDOW + 2}", "--timeout", "60"),
                *("-c", str(chain.config)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=mesh_env(),
            cwd=tmp_path,
        )
        try:
            step_began(listener)
        finally:
            os.kill(call.pid, signal.SIGKILL)
            call.wait()

    wait_for(
        lambda: any(e.get("event") == "mesh.flow_expired" for e in server.events()),
        30,
        "the server to stop the flow whose caller died",
    )
    expired = [e for e in server.events() if e.get("event") == "mesh.flow_expired"]
    assert expired[0]["cause"] == "caller gone"
    assert not [e for e in auth.events() if str(e.get("event", "")).startswith("Checking")]


def test_sigterm_drains_a_replica_without_failing_a_flow(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """SIGTERM one of two replicas under load: no flow fails, no step runs on both, the
    stopped replica finishes the steps it began and exits 0."""
    mesh_dir.flow(WORK_FLOW)
    mesh_dir.service(WORK_SERVICE)
    mesh_dir.write_config({"client": False, "server": 2}, extra="grace = 20")
    first, second = (peers.start(mesh_dir, "server", replica=k) for k in (1, 2))
    node = connect(mesh_dir.config, "client")

    with ThreadPoolExecutor(1) as runner:
        load = runner.submit(run_all, node, range(150), 24, seconds=0.2, timeout=30)
        wait_for(lambda: len(served(first)) >= 10, 30, "the first replica to begin 10 steps")
        os.kill(first.pid, signal.SIGTERM)
        results = load.result(timeout=120)

    assert [r for r in results if isinstance(r, Exception)] == []
    assert first.proc.wait(timeout=30) == 0
    assert "mesh.peer_stopped" in first.log_text()
    on_first, on_second = served(first), served(second)
    assert not on_first & on_second
    assert on_first | on_second == set(range(150))
    for n in on_first:
        assert results[n].context["served_by"] == first.pid


@pytest.mark.slow
def test_partition_between_peers(netns, chain: MeshDir, peers: Peers, connect) -> None:
    """auth in its own network namespace; the link is cut mid-load: flows fail within
    their deadline naming auth while cut, and succeed once it is restored."""
    # A fresh namespace has ports of its own, all free: auth's is known before it starts.
    chain.write_config({"client": False, "server": True, "auth": f"{netns.ns_ip}:50052"})
    auth = peers.start(chain, "auth", prefix=netns.exec)
    peers.start(chain, "server")  # after auth, which it dials
    node = connect(chain.config, "client")
    assert run_chain(node, range(20), timeout=5) == [None] * 20

    with ThreadPoolExecutor(1) as runner:
        load = runner.submit(run_chain, node, range(100, 132), timeout=2, seconds=0.1)
        wait_for(lambda: len(flows_on(auth)) >= 36, 30, "flows to reach auth")
        netns.link(up=False)
        cut = run_chain(node, range(200, 204), timeout=2)
        during = load.result(timeout=60)

    assert all(isinstance(e, mesh.PeerError | mesh.FlowTimeout) for e in cut), cut
    assert all(e.machine == "auth" for e in cut), cut
    assert all(e is None or e.machine == "auth" for e in during), during

    assert any(e is not None for e in during)

    netns.link(up=True)
    wait_for(lambda: run_chain(node, range(300, 302), timeout=5) == [None, None], 60, "recovery")
    assert auth.alive()


def flows_on(peer: Peer) -> set[str]:
    return {e["flow_id"] for e in peer.events() if str(e.get("event", "")).startswith("Checking")}


def run_chain(node: mesh.Node, flows: range, timeout: float, seconds: float = 0) -> list[Any]:
    """Run flow ``chain`` for each n, 8 at a time: None for a success, else the MeshError.

    Each flow must end within its deadline: that is the promise under test while the link is
    cut (the slack is for a loaded machine)."""

    def one(n: int) -> Any:
        began = time.monotonic()
        try:
            node.start("chain", n=n, auth_seconds=seconds, timeout=timeout)
        except mesh.MeshError as exc:
            return exc
        finally:
            elapsed = time.monotonic() - began
            assert elapsed < timeout + 5, f"flow {n} took {elapsed:.1f} s of {timeout} s"
        return None

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, flows))
