"""mesh/versions.py and `mesh check --against`: which flow-file edits flows in flight survive."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir
from support.peers import Peers

from mesh.flowfile import parse_flows
from mesh.versions import VersionStore, compare

HEAD = "Request\tLog\tMachine\n"
OLD = HEAD + "pay\tCart for :user\tweb\npay\tCharging :user\tpayments\npay\tDone\tweb\n"


def _changes(new: str) -> list[tuple[bool, str]]:
    return [
        (c.safe, c.what) for c in compare(parse_flows(OLD, "old.tsv"), parse_flows(new, "new.tsv"))
    ]


def test_the_same_rows_spelled_otherwise_are_no_change() -> None:
    """Delimiter and spacing do not make a version: a CSV of the same rows changes nothing."""
    assert _changes("pay,Cart for :user,web\npay,Charging :user,payments\npay,Done,web\n") == []


@pytest.mark.parametrize(
    ("new", "safe", "says"),
    [
        (OLD + "pay\tReceipt mailed\tmailer\n", True, "new.tsv:5: 1 line(s) added at the end"),
        (
            OLD.replace("Charging :user\tpayments", "Charging :user\tbilling"),
            True,
            "new.tsv:3: line 1 'Charging :user' moved from payments to billing",
        ),
        (OLD + "refund\tRefunding\tpayments\n", True, "request added at new.tsv:5"),
        (
            OLD.replace("pay\tCharging :user\tpayments\n", ""),
            False,
            "new.tsv:3: line 1 'Charging :user' removed or reordered",
        ),
        (
            OLD.replace("Charging :user", "Billing :user"),
            False,
            "new.tsv:3: line 1 changed from 'Charging :user' to 'Billing :user'",
        ),
        (
            HEAD + "pay\tCart for :user\tweb\npay\tDone\tweb\npay\tCharging :user\tpayments\n",
            False,
            "new.tsv:3: line 1 'Charging :user' moved to line 2",
        ),
        (
            OLD.replace("pay\tDone\tweb\n", ""),
            False,
            "1 line(s) removed from the end, from line 2 'Done' (was old.tsv:4)",
        ),
        ("Request\tLog\tMachine\nother\tX\tweb\n", False, "request removed (was old.tsv:2)"),
    ],
)
def test_each_kind_of_edit(new: str, safe: bool, says: str) -> None:
    changes = _changes(new)
    assert (safe, says) in changes, changes
    assert all(ok for ok, _ in changes) is safe


def test_check_against_an_old_file_exits_1_on_an_unsafe_edit(mesh_dir: MeshDir) -> None:
    """What a person deploying runs: `mesh check --against OLD` names the unsafe row, exits 1;
    on a safe edit it says so and exits 0."""
    old = mesh_dir.flow(OLD, "old.tsv")
    mesh_dir.flow(OLD + "pay\tReceipt mailed\tweb\n")
    mesh_dir.write_config({"web": True, "payments": True})
    done = run_mesh("check", "-c", mesh_dir.config, "--against", old)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "1 line(s) added at the end" in done.stdout
    assert "safe for flows in flight" in done.stdout

    mesh_dir.flow(OLD.replace("pay\tCharging :user\tpayments\n", ""))
    done = run_mesh("check", "-c", mesh_dir.config, "--against", old)
    assert done.returncode == 1, done.stdout
    assert (
        "unsafe:" in done.stdout and "line 1 'Charging :user' removed or reordered" in done.stdout
    )

    done = run_mesh("check", "-c", mesh_dir.config, "--against", mesh_dir.root / "nope.tsv")
    assert done.returncode != 0
    assert "nope.tsv: no such flow file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_store_finds_every_version_it_kept_by_digest(tmp_path: Path) -> None:
    """A peer restarted with an edited file still finds the old request by its digest."""
    flow = tmp_path / "flow.tsv"
    flow.write_text(OLD)
    store = VersionStore(tmp_path / "versions")
    store.remember([flow])
    old = parse_flows(OLD, "x")["pay"]
    flow.write_text(OLD + "pay\tReceipt mailed\tweb\n")
    store = VersionStore(tmp_path / "versions")  # a new process
    store.remember([flow])
    new = parse_flows(flow.read_text(), "x")["pay"]
    assert new.digest != old.digest
    for want in (old, new):
        found = store.flow("pay", want.digest)
        assert found is not None and [ln.text for ln in found.lines] == [
            ln.text for ln in want.lines
        ]
    assert store.flow("pay", "0" * 16) is None


# -- a rolling deploy, with real peers ------------------------------------------------

DEPLOY_V1 = (
    "Request\tLog\tMachine\n"
    "order\tOrder placed for :item\tclient\n"
    "order\tReserving :item\ta\n"
    "order\tCharging :item\tb\n"
    "order\tShipping :item\tc\n"
    "order\tOrder done for :item\tclient\n"
)
#: The edit being deployed: shipping moves from c to b (safe for flows in flight).
DEPLOY_V2 = DEPLOY_V1.replace("Shipping :item\tc", "Shipping :item\tb")

DEPLOY_SERVICE = """
import os
import time

import structlog

import mesh

log = structlog.get_logger()


def _step(ctx, what):
    time.sleep(0.05)
    log.info("next", **{what: os.getpid()})


@mesh.handler("order", "Reserving :item")
def reserve(ctx):
    _step(ctx, "reserved")


@mesh.handler("order", "Charging :item")
def charge(ctx):
    _step(ctx, "charged")


@mesh.handler("order", "Shipping :item")
def ship(ctx):
    _step(ctx, "shipped")
"""


@pytest.mark.slow
def test_a_rolling_deploy_refuses_no_flow_and_mixes_no_versions(
    mesh_dir: MeshDir, peers: Peers, connect: Any
) -> None:
    """100 durable flows in flight while a, b and c are restarted one by one with an edited
    flow file (Shipping moved from c to b), as Kubernetes rolls a deployment: none is
    refused, every flow that started on the old file ships on c (its version), and flows
    started on the new file afterwards ship on b."""
    mesh_dir.flow(DEPLOY_V1)
    mesh_dir.service(DEPLOY_SERVICE)
    mesh_dir.write_config(
        {"client": False, "a": True, "b": True, "c": True},
        extra="durable = true\ntimeout = 120\ngrace = 1\n",
    )
    running = {m: peers.start(mesh_dir, m) for m in ("c", "b", "a")}
    old_client = connect(mesh_dir.config, "client")
    results: dict[int, Any] = {}
    gate = threading.Semaphore(16)

    def order(i: int) -> None:
        with gate:
            try:
                results[i] = old_client.start("order", item=f"i{i}")
            except BaseException as exc:
                results[i] = exc

    threads = [threading.Thread(target=order, args=(i,), daemon=True) for i in range(100)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    mesh_dir.flow(DEPLOY_V2)  # the new file, which each peer reads when it restarts
    for machine in ("a", "b", "c"):
        running[machine].stop()
        running[machine] = peers.start(mesh_dir, machine)
        time.sleep(0.3)
    for thread in threads:
        thread.join(120)
    failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert not failed, failed
    assert len(results) == 100
    for result in results.values():
        machines = {step.index: step.machine for step in result.steps}
        assert machines[3] == "c", machines  # the old version, end to end
    new_client = connect(mesh_dir.config, "client")
    after = new_client.start("order", item="new")
    assert {step.index: step.machine for step in after.steps}[3] == "b"
