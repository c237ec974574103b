"""Stopping a peer, for real: SIGTERM and Ctrl-C while steps run, past ``grace`` and twice.

Each peer is a ``mesh peer`` process and each signal a real one. What is checked is
what an operator and a caller would see: the process is gone in time, with an exit
code and a log line that say what it abandoned; the caller gets an error saying so;
and no step ran on a second replica.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.cli import mesh_env
from support.meshdir import MeshDir
from support.peers import Peer, Peers

import mesh
from mesh.peer import SERVICE_NAME

WORK_FLOW = (
    "Request\tLog\tMachine\n"
    "work\tAsked for :n\tclient\n"
    "work\tWorking on :n\tserver\n"
    "work\tDone with :n\tclient\n"
)

#: Records every run of the step in a ledger file, tells the test which process runs
#: it, then works for ``seconds`` or until the test lets it go (closes the socket).
LEDGER_SERVICE = """
import os
import socket

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("work", "Working on :n")
def work(ctx):
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"{ctx['n']} {os.getpid()}\\n")
    with socket.create_connection(("127.0.0.1", ctx["tell_port"])) as told:
        told.sendall(str(os.getpid()).encode())
        told.settimeout(ctx["seconds"])
        try:
            told.recv(1)
        except TimeoutError:
            pass
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"{ctx['n']} done\\n")
    log.info("next", served_by=os.getpid())
"""

#: Generous: the peers' promise is ``grace`` (1 s here); this only bounds a broken test.
EXIT_WITHIN = 15.0


def work_mesh(mesh_dir: MeshDir, server: bool | int, grace: float) -> MeshDir:
    mesh_dir.flow(WORK_FLOW)
    mesh_dir.service(LEDGER_SERVICE)
    mesh_dir.write_config({"client": False, "server": server}, extra=f"grace = {grace}")
    return mesh_dir


class StepBegun:
    """A socket the step connects to once it has begun: ``wait()`` gives its process id;
    the step then works until ``close()`` lets it go (or its ``seconds`` pass)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []

    def wait(self) -> int:
        conn, _ = self.sock.accept()
        self.held.append(conn)
        conn.settimeout(30)
        return int(conn.recv(32))

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


def ledger_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def events(peer: Peer, name: str) -> list[dict[str, Any]]:
    return [e for e in peer.events() if e.get("event") == name]


def test_sigterm_past_grace_does_not_run_the_step_on_another_replica(
    mesh_dir: MeshDir, peers: Peers, connect, tmp_path: Path
) -> None:
    """SIGTERM to the replica running a step that outlasts ``grace``. Before, the stopping
    server cut the call with UNAVAILABLE, gRPC retried it on the other replica, the step
    ran on both and the flow reported success. Now the flow fails at once saying the
    server stopped mid-step and the step was not retried; the ledger has one run; the
    stopped replica exits non-zero, logging the step it abandoned."""
    work_mesh(mesh_dir, 2, grace=1)
    replicas = [peers.start(mesh_dir, "server", replica=k) for k in (1, 2)]
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"
    begun = StepBegun()
    try:
        with ThreadPoolExecutor(1) as pool:
            flow = pool.submit(
                node.start,
                "work",
                n=1,
                ledger=str(ledger),
                tell_port=begun.port,
                seconds=10,
                timeout=60,
            )
            pid = begun.wait()
            victim = next(r for r in replicas if r.pid == pid)
            os.kill(pid, signal.SIGTERM)
            with pytest.raises(mesh.PeerUnavailable) as info:
                flow.result(timeout=60)
    finally:
        begun.close()

    message = str(info.value)
    assert info.value.machine == "server"
    assert "stopped while running work line 1 'Working on :n'" in message
    assert "may have run, so it was not retried" in message
    assert f"1 {pid}" in ledger_lines(ledger)
    assert [line for line in ledger_lines(ledger) if not line.endswith("done")] == [f"1 {pid}"]
    victim.expect_exit = 1  # it abandoned a step
    assert victim.proc.wait(timeout=EXIT_WITHIN) == 1
    flow_id = next(e["flow_id"] for e in victim.events() if e.get("event") == "Working on 1")
    abandoned = events(victim, "mesh.step_abandoned")
    assert [(e["flow_id"], e["line_index"]) for e in abandoned] == [(flow_id, 1)]
    other = next(r for r in replicas if r is not victim)
    assert other.alive()


