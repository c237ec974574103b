"""Control flow end to end, with real peers: conditions, fan-out over replicas, sub-flows,
a request that loops by calling itself, the depth limit, and a forged call.

The originator is this process (``web``, no address); every other machine is a
``mesh peer`` process, ``inventory`` three replicas of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir
from support.peers import Peer, Peers

import mesh
from mesh.config import load_config
from mesh.v1 import mesh_pb2 as _pb2
from mesh.v1 import mesh_pb2_grpc as _pb2_grpc

SHOP_FLOW = (
    "Request\tLog\tMachine\tWhen\tEach\n"
    "checkout\tCart submitted by :user\tweb\n"
    "checkout\tReserving :sku\tinventory\t\titems\n"
    "checkout\tCharging card #card for :total\tpayments\n"
    "checkout\t@receipt\tweb\tcharged\n"
    "checkout\tPayment declined for :user\tweb\tnot charged\n"
    "refund\tRefunding :total to :user\tpayments\n"
    "refund\t@receipt\tweb\n"
    "receipt\tRendering receipt for :user\tweb\n"
    "receipt\tSending receipt to :email\tmailer\n"
    "count\tCounting :n\tcounter\n"
    "count\t@count\tcounter\tn < 5\n"
    "forever\tGoing round with :n\tcounter\n"
    "forever\t@forever\tcounter\tgo\n"
    "mailing\tMailing :n people\tweb\n"
    "mailing\t@note\tmailer\t\tpeople\n"
    "note\tNoting :item\tmailer\n"
    "note\tNoted\tcounter\n"
)

SHOP_SERVICE = """
import os
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("checkout", "Reserving :sku")
def reserve(ctx):
    item = ctx["item"]
    if item.get("fail"):
        raise ValueError(f"no stock for {item['sku']}")
    time.sleep(ctx.get("io", 0))
    # user is in the flow's context already: logged again, it is still in the result
    log.info("next", reserved=item["sku"], position=ctx["index"], pid=os.getpid(), user=ctx["user"])


@mesh.handler("checkout", "Charging card #card for :total")
def charge(ctx):
    log.info("next", charged=ctx["card"] == "4242424242424242")


@mesh.handler("refund", "Refunding :total to :user")
def refund(ctx):
    log.info("next", refunded=ctx["total"])


@mesh.handler("receipt", "Sending receipt to :email")
def send(ctx):
    log.info("next", receipt_to=ctx["email"], receipts=ctx.get("receipts", 0) + 1)


@mesh.handler("count", "Counting :n")
def count(ctx):
    log.info("next", n=ctx["n"] + 1)


@mesh.handler("note", "Noted")
def noted(ctx):
    log.info("next", noted=ctx["item"], at=ctx["index"])


@mesh.handler("forever", "Going round with :n")
def round_(ctx):
    log.info("next", n=ctx["n"] + 1)
