"""Durable flows end to end: real peers, real ``kill -9``, real SQLite journals.

A 4-machine chain, ``client`` (no address) -> ``a`` -> ``b`` -> ``c`` -> ``client``, every
machine's step writing a ledger row in its step's transaction (``mesh.step_transaction``):
each test kills or stops something mid-flow and checks that the flow still finishes and
that every (flow, line) is in the ledger exactly once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.cli import mesh_env, run_mesh
from support.meshdir import MeshDir
from support.peers import Peer, Peers

import mesh
from mesh.config import load_config
from mesh.tools import flows as flows_tool

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
        extra=f"durable = {durable}\ntimeout = 60\n{extra or 'grace = 2'}",
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
    # Where it ended, as `mesh flows` lists it: the originator's last line, not line 0.
    (done,) = flows_tool.list_flows(load_config(mesh_dir.config), state="done")
    assert (done.flow_id, done.machine, done.line) == (result.flow_id, "client", 4)


ORIGINATOR = """
import sys

import mesh

node = mesh.connect(sys.argv[1], machine="client")
result = node.start("order", item=sys.argv[2], card="4242424242424242", pause_on="c", pause=3)
print("finished", result.flow_id, flush=True)
"""


def test_originator_killed_result_fetched(
    mesh_dir: MeshDir, peers: Peers, connect: Any, tmp_path: Path
) -> None:
    """kill -9 of the originator while c runs its step: the flow goes on without it; the
    next process of client (mesh.connect) finishes its last line; node.result and
    `mesh flows result` give the result."""
    order_mesh(mesh_dir)
    start_chain(peers, mesh_dir)
    script = tmp_path / "originate.py"
    script.write_text(ORIGINATOR, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mesh_dir.config), "kettle"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=mesh_env(),
        cwd=mesh_dir.root,
    )
    try:
        wait_for((mesh_dir.root / "started-c-kettle").exists, 30, "c's step")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    config = load_config(mesh_dir.config)
    running = flows_tool.list_flows(config, request="order")
    assert len(running) == 1, running
    flow_id = running[0].flow_id
    assert running[0].state in ("running", "waiting")
    time.sleep(3.5)  # c's step ends; the flow is handed back to a client that is gone
    node = connect(mesh_dir.config, "client")  # recovers the flow this machine started
    result = node.result(flow_id, timeout=30)
    assert result.context["item"] == "kettle"
    assert result.context["c"] > 0
    assert [s.index for s in result.steps] == [0, 1, 2, 3, 4]  # the whole timeline
    assert result.masked_context()["card"] == "***"
    exactly_once(mesh_dir, [flow_id])
    shown = run_mesh("flows", "result", flow_id, "-c", mesh_dir.config)
    assert shown.returncode == 0, shown.stderr
    assert "kettle" in shown.stdout
    assert "4242424242424242" not in shown.stdout
    assert '"***"' in shown.stdout
    listed = run_mesh("flows", "--state", "done", "-c", mesh_dir.config)
    assert flow_id in listed.stdout, listed.stdout + listed.stderr


@pytest.mark.parametrize(
    "down", [8.0, pytest.param(30.0, marks=pytest.mark.slow)], ids=["8s", "30s"]
)
def test_machine_down_for_long_flows_wait_then_finish(
    mesh_dir: MeshDir, peers: Peers, connect: Any, down: float
) -> None:
    """c is down for 8 s (30 s, slow), longer than a plain flow's retries (a few seconds):
    durable flows wait for it, `mesh flows` says why, and they finish once it is back."""
    order_mesh(mesh_dir)
    chain = start_chain(peers, mesh_dir)
    chain["c"].kill()
    node = connect(mesh_dir.config, "client")
    runs = [
        in_thread(lambda i=i: node.start("order", item=f"cup{i}", card="1111222233334444"))
        for i in range(3)
    ]
    config = load_config(mesh_dir.config)

    def waiting() -> list[flows_tool.FlowSummary]:
        return list(flows_tool.list_flows(config, state="waiting"))

    found = wait_for(lambda: len(waiting()) == 3 and waiting(), 20, "3 waiting flows")
    assert all("waiting for c (" in (f.waiting or "") for f in found), found
    assert all(f.machine in ("b", "c") for f in found), found
    time.sleep(down - 2)
    assert all(thread.is_alive() for thread, _ in runs)
    restart(peers, mesh_dir, chain["c"])
    ids = []
    for thread, out in runs:
        thread.join(60)
        assert "error" not in out, out.get("error")
        ids.append(out["result"].flow_id)
    exactly_once(mesh_dir, ids)


def test_plain_flows_fail_fast_as_before(mesh_dir: MeshDir, peers: Peers, connect: Any) -> None:
    """A request that is not durable is not journaled, and a machine down fails it after
    the usual retries, not at its deadline."""
    order_mesh(mesh_dir, durable='["order"]')
    chain = start_chain(peers, mesh_dir)
    chain["c"].kill()
    node = connect(mesh_dir.config, "client")
    began = time.monotonic()
    with pytest.raises(mesh.PeerUnavailable):
        node.start("plain", item="x")
    assert time.monotonic() - began < 15
    assert flows_tool.list_flows(load_config(mesh_dir.config), request="plain") == []


def test_flows_cli_show_retry_cancel(mesh_dir: MeshDir, peers: Peers, connect: Any) -> None:
    """A durable flow that fails at b is listed as failed, shown with its error (secrets
    masked); after the fix, `mesh flows retry` runs it again from b and it is done. A flow
    waiting for a machine that is down is cancelled with `mesh flows cancel`."""
    order_mesh(mesh_dir)
    chain = start_chain(peers, mesh_dir)
    (mesh_dir.root / "fail-b").write_text("", encoding="utf-8")
    node = connect(mesh_dir.config, "client")
    with pytest.raises(mesh.FlowError) as failed:
        node.start("order", item="pot", card="5555666677778888")
    flow_id = failed.value.flow_id
    listed = run_mesh("flows", "--state", "failed", "-c", mesh_dir.config)
    assert listed.returncode == 0, listed.stderr
    assert flow_id in listed.stdout
    assert "b is broken" in listed.stdout
    shown = run_mesh("flows", "show", flow_id, "-c", mesh_dir.config)
    assert shown.returncode == 0, shown.stderr
    assert "Reserving pot" in shown.stdout
    assert "failed" in shown.stdout
    assert "5555666677778888" not in shown.stdout
    (mesh_dir.root / "fail-b").unlink()
    retried = run_mesh("flows", "retry", flow_id, "-c", mesh_dir.config)
    assert retried.returncode == 0, retried.stderr
    result = node.result(flow_id, timeout=30)
    assert result.context["c"] > 0
    exactly_once(mesh_dir, [flow_id])

    chain["c"].kill()
    thread, out = in_thread(lambda: node.start("order", item="pan", card="5555666677778888"))
    config = load_config(mesh_dir.config)
    waiting = wait_for(lambda: flows_tool.list_flows(config, state="waiting"), 20, "a waiting flow")
    cancelled = run_mesh("flows", "cancel", waiting[0].flow_id, "-c", mesh_dir.config)
    assert cancelled.returncode == 0, cancelled.stderr
    thread.join(30)
    assert isinstance(out.get("error"), mesh.MeshError), out
    assert flows_tool.show_flow(config, waiting[0].flow_id).summary.state in ("cancelled", "failed")


def test_corrupt_or_newer_journal_refuses_to_start(mesh_dir: MeshDir, tmp_path: Path) -> None:
    """A journal file that is not SQLite, or from a newer schema: `mesh peer` exits 1 with
    one line naming the file."""
    order_mesh(mesh_dir)
    mesh_dir.fix_ports()
    data = mesh_dir.root / ".mesh-data"
    data.mkdir()
    bad = data / "c.db"
    bad.write_bytes(b"this is not a database" * 100)
    done = run_mesh("peer", "c", "-c", mesh_dir.config, timeout=30)
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if "c.db" in ln]
    assert len(lines) == 1, done.stderr
    assert str(bad) in lines[0]
    assert "Traceback" not in done.stderr
    bad.unlink()
    with sqlite3.connect(bad) as conn:
        conn.execute("CREATE TABLE mesh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO mesh_meta VALUES ('schema_version', '99')")
    done = run_mesh("peer", "c", "-c", mesh_dir.config, timeout=30)
    assert done.returncode == 1
    assert "newer" in done.stderr and str(bad) in done.stderr, done.stderr


def test_sigterm_leaves_durable_flows_to_the_next_start(
    mesh_dir: MeshDir, peers: Peers, connect: Any
) -> None:
    """SIGTERM of b while its step outlasts grace: b exits 0 without failing the flow
    (logging mesh.flow_left), its next start goes on with it, and the flow finishes."""
    order_mesh(mesh_dir)
    chain = start_chain(peers, mesh_dir)
    node = connect(mesh_dir.config, "client")
    thread, out = in_thread(
        lambda: node.start("order", item="jar", card="4242424242424242", pause_on="b", pause=4)
    )
    wait_for((mesh_dir.root / "started-b-jar").exists, 20, "b's step")
    began = time.monotonic()
    assert chain["b"].stop() == 0
    assert time.monotonic() - began < 8
    assert any(e["event"] == "mesh.flow_left" for e in chain["b"].events())
    assert thread.is_alive()
    restart(peers, mesh_dir, chain["b"])
    thread.join(60)
    assert "error" not in out, out.get("error")
    exactly_once(mesh_dir, [out["result"].flow_id])


CHAOS_ORIGINATOR = """
import asyncio
import random
import sys

