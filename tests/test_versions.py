"""mesh/versions.py and `mesh check --against`: which flow-file edits flows in flight survive."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir

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
