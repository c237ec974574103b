"""Exactly-once steps: the reply record itself, and a reply lost for real between two peers."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support.meshdir import MeshDir
from support.peers import Peers

from mesh.dedup import Replies


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_finished_step_answers_from_the_record() -> None:
    """A second call for a finished key gets the first reply; the step is not run again."""
    replies: Replies[str] = Replies(10, 60)
    runs: list[int] = []

    def run() -> str:
        runs.append(1)
        return f"reply {len(runs)}"

    assert replies.once(("f1", 2), run, 1) == "reply 1"
    assert replies.once(("f1", 2), run, 1) == "reply 1"
    assert replies.once(("f1", 3), run, 1) == "reply 2"
    assert len(runs) == 2
    assert replies.duplicates == 1


def test_duplicate_of_a_running_step_waits_for_it() -> None:
    """A duplicate arriving while the step runs waits and gets the same reply."""
    replies: Replies[str] = Replies(10, 60)
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def slow() -> str:
        runs.append(1)
        started.set()
        release.wait(10)
        return "the one reply"

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(replies.once, "k", slow, 10)
        assert started.wait(10)
        second = pool.submit(replies.once, "k", slow, 10)
        release.set()
        assert first.result(10) == second.result(10) == "the one reply"
    assert runs == [1]


def test_duplicate_gives_up_at_its_own_deadline() -> None:
    """A duplicate whose wait ends before the first run does gets None, not a second run."""
    replies: Replies[str] = Replies(10, 60)
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(replies.once, "k", lambda: release.wait(10) and "done", 10)
        while "k" not in replies:
            threading.Event().wait(0.01)
        assert replies.once("k", lambda: "second run", 0.05) is None
        release.set()
        assert first.result(10) == "done"


def test_record_is_bounded_by_size() -> None:
    """Past ``size`` finished entries the oldest is forgotten (and would run again)."""
    replies: Replies[int] = Replies(3, 60)
    for n in range(5):
        replies.once(n, lambda n=n: n, 1)
    assert len(replies) == 3
    assert 0 not in replies and 1 not in replies
    assert replies.once(4, lambda: -1, 1) == 4
    assert replies.once(0, lambda: -1, 1) == -1


def test_record_is_bounded_by_age() -> None:
    """A finished entry older than ``age`` seconds is forgotten."""
    clock = Clock()
    replies: Replies[str] = Replies(100, 5, clock)
    replies.once("old", lambda: "first", 1)
    clock.now += 4
    replies.once("young", lambda: "first", 1)
    assert replies.once("old", lambda: "again", 1) == "first"
    clock.now += 2  # "old" is 6 s old now, "young" 2 s
    assert replies.once("young", lambda: "again", 1) == "first"
    assert "old" not in replies
    assert replies.once("old", lambda: "again", 1) == "again"


def test_a_step_that_raises_is_not_recorded() -> None:
    """A run that raises leaves no entry: its caller got the exception."""
    replies: Replies[str] = Replies(10, 60)

    def boom() -> str:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        replies.once("k", boom, 1)
    assert "k" not in replies
    assert replies.once("k", lambda: "ran", 1) == "ran"


def test_size_and_age_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Replies(0, 60)


# -- a reply lost for real -------------------------------------------------------------

RELAY_FLOW = (
    "Request\tLog\tMachine\n"
    "charge\tCharging :n\tclient\n"
    "charge\tForwarding charge :n\tserver\n"
    "charge\tTaking payment :n\tbank\n"
    "charge\tCharged :n\tclient\n"
)

BANK_SERVICE = """
import os
import socket
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("charge", "Taking payment :n")
def take_payment(ctx):
    if "tell_port" in ctx:  # let the test know the step has begun
        socket.create_connection(("127.0.0.1", ctx["tell_port"])).close()
        time.sleep(1.5)  # longer than deadlines.ADOPT_WINDOW
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"{ctx['n']} {os.getpid()}\\n")
    log.info("next", paid=True)
"""


@pytest.fixture
def bank_mesh(mesh_dir: MeshDir, reply_dropper) -> tuple[MeshDir, Any]:
    """client → server → bank, where peers dial bank through a ReplyDropper proxy."""
    mesh_dir.flow(RELAY_FLOW)
    mesh_dir.service(BANK_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "bank": True})
    mesh_dir.fix_ports("bank")  # the proxy in front of bank is made before bank starts
    bank_listen = mesh_dir.addresses["bank"]
    host, port = bank_listen.rsplit(":", 1)
    proxy = reply_dropper((host, int(port)), marker=b"charge", drops=0)
    # Peers dial bank through the proxy; bank binds behind it.
    text = mesh_dir.config.read_text(encoding="utf-8").replace(
        f'bank = "{bank_listen}"',
        f'bank = {{ address = "{proxy.address}", listen = "{bank_listen}" }}',
    )
    mesh_dir.config.write_text(text, encoding="utf-8")
    return mesh_dir, proxy


def test_lost_reply_is_retried_and_the_step_runs_once(
    bank_mesh: tuple[MeshDir, Any], peers: Peers, connect, tmp_path: Path
) -> None:
    """server → bank through a proxy that cuts the connection after bank has replied:
    gRPC retries, bank answers from its record, the handler ran exactly once."""
    mesh_dir, proxy = bank_mesh
    server = peers.start(mesh_dir, "server")
    bank = peers.start(mesh_dir, "bank")
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"
    node.start("charge", n=0, ledger=str(ledger), timeout=20)  # warm: connections made
    proxy.drops = 1  # the next reply is lost

    result = node.start("charge", n=1, ledger=str(ledger), timeout=20)

    assert result.context["paid"] is True
    assert proxy.dropped == 1
    assert proxy.connections >= 2  # the retry came on a new connection
    assert ledger.read_text(encoding="utf-8").splitlines().count(f"1 {bank.pid}") == 1
    assert [line.split()[0] for line in ledger.read_text().splitlines()] == ["0", "1"]
    repeated = [e for e in bank.events() if e.get("event") == "mesh.step_repeated"]
    assert [(e["flow_id"], e["line_index"]) for e in repeated] == [(result.flow_id, 2)]
    assert server.alive()


def test_connection_lost_mid_step_the_retry_adopts_the_step(
    bank_mesh: tuple[MeshDir, Any], peers: Peers, connect, tmp_path: Path
) -> None:
    """The connection to bank breaks while its step runs: the retry waits for that step
    instead of running it again or failing it, and the flow succeeds."""
    mesh_dir, proxy = bank_mesh
    peers.start(mesh_dir, "server")
    bank = peers.start(mesh_dir, "bank")
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        flow = pool.submit(
            node.start, "charge", n=1, ledger=str(ledger), tell_port=port, timeout=20
        )
        listener.accept()[0].close()  # bank's step has begun
        proxy.cut_all()
        result = flow.result(timeout=30)

    assert result.context["paid"] is True
    assert ledger.read_text(encoding="utf-8").splitlines() == [f"1 {bank.pid}"]
    repeated = [e for e in bank.events() if e.get("event") == "mesh.step_repeated"]
    assert [(e["flow_id"], e["line_index"]) for e in repeated] == [(result.flow_id, 2)]