import mesh

node = mesh.connect(sys.argv[1], machine="client")
count = int(sys.argv[2])


async def one(i):
    machine = random.choice(["a", "b", "c", "none"])
    await node.start_async(
        "order", item=f"chaos{i}", card="4242424242424242", pause_on=machine,
        pause=random.uniform(0.0, 2.0),
    )


async def main():
    await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)

asyncio.run(main())
print("all done", flush=True)
"""


@pytest.mark.slow
def test_chaos_kill_each_machine_in_turn(
    mesh_dir: MeshDir, peers: Peers, connect: Any, tmp_path: Path
) -> None:
    """200 durable flows in flight across 4 machines; kill -9 b, a, c and the originator in
    turn, each restarted: every flow the originator journaled completes, and each step is
    in its machine's ledger exactly once."""
    order_mesh(mesh_dir, extra="grace = 1")
    chain = start_chain(peers, mesh_dir)
    script = tmp_path / "chaos.py"
    script.write_text(CHAOS_ORIGINATOR, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mesh_dir.config), "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=mesh_env(),
        cwd=mesh_dir.root,
    )
    recovered = 0
    try:
        time.sleep(1.5)
        for machine in ("b", "a", "c"):
            chain[machine].kill()
            time.sleep(0.3)
            chain[machine] = restart(peers, mesh_dir, chain[machine])
            recovered += sum(e["event"] == "mesh.flow_recovered" for e in chain[machine].events())
            time.sleep(0.7)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    node = connect(mesh_dir.config, "client")
    config = load_config(mesh_dir.config)
    started = [f.flow_id for f in flows_tool.list_flows(config, request="order")]
    assert len(started) >= 100, started
    assert recovered > 0  # the kills found flows mid-way
    for flow_id in started:
        result = node.result(flow_id, timeout=40)
        assert result.steps[-1].index == 4
    exactly_once(mesh_dir, started)
    stuck = flows_tool.list_flows(config, state="running") + flows_tool.list_flows(
        config, state="waiting"
    )
    assert stuck == []


