"""Replies a peer cannot be trusted to get right: a hostile peer forges them, for real.

The hostile peer (tests/support/hostile.py) is its own process, a hand-written gRPC server
of mesh.v1.Mesh/Continue that answers each call with the reply the call's context asks
for. The originator is the real one (``mesh.connect``); ``server`` is a real ``mesh peer``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.hostile import Hostile
from support.meshdir import MeshDir
from support.peers import Peers

import mesh

RELAY_FLOW = (
    "Request\tLog\tMachine\n"
    "relay\tStarting :n\tclient\n"
    "relay\tEvil step for :n\tevil\n"
    "relay\tBack home with :n\tclient\n"
    "relay\tServer step for :n\tserver\n"
    "relay\tFinished :n\tclient\n"
)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    """A hostile peer process, stopped (by pid) at the end of the test."""
    evil = Hostile(tmp_path / "hostile.log")
    try:
        yield evil
    finally:
        evil.stop()


@pytest.fixture
def relay(mesh_dir: MeshDir, hostile: Hostile, peers: Peers, connect) -> Any:
    """client (this process) → evil (hostile) → back to client → server (real) → client."""
    mesh_dir.flow(RELAY_FLOW)
    mesh_dir.write_config({"client": False, "evil": hostile.address, "server": True})
    peers.start(mesh_dir, "server")
    return connect(mesh_dir.config, "client")


def test_an_honest_reply_from_the_stand_in_works(relay, hostile: Hostile) -> None:
    """The control: the stand-in hands line 2 back after its own line 1, as a peer would, and
    the flow runs to its end through the real server."""
    forge = {"outcome": "hand_off", "machine": "client", "line_index": 2, "steps": [1]}
    result = relay.start("relay", n=1, forge=forge, timeout=10)
    assert [(s.index, s.machine) for s in result.steps] == [
        (0, "client"),
        (1, "evil"),
        (2, "client"),
        (3, "server"),
        (4, "client"),
    ]
    assert len(hostile.calls(result.flow_id)) == 1


FORGED = [
    pytest.param(
        {"outcome": "hand_off", "machine": "client", "line_index": 0, "steps": [1]},
        "line 0",
        id="hand-off-to-line-0",  # before: line 0 ran again and again until the deadline
    ),
    pytest.param(
        {"outcome": "hand_off", "machine": "client", "line_index": 5, "steps": [1]},
        "line 5",
        id="hand-off-past-the-end",  # before: "done" with lines 2-4 never run
    ),
    pytest.param(
        {"outcome": "hand_off", "machine": "client", "line_index": 3, "steps": [1]},
        "line 3",
        id="hand-off-to-a-line-of-another-machine",  # before: line 2 skipped, server ran 3
    ),
    pytest.param(
        {"outcome": "hand_off", "machine": "client", "line_index": 3, "steps": [1, 2]},
        "line 3",
        id="hand-off-after-steps-it-claims-for-the-caller",  # before: line 2 never ran
    ),
    pytest.param(
        {"outcome": "hand_off", "machine": "client", "line_index": 2, "steps": []},
        "line 2",
        id="hand-off-without-running-its-line",  # before: line 1 missing from the timeline
    ),
    pytest.param(
        {"outcome": "hand_off", "machine": "server", "line_index": 3, "steps": [1]},
        "not upstream",
        id="hand-off-to-a-machine-not-upstream",  # refused before too
    ),
    pytest.param(
        {"outcome": "done", "steps": [1]},
        "done",
        id="done-with-lines-missing",  # before: a result with 2 of 5 lines
    ),
    pytest.param(
        {"outcome": "done", "steps": [1, 2, 3, 4]},
        "done",
        id="done-claiming-other-machines-lines",  # before: a result whose lines 2-4 never ran
    ),
    pytest.param(
        {"outcome": "hand_off", "machine": "client", "line_index": 2, "context": "not json"},
        "context",
        id="hand-off-with-a-context-that-is-not-json",  # before: a bare ValueError
    ),
    pytest.param(
        {"outcome": "none", "steps": [1]},
        "no outcome",
        id="no-outcome",  # refused before too
    ),
]


@pytest.mark.parametrize(("forge", "fragment"), FORGED)
def test_a_forged_reply_fails_the_flow_naming_the_peer(
    relay, hostile: Hostile, forge: dict[str, Any], fragment: str
) -> None:
    """A reply that hands the flow to a line it may not (line 0, past the end, a line the flow
    file gives another machine, not the line after the reply's own last step), or says done
    before the last line: PeerRefused naming the hostile peer at once, and it was called once
    (before the fix: line 0 re-run in a loop, or a "done" flow with lines never run)."""
    with pytest.raises(mesh.PeerRefused) as info:
        relay.start("relay", n=1, forge=forge, timeout=5)
    assert info.value.machine == "evil"
    assert str(info.value).startswith("evil ")
    assert fragment in str(info.value)
    assert len(hostile.calls()) == 1
