"""Durable flows end to end: real peers, real ``kill -9``, real SQLite journals.

A 4-machine chain, ``client`` (no address) -> ``a`` -> ``b`` -> ``c`` -> ``client``, every
machine's step writing a ledger row in its step's transaction (``mesh.step_transaction``):
each test kills or stops something mid-flow and checks that the flow still finishes and
that every (flow, line) is in the ledger exactly once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.meshdir import MeshDir
from support.peers import Peer, Peers

ORDER_FLOW = (
    "Request\tLog\tMachine\n"
    "order\tOrder placed for :item by #card\tclient\n"
    "order\tReserving :item\ta\n"
    "order\tCharging :item\tb\n"
    "order\tShipping :item\tc\n"
    "order\tOrder done for :item\tclient\n"
    "plain\tPlain request for :item\tclient\n"
    "plain\tPlain step for :item\tc\n"
)

#: Each machine's step: pause when the flow asks it to (so a test can kill it mid-step),
#: fail while a flag file exists, and write its ledger row in the step's transaction.
ORDER_SERVICE = """
import os
import pathlib
import time

import structlog

import mesh

log = structlog.get_logger()
HERE = pathlib.Path(__file__).parent


def _step(ctx, me):
    if ctx.get("pause_on") == me:
        (HERE / f"started-{me}-{ctx['item']}").write_text(str(os.getpid()))
        time.sleep(float(ctx.get("pause", 2)))
    if (HERE / f"fail-{me}").exists():
        raise RuntimeError(f"{me} is broken (remove fail-{me} to fix it)")
    with mesh.step_transaction() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ledger (flow_id TEXT, line INTEGER, pid INTEGER)")
        step = mesh.step_id()
        conn.execute("INSERT INTO ledger VALUES (?, ?, ?)", (step.flow_id, step.line, os.getpid()))
    log.info("next", **{me: os.getpid()})


@mesh.handler("order", "Reserving :item")
def reserve(ctx):
    _step(ctx, "a")


@mesh.handler("order", "Charging :item")
def charge(ctx):
    _step(ctx, "b")


@mesh.handler("order", "Shipping :item")
def ship(ctx):
    _step(ctx, "c")


@mesh.handler("plain", "Plain step for :item")
def plain(ctx):
    log.info("next", plain=True)
"""


def order_mesh(mesh_dir: MeshDir, durable: str = "true", extra: str = "") -> MeshDir:
    mesh_dir.flow(ORDER_FLOW)
    mesh_dir.service(ORDER_SERVICE)
    mesh_dir.write_config(
        {"client": False, "a": True, "b": True, "c": True},
        extra=f"durable = {durable}\ntimeout = 60\ngrace = 2\n{extra}",
    )
    return mesh_dir


def start_chain(peers: Peers, mesh_dir: MeshDir) -> dict[str, Peer]:
    # The last machine first: each peer reads its config once, with the ports so far.
    return {m: peers.start(mesh_dir, m) for m in ("c", "b", "a")}


def restart(peers: Peers, mesh_dir: MeshDir, peer: Peer) -> Peer:
    return peers.start(mesh_dir, peer.machine)


def ledger(mesh_dir: MeshDir, machine: str) -> list[tuple[str, int]]:
    path = mesh_dir.root / ".mesh-data" / f"{machine}.db"
    with sqlite3.connect(path) as conn:
        try:
            return [tuple(r) for r in conn.execute("SELECT flow_id, line FROM ledger")]
        except sqlite3.OperationalError:
            return []


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"{what} not within {timeout} s")


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def exactly_once(mesh_dir: MeshDir, flow_ids: list[str]) -> None:
    for machine, line in (("a", 1), ("b", 2), ("c", 3)):
        rows = ledger(mesh_dir, machine)
        for flow_id in flow_ids:
            assert rows.count((flow_id, line)) == 1, (machine, flow_id, rows)


def test_middle_machine_killed_mid_step(mesh_dir: MeshDir, peers: Peers, connect: Any) -> None:
    """kill -9 of b while its step runs: b restarts, runs the step again (its ledger row of
    the killed run was never committed), the flow finishes; each step in a ledger once."""
    order_mesh(mesh_dir)
    chain = start_chain(peers, mesh_dir)
    node = connect(mesh_dir.config, "client")
    thread, out = in_thread(
        lambda: node.start("order", item="tea", card="4242424242424242", pause_on="b", pause=1.5)
    )
    wait_for((mesh_dir.root / "started-b-tea").exists, 20, "b's step")
    chain["b"].kill()
    again = restart(peers, mesh_dir, chain["b"])
    thread.join(60)
    assert any(e["event"] == "mesh.flow_recovered" for e in again.events())
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.context["c"] > 0
    assert [s.index for s in result.steps][-1] == 4
    exactly_once(mesh_dir, [result.flow_id])