def test_flows_rpcs_are_behind_the_token(
    mesh_dir: MeshDir, peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a token, `mesh flows` without it gets nothing from a peer (named unreachable,
    UNAUTHENTICATED), and with it gets the peer's flows; Steer is refused likewise."""
    order_mesh(mesh_dir)
    token = "a-token-of-at-least-16-chars"
    peers.start(mesh_dir, "c", env={"MESH_TOKEN": token})
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    without = flows_tool.list_flows(load_config(mesh_dir.config))
    assert any("UNAUTHENTICATED" in u for u in without.unreachable), without.unreachable
    with pytest.raises(mesh.MeshError, match=r"UNAUTHENTICATED|refused"):
        flows_tool._steer(load_config(mesh_dir.config), "cancel", "f" * 32, None)
    monkeypatch.setenv("MESH_TOKEN", token)
    with_token = flows_tool.list_flows(load_config(mesh_dir.config))
    assert not [u for u in with_token.unreachable if u.startswith("c ")], with_token.unreachable


BULK_FLOW = (
    "Request\tLog\tMachine\tWhen\tEach\n"
    "bulk\tBulk order :n\tclient\n"
    "bulk\tPacking one item\tpacker\t\titems\n"
    "bulk\tBulk order :n packed\tclient\n"
)

#: Each element writes its ledger row in its step's transaction; item i takes 0.15 s * i,
#: so when some have finished the others are still running.
BULK_SERVICE = """
import os
import pathlib
import time

import structlog

import mesh

log = structlog.get_logger()
HERE = pathlib.Path(__file__).parent


@mesh.handler("bulk", "Packing one item")
def pack(ctx):
    (HERE / f"packing-{ctx['item']}-{os.getpid()}").touch()
    time.sleep(0.15 * ctx["item"])
    with mesh.step_transaction() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ledger (flow_id TEXT, line INTEGER, item INTEGER)")
        step = mesh.step_id()
        conn.execute("INSERT INTO ledger VALUES (?, ?, ?)", (step.flow_id, step.line, ctx["item"]))
    log.info("next", packed=ctx["item"] * 10)
"""


def test_a_machine_killed_in_the_middle_of_a_fan_out(
    mesh_dir: MeshDir, peers: Peers, connect: Any
) -> None:
    """kill -9 of the machine an Each row fans out to, with some elements done and the
    others running: it restarts, the elements it had finished are answered from its
    journal, the others run again; the flow finishes with every element's result in
    order, and each element is in the ledger exactly once."""
    mesh_dir.flow(BULK_FLOW)
    mesh_dir.service(BULK_SERVICE)
    mesh_dir.write_config({"client": False, "packer": True}, extra="durable = true\ntimeout = 60")
    packer = peers.start(mesh_dir, "packer")
    node = connect(mesh_dir.config, "client")
    items = list(range(12))
    thread, out = in_thread(lambda: node.start("bulk", n=1, items=items))

    def rows() -> list[tuple[str, int, int]]:
        path = mesh_dir.root / ".mesh-data" / "packer.db"
        with sqlite3.connect(path) as conn:
            try:
                return [tuple(r) for r in conn.execute("SELECT flow_id, line, item FROM ledger")]
            except sqlite3.OperationalError:
                return []

    wait_for(lambda: len(rows()) >= 4, 30, "four elements packed")
    before = rows()
    assert len(before) < len(items)  # the others are still running
    packer.kill()
    restart(peers, mesh_dir, packer)
    thread.join(60)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.context["items_results"] == [{"packed": i * 10} for i in items]
    after = rows()
    assert sorted(r[2] for r in after) == items, after  # each element once
    assert len({(r[0], r[1]) for r in after}) == len(items)
    assert set(before) <= set(after)  # the finished ones were not run again


GIFT_FLOW = (
    "Request\tLog\tMachine\tWhen\tEach\n"
    "gift\tGift for :who\tclient\n"
    "gift\t@wrap\tclient\n"
    "gift\tGift sent to :who\tclient\n"
    "wrap\tWrapping for :who\twrapper\n"
    "wrap\tRibbon for :who\tribbon\n"
)

GIFT_SERVICE = """
import os
import pathlib
import time

import structlog

import mesh

log = structlog.get_logger()
HERE = pathlib.Path(__file__).parent


def _step(ctx, me):
    (HERE / f"started-{me}").write_text(str(os.getpid()))
    if me == "ribbon":
        time.sleep(1.5)
    with mesh.step_transaction() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ledger (flow_id TEXT, line INTEGER)")
        step = mesh.step_id()
        conn.execute("INSERT INTO ledger VALUES (?, ?)", (step.flow_id, step.line))
    log.info("next", **{me: os.getpid()})


@mesh.handler("wrap", "Wrapping for :who")
def wrapping(ctx):
    _step(ctx, "wrapper")


@mesh.handler("wrap", "Ribbon for :who")
def ribbon(ctx):
    _step(ctx, "ribbon")
"""


def test_a_machine_killed_in_the_middle_of_a_sub_flow(
    mesh_dir: MeshDir, peers: Peers, connect: Any
) -> None:
    """kill -9 of the machine running the second line of a sub-flow: it restarts and runs
    that step again, the first is not run again, the flow finishes; each step of the
    sub-flow is in its machine's ledger exactly once."""
    mesh_dir.flow(GIFT_FLOW)
    mesh_dir.service(GIFT_SERVICE)
    mesh_dir.write_config(
        {"client": False, "wrapper": True, "ribbon": True}, extra="durable = true\ntimeout = 60"
    )
    ribbon = peers.start(mesh_dir, "ribbon")
    peers.start(mesh_dir, "wrapper")
    node = connect(mesh_dir.config, "client")
    thread, out = in_thread(lambda: node.start("gift", who="ada"))
    wait_for((mesh_dir.root / "started-ribbon").exists, 20, "ribbon's step")
    ribbon.kill()
    again = restart(peers, mesh_dir, ribbon)
    thread.join(60)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.context["wrapper"] > 0 and result.context["ribbon"] == again.pid
    for machine in ("wrapper", "ribbon"):
        rows = ledger(mesh_dir, machine)
        assert len(rows) == 1 and rows[0][0].startswith(result.flow_id + "/"), (machine, rows)