"""

GOOD_CARD = "4242424242424242"


@pytest.fixture
def shop(mesh_dir: MeshDir, peers: Peers, connect) -> tuple[mesh.Node, dict[str, Any]]:
    mesh_dir.flow(SHOP_FLOW)
    mesh_dir.service(SHOP_SERVICE)
    mesh_dir.write_config(
        {"web": False, "inventory": 3, "payments": True, "mailer": True, "counter": True},
        extra="max_depth = 8",
    )
    started: dict[str, Any] = {"inventory": []}
    for k in (1, 2, 3):
        started["inventory"].append(peers.start(mesh_dir, "inventory", replica=k))
    for machine in ("counter", "mailer", "payments"):
        started[machine] = peers.start(mesh_dir, machine)
    started["config"] = mesh_dir.config
    return connect(mesh_dir.config, "web"), started


def cart(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"sku": f"sku-{i}", **extra} for i in range(n)]


def events(peer: Peer, event: str) -> list[dict[str, Any]]:
    return [e for e in peer.events() if e.get("event") == event]


def test_checkout_with_a_good_card_sends_the_receipt(shop) -> None:
    node, _ = shop
    result = node.start(
        "checkout",
        user="ada",
        email="ada@example.com",
        card=GOOD_CARD,
        total=12,
        items=cart(3),
        timeout=30,
    )
    ctx = result.context
    assert ctx["charged"] is True
    assert ctx["receipt_to"] == "ada@example.com"  # the sub-flow's context, merged
    assert [r["reserved"] for r in ctx["items_results"]] == ["sku-0", "sku-1", "sku-2"]
    assert "item" not in ctx and "index" not in ctx
    # The timeline: the fan-out's runs carry their position, the sub-flow's steps their
    # request and their own line index, the declined line is there as skipped.
    assert sorted(s.element for s in result.steps if s.index == 1 and not s.request) == [0, 1, 2]
    assert [(s.request, s.index, s.machine) for s in result.steps if s.request] == [
        ("receipt", 0, "web"),
        ("receipt", 1, "mailer"),
    ]
    [skipped] = [s for s in result.steps if s.skipped]
    assert (skipped.index, skipped.machine) == (4, "web")
    assert GOOD_CARD not in repr(result.steps)


def test_checkout_with_a_wrong_card_declines(shop) -> None:
    node, started = shop
    result = node.start(
        "checkout",
        user="bob",
        email="bob@example.com",
        card="1111",
        total=3,
        items=cart(2),
        timeout=30,
    )
    assert result.context["charged"] is False
    assert "receipt_to" not in result.context
    assert not [s for s in result.steps if s.request]  # no receipt ran
    [skipped] = [s for s in result.steps if s.skipped]
    assert skipped.index == 3
    assert [s.index for s in result.steps if not s.skipped and not s.element][-1] == 4
    # The choice cost no message: mailer never heard of this flow.
    assert not [
        e for e in started["mailer"].events() if e.get("flow_id", "").startswith(result.flow_id)
    ]
    # The skipped row is logged where the flow was (here, web), with its condition: payments
    # handed the flow back to web for the rows after its own.


def test_fifty_items_over_three_replicas_come_back_in_order(shop) -> None:
    node, started = shop
    items = cart(50)
    result = node.start(
        "checkout",
        user="ada",
        email="a@x",
        card=GOOD_CARD,
        total=1,
        items=items,
        io=0.02,
        timeout=60,
    )
    results = result.context["items_results"]
    assert [r["reserved"] for r in results] == [f"sku-{i}" for i in range(50)]
    assert [r["position"] for r in results] == list(range(50))
    assert {r["user"] for r in results} == {"ada"}  # what "next" logged, if unchanged too
    pids = {r["pid"] for r in results}
    assert pids == {p.pid for p in started["inventory"]}  # each replica served some
    # Each element ran once: the replicas' logs together have 50 runs of line 1.
    runs = [
        e
        for p in started["inventory"]
        for e in p.events()
        if e.get("line_index") == 1 and e.get("event", "").startswith("Reserving")
    ]
    assert len(runs) == 50


def test_one_failing_item_fails_the_row_naming_its_position(shop) -> None:
    node, _ = shop
    items = cart(50)
    items[17]["fail"] = True
    with pytest.raises(mesh.FlowError) as info:
        node.start(
            "checkout", user="ada", email="a@x", card=GOOD_CARD, total=1, items=items, timeout=60
        )
    message = str(info.value)
    assert "element 17 of items" in message
    assert "no stock for sku-17" in message
    assert info.value.line_index == 1
    assert info.value.request == "checkout"


def test_an_empty_cart_skips_the_row(shop) -> None:
    node, _ = shop
    result = node.start(
        "checkout", user="ada", email="a@x", card=GOOD_CARD, total=0, items=[], timeout=30
    )
    assert "items_results" not in result.context
    assert [s.index for s in result.steps if s.skipped] == [1, 4]


def test_one_sub_flow_called_from_two_requests(shop) -> None:
    node, _ = shop
    refund = node.start("refund", user="cy", email="cy@example.com", total=5, timeout=30)
    assert refund.context["refunded"] == 5
    assert refund.context["receipt_to"] == "cy@example.com"
    assert [(s.request, s.index) for s in refund.steps] == [
        ("", 0),
        ("", 1),
        ("receipt", 0),
        ("receipt", 1),
    ]
    checkout = node.start(
        "checkout",
        user="cy",
        email="cy@example.com",
        card=GOOD_CARD,
        total=5,
        items=cart(1),
        timeout=30,
    )
    assert checkout.context["receipts"] == 1


def test_a_request_loops_by_calling_itself(shop) -> None:
    node, started = shop
    result = node.start("count", n=0, timeout=30)
    assert result.context["n"] == 5
    counted = [s for s in result.steps if s.line.startswith("Counting")]
    assert len(counted) == 5
    assert [s.skipped for s in result.steps if s.index == 1][-1] is True  # the last @count
    skipped = events(started["counter"], "mesh.line_skipped")
    assert [e["condition"] for e in skipped] == ["n < 5"]
    assert skipped[0]["flow_id"].startswith(result.flow_id + "/")


def test_recursion_past_max_depth_fails_naming_the_request(shop) -> None:
    node, _ = shop
    with pytest.raises(mesh.FlowError) as info:
        node.start("forever", n=0, go=True, timeout=30)
    message = str(info.value)
    assert "'forever'" in message
    assert "max_depth 8" in message
    assert info.value.request == "forever"


def test_a_forged_call_for_a_line_no_path_allows_is_refused(shop) -> None:
    """mailer's receipt line 1 follows web's line 0 on every path: payments may not send
    it, whatever the context says."""
    _, started = shop
    config = load_config(started["config"])
    flow = config.flows["receipt"]
    mailer = started["mailer"]
    request = _pb2.ContinueRequest(
        request="receipt",
        line_index=1,
        context=json.dumps({"email": "x@y"}).encode(),
        flow_id="f" * 32,
        digest=flow.digest,
        via=["payments"],
    )
    with grpc.insecure_channel(mailer.address) as channel:
        stub = _pb2_grpc.MeshStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Continue(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "payments may not send receipt line 1" in info.value.details()
    assert not [e for e in mailer.events() if e.get("event", "").startswith("Sending receipt")]
    # a line some path allows from that machine is admitted: checkout line 4 may follow
    # payments' line 2 when line 3 is skipped (web's own, so it is only a file check)


def test_the_checkout_digest_is_the_same_on_every_machine(shop, tmp_path: Path) -> None:
    node, _ = shop
    assert node.flows["checkout"].controlled


def call_checkout(
    started: dict[str, Any], items: list[dict[str, str]], web_log: Path, *extra: str | Path
) -> Any:
    """``mesh call checkout`` as web with a good card, its log in ``web_log``; succeeded."""
    called = run_mesh(
        "call",
        "checkout",
        "user=ada",
        "email=ada@x",
        f"card={GOOD_CARD}",
        "total:=3",
        f"items:={json.dumps(items)}",
        "--as",
        "web",
        "--json",
        "--log-file",
        web_log,
        *extra,
        "-c",
        started["config"],
    )
    assert called.returncode == 0, called.stderr
    return called


def test_mesh_logs_reads_conditions_fan_out_and_sub_flows_back(shop, tmp_path: Path) -> None:
    """mesh call as web, then mesh logs over every machine's log: a skipped row is not
    missing, each element ran once, the sub-flow is a run of its own under the flow's id."""
    _, started = shop
    web_log = tmp_path / "web.log"
    items = [{"sku": s} for s in "abc"]
    called = call_checkout(started, items, web_log, "--diagram", tmp_path / "run.mmd")
    flow_id = json.loads(called.stdout)["flow_id"]
    steps = json.loads(called.stdout)["steps"]
    assert sorted(s["element"] for s in steps if "element" in s) == [0, 1, 2]
    assert [s["index"] for s in steps if s.get("request") == "receipt"] == [0, 1]
    assert [s["index"] for s in steps if s.get("skipped")] == [4]
    logs = [web_log, *(p.log_path for p in started["inventory"]), started["mailer"].log_path]
    logs.append(started["payments"].log_path)
    done = run_mesh("logs", *logs, "--flow", flow_id, "-c", started["config"])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"checkout  flow {flow_id}  " in out
    assert "(skipped: when not charged)" in out
    assert f"receipt  flow {flow_id}/3  2 of 2 lines  ok" in out
    for k in range(3):
        assert f"checkout  flow {flow_id}/1[{k}]  1 of 1 lines  ok" in out
    assert "problem:" not in out
    # The path taken: three runs of line 1, the receipt's two lines, the skipped row absent.
    drawn = (tmp_path / "run.mmd").read_text(encoding="utf-8")
    assert sum("1. [" in row and "Reserving" in row for row in drawn.splitlines()) == 3
    assert "0. receipt: Rendering receipt for ada" in drawn
    assert "Payment declined" not in drawn