def test_sigterm_exits_after_grace_whatever_the_handler_does(
    mesh_dir: MeshDir, peers: Peers, connect, tmp_path: Path
) -> None:
    """A handler that does not return for two minutes, SIGTERM with ``grace = 1``. Before,
    the peer logged ``mesh.peer_stopped`` and stayed alive until the handler returned (the
    interpreter waits for pool threads at exit). Now it exits 1 within moments of grace,
    its log naming the step it abandoned, and the caller hears why at once."""
    work_mesh(mesh_dir, True, grace=1)
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    begun = StepBegun()
    try:
        with ThreadPoolExecutor(1) as pool:
            flow = pool.submit(
                node.start,
                "work",
                n=2,
                ledger=str(tmp_path / "ledger.txt"),
                tell_port=begun.port,
                seconds=120,
                timeout=60,
            )
            begun.wait()
            os.kill(server.pid, signal.SIGTERM)
            server.expect_exit = 1
            try:
                code = server.proc.wait(timeout=EXIT_WITHIN)
            except subprocess.TimeoutExpired:
                pytest.fail(f"peer still running {EXIT_WITHIN} s after SIGTERM with grace 1 s")
            with pytest.raises(mesh.PeerUnavailable) as info:
                flow.result(timeout=60)
    finally:
        begun.close()

    assert code == 1
    assert "stopped while running work line 1" in str(info.value)
    flow_id = next(e["flow_id"] for e in server.events() if e.get("event") == "Working on 2")
    abandoned = events(server, "mesh.step_abandoned")
    assert [(e["flow_id"], e["line_index"]) for e in abandoned] == [(flow_id, 1)]
    stopped = events(server, "mesh.peer_stopped")
    assert stopped[0]["level"] == "error"
    assert stopped[0]["abandoned"] == [f"work line 1 of flow {flow_id}"]


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_exits_at_once(
    mesh_dir: MeshDir, peers: Peers, connect, tmp_path: Path, second: signal.Signals
) -> None:
    """SIGTERM, then SIGTERM or Ctrl-C again while a step runs within a long ``grace``:
    before, the second signal was swallowed and the peer went on waiting; now it exits
    at once, non-zero, saying so on stderr."""
    work_mesh(mesh_dir, True, grace=60)
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    begun = StepBegun()
    try:
        with ThreadPoolExecutor(1) as pool:
            flow = pool.submit(
                node.start,
                "work",
                n=3,
                ledger=str(tmp_path / "ledger.txt"),
                tell_port=begun.port,
                seconds=120,
                timeout=90,
            )
            begun.wait()
            os.kill(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not events(server, "mesh.peer_stopping"):
                assert time.monotonic() < deadline, "the peer never began to stop"
                time.sleep(0.05)
            os.kill(server.pid, second)
            server.expect_exit = 128 + second
            try:
                code = server.proc.wait(timeout=EXIT_WITHIN)
            except subprocess.TimeoutExpired:
                pytest.fail(f"peer still running {EXIT_WITHIN} s after a second {second.name}")
            with pytest.raises(mesh.PeerUnavailable):
                flow.result(timeout=90)
    finally:
        begun.close()

    assert code == 128 + second
    assert f"{second.name} again; exiting now" in server.log_text()


def test_stop_while_health_watchers_leave_does_not_hang(mesh_dir: MeshDir, peers: Peers) -> None:
    """SIGTERM while 100 health watchers (what every caller's channel keeps open) go away.
    grpcio-health-checking's servicer sent NOT_SERVING while holding its lock, waiting for
    gRPC's polling thread, which waited for that lock to drop a closed watcher: the peer
    hung for good in ``enter_graceful_shutdown``. Now it exits 0."""
    work_mesh(mesh_dir, True, grace=5)
    for round_ in range(3):
        server = peers.start(mesh_dir, "server")
        channels = [grpc.insecure_channel(server.address) for _ in range(100)]
        try:
            watches = []
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            for channel in channels:
                watch = health_pb2_grpc.HealthStub(channel).Watch(request)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                watches.append(watch)
            os.kill(server.pid, signal.SIGTERM)
            for watch in watches:
                watch.cancel()
            try:
                code = server.proc.wait(timeout=EXIT_WITHIN)
            except subprocess.TimeoutExpired:
                server.kill()
                pytest.fail(f"round {round_}: peer hung on stop:\n{server.log_text()[-3000:]}")
        finally:
            for channel in channels:
                channel.close()
        assert code == 0, server.log_text()[-3000:]


def test_peer_embedded_in_a_process_stops_its_steps_too(
    mesh_dir: MeshDir, connect, tmp_path: Path
) -> None:
    """node.serve() in this process, node.stop(grace) while a step outlasts it: the
    caller (a ``mesh call`` process) is told the step may have run, and stop() returns
    the step it abandoned instead of handing it to a retry."""
    work_mesh(mesh_dir, True, grace=1)
    mesh_dir.fix_ports()  # node.serve() binds the address the config gives
    server = connect(mesh_dir.config, "server")
    server.serve()
    begun = StepBegun()
    try:
        call = subprocess.Popen(
            [
                *(sys.executable, "-m", "mesh", "call", "work", "n:=4", f"tell_port:={begun.port}"),
                *(f"ledger={tmp_path / 'ledger.txt'}", "seconds:=5", "--timeout", "60"),
                *("-c", str(mesh_dir.config)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=mesh_env(),
            cwd=tmp_path,
        )
        try:
            begun.wait()
            abandoned = server.stop(grace=0.5)
            _, err = call.communicate(timeout=60)
        finally:
            if call.poll() is None:
                call.kill()
                call.wait()
    finally:
        begun.close()

    # Let the handler, still running in this process, finish before the test ends.
    deadline = time.monotonic() + 30
    while "4 done" not in ledger_lines(tmp_path / "ledger.txt"):
        assert time.monotonic() < deadline, "the abandoned handler never returned"
        time.sleep(0.05)

    assert [(s.request, s.line_index) for s in abandoned] == [("work", 1)]
    assert call.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("mesh call: server (127.0.0.1:"), err
    assert "stopped while running work line 1 'Working on :n'" in last