def test_a_durable_flow_runs_every_construct(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """With durable = true (a journal on every machine) conditions, fan-out and sub-flows
    still run as they do without it."""
    mesh_dir.flow(SHOP_FLOW)
    mesh_dir.service(SHOP_SERVICE)
    mesh_dir.write_config(
        {"web": False, "inventory": 2, "payments": True, "mailer": True, "counter": True},
        extra="durable = true\ntimeout = 60",
    )
    for k in (1, 2):
        peers.start(mesh_dir, "inventory", replica=k)
    for machine in ("counter", "mailer", "payments"):
        peers.start(mesh_dir, machine)
    node = connect(mesh_dir.config, "web")
    result = node.start(
        "checkout", user="ada", email="ada@x", card=GOOD_CARD, total=2, items=cart(4), timeout=60
    )
    assert [r["reserved"] for r in result.context["items_results"]] == [
        f"sku-{i}" for i in range(4)
    ]
    assert result.context["receipt_to"] == "ada@x"
    assert node.start("count", n=0, timeout=60).context["n"] == 5


# -- replies checked against every path: a hostile peer forges them -----------------------

BRANCH_FLOW = (
    "Request\tLog\tMachine\tWhen\n"
    "relay\tStarting :n\tclient\n"
    "relay\tEvil step for :n\tevil\n"
    "relay\tMaybe back with :n\tclient\tback\n"
    "relay\tServer step for :n\tserver\n"
    "relay\tFinished :n\tclient\n"
)


@pytest.fixture
def branch(mesh_dir: MeshDir, tmp_path: Path, peers: Peers, connect) -> Any:
    from support.hostile import Hostile

    evil = Hostile(tmp_path / "hostile.log")
    try:
        mesh_dir.flow(BRANCH_FLOW)
        mesh_dir.write_config({"client": False, "evil": evil.address, "server": True})
        peers.start(mesh_dir, "server")
        yield connect(mesh_dir.config, "client")
    finally:
        evil.stop()


def test_a_reply_may_come_back_where_some_path_allows(branch) -> None:
    """With line 2 conditional, evil may hand the flow back at 2; a hand-back to line 0, or
    a "done" while client's line 4 must still run, fails the flow naming evil."""
    honest = {"outcome": "hand_off", "machine": "client", "line_index": 2, "steps": [1]}
    result = branch.start("relay", n=1, back=True, forge=honest, timeout=10)
    assert [s.index for s in result.steps] == [0, 1, 2, 3, 4]
    for forged, words in [
        ({"outcome": "hand_off", "machine": "client", "line_index": 0, "steps": [1]}, "line 0"),
        ({"outcome": "done", "steps": [1]}, "done"),
        ({"outcome": "hand_off", "machine": "client", "line_index": 4, "steps": [1]}, "steps"),
    ]:
        with pytest.raises(mesh.PeerRefused) as info:
            branch.start("relay", n=1, back=True, forge=forged, timeout=10)
        assert info.value.machine == "evil"
        assert words in str(info.value)


def test_a_sub_flow_per_element_on_another_machine(shop) -> None:
    """An Each row that is a sub-flow row of another machine: web calls mailer once per
    element, and mailer runs the note request for it (its line on counter too)."""
    node, _ = shop
    people = ["ada", "bob", "cy", "dee"]
    result = node.start("mailing", n=4, people=people, timeout=30)
    assert result.context["people_results"] == [{"noted": p, "at": i} for i, p in enumerate(people)]
    noted = [(s.element, s.machine) for s in result.steps if s.request == "note" and s.index == 1]
    assert sorted(noted) == [(i, "counter") for i in range(4)]


BOUND_FLOW = (
    "Request\tLog\tMachine\tEach\n"
    "batch\tBatch of :n\tone\n"
    "batch\tWorking on one\tone\tjobs as done\n"
)

BOUND_SERVICE = """
import asyncio

import structlog

import mesh

log = structlog.get_logger()
running = {"now": 0, "most": 0}


@mesh.handler("batch", "Working on one")
async def work(ctx):
    running["now"] += 1
    running["most"] = max(running["most"], running["now"])
    await asyncio.sleep(0.02)
    running["now"] -= 1
    log.info("next", job=ctx["item"], most=running["most"])
"""


def test_local_runs_are_bounded_by_max_fan_out(mesh_dir: MeshDir, connect) -> None:
    """A fan-out on the machine where the flow is runs there, at most max_fan_out at once,
    and its results go where ``Each = KEY as NAME`` says."""
    mesh_dir.flow(BOUND_FLOW)
    mesh_dir.service(BOUND_SERVICE)
    mesh_dir.write_config({"one": False}, extra="max_fan_out = 3")
    node = connect(mesh_dir.config, "one")
    result = node.start("batch", n=10, jobs=list(range(10)), timeout=30)
    done = result.context["done"]
    assert [d["job"] for d in done] == list(range(10))
    assert max(d["most"] for d in done) == 3
    assert "jobs_results" not in result.context


def test_mesh_logs_names_the_fan_out_runs_that_left_no_log(shop, tmp_path: Path) -> None:
    """The machine that fans a row out logs how many runs it has (mesh.fan_out), so mesh
    logs can tell when one of them is not in the logs it read, naming its position."""
    _, started = shop
    web_log = tmp_path / "web.log"
    items = [{"sku": s} for s in "abcde"]
    called = call_checkout(started, items, web_log)
    flow_id = json.loads(called.stdout)["flow_id"]
    (counted,) = [
        json.loads(line)
        for line in web_log.read_text().splitlines()
        if '"mesh.fan_out"' in line and flow_id in line
    ]
    assert (counted["elements"], counted["each"], counted["line_index"]) == (5, "items", 1)
    # The inventory logs without element 2's run, as if one replica's file were lost.
    kept = []
    for n, peer in enumerate(started["inventory"]):
        lines = Path(peer.log_path).read_text().splitlines()
        copy = tmp_path / f"inventory-{n}.log"
        copy.write_text("\n".join(x for x in lines if f"{flow_id}/1[2]" not in x) + "\n")
        kept.append(copy)
    logs = [web_log, *kept, started["mailer"].log_path, started["payments"].log_path]
    done = run_mesh("logs", *logs, "--flow", flow_id, "-c", started["config"])
    assert done.returncode != 0
    assert (
        "line 1 'Reserving :sku' on inventory: 1 of its 5 runs left no log (elements 2)"
        in done.stdout
    ), done.stdout
    whole = [web_log, *(p.log_path for p in started["inventory"])]
    whole += [started["mailer"].log_path, started["payments"].log_path]
    again = run_mesh("logs", *whole, "--flow", flow_id, "-c", started["config"])
    assert again.returncode == 0 and "problem:" not in again.stdout, again.stdout
