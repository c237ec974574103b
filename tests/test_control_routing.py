"""Routing every control-flow construct, as pure functions: which line runs next, who may
send a line (the access list), where a call may come back, every hop of every path;
and the scopes of sub-flows and fan-out runs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.control import CHECKOUT_FLOW

from mesh import control, routing
from mesh.flowfile import parse_flows

SHOP = parse_flows(CHECKOUT_FLOW + "gate\tMaybe first\tm\tok\ngate\tSecond\tn\n")
CHECKOUT = SHOP["checkout"]
PLAIN = parse_flows("r,a,x\nr,b,y\nr,c,x\n")["r"]

NEXT: list[tuple[int, dict[str, Any], int, tuple[int, ...]]] = [
    (1, {"items": [1]}, 1, ()),
    (1, {"items": []}, 2, (1,)),
    (1, {}, 2, (1,)),
    (1, {"items": None}, 2, (1,)),
    (1, {"items": "not a list"}, 1, ()),  # runs, and fails there: not a list
    (3, {"charged": True}, 3, ()),
    (3, {"charged": False}, 4, (3,)),
    (4, {"charged": True}, 5, (4,)),
    (3, {}, 4, (3,)),
]


@pytest.mark.parametrize(("index", "context", "following", "skipped"), NEXT)
def test_next_line(
    index: int, context: dict[str, Any], following: int, skipped: tuple[int, ...]
) -> None:
    assert routing.next_line(CHECKOUT, index, context) == (following, skipped)


def test_a_plain_flow_skips_nothing() -> None:
    assert not PLAIN.controlled
    assert routing.next_line(PLAIN, 1, {}) == (1, ())
    assert [routing.predecessors(PLAIN, i) for i in (1, 2)] == [{"x"}, {"y"}]


def test_access_list_from_every_path() -> None:
    assert [routing.predecessors(CHECKOUT, i) for i in range(5)] == [
        None,  # line 0: anyone
        {"web"},
        {"web", "inventory"},  # after the fan-out, or after an empty cart skipped it
        {"payments"},
        {"payments", "web"},  # after the receipt, or right after payments when skipped
    ]
    gate = SHOP["gate"]
    assert routing.predecessors(gate, 1) is None  # line 0 may be skipped: 1 can be first


def test_where_a_call_may_come_back() -> None:
    # web calls payments for line 2: the flow comes back at 3 or, 3 skipped, at 4, or ends
    assert routing.back_lines(CHECKOUT, "web", 2, ()) == (3, 4, 5)
    assert routing.back_lines(PLAIN, "x", 1, ()) == (2,)
    assert routing.back_lines(PLAIN, "y", 2, ("x",)) == (3,)


def test_every_hop_of_every_path() -> None:
    hops = {(h.index, h.machine, h.via, h.how) for h in routing.every_hop(CHECKOUT, "web")}
    assert hops == {
        (0, "web", (), "start"),
        (1, "inventory", ("web",), "fan-out"),  # the flow stays on web
        (2, "payments", ("web",), "call"),
        (3, "web", (), "hand back"),
        (4, "web", (), "hand back"),  # 3 skipped
        (4, "web", (), "local"),  # after the receipt
    }


def test_plan_shows_the_fan_out() -> None:
    assert [h.how for h in routing.plan(CHECKOUT, "web")] == [
        "start",
        "fan-out",
        "call",
        "hand back",
        "local",
    ]


@pytest.mark.parametrize(
    ("flow_id", "index", "element", "depth"),
    [
        ("f", 1, None, 0),
        ("f/3", 1, None, 1),
        ("f/1[7]", 1, 7, 0),
        ("f/1[7]", 2, None, 0),
        ("f/3/0/0", 0, None, 3),
        ("f/2[4]/2", 2, None, 1),
        ("f/2/1[12]", 1, 12, 1),
    ],
)
def test_scopes(flow_id: str, index: int, element: int | None, depth: int) -> None:
    assert control.element_of(flow_id, index) == element
    assert control.depth(flow_id) == depth
    assert control.root(flow_id) == "f"


# -- a property: the access list and the reply checks admit every path the runtime takes ------

_row = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["", "x"]),  # When
    st.sampled_from(["", "items"]),  # Each
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(_row, min_size=1, max_size=7),
    origin=st.sampled_from(["a", "b", "o"]),
    data=st.data(),
)
def test_every_path_passes_the_guard_and_the_reply_checks(
    rows: list[tuple[str, str, str]], origin: str, data: st.DataObject
) -> None:
    """Walk a random flow as the runtime does, each conditional row run or skipped at
    random: every call (and fan-out call) comes from a machine the access list admits for
    its line, and every hand-back or "done" is one each waiting caller's check accepts."""
    text = "Request\tLog\tMachine\tWhen\tEach\n" + "".join(
        f"r\tline {i}\t{m}\t{w}\t{e}\n" for i, (m, w, e) in enumerate(rows)
    )
    flow = parse_flows(text)["r"]
    runs = [
        not routing.skippable(flow, i) or data.draw(st.booleans(), label=f"run {i}")
        for i in range(len(rows))
    ]
    here, via = origin, ()
    frames: list[tuple[str, int, tuple[str, ...]]] = []  # (caller, line, its via) waiting

    def admitted(caller: str, index: int) -> bool:
        owners = routing.predecessors(flow, index)
        return owners is None or caller in owners

    index = 0
    while True:
        while index < len(rows) and not runs[index]:
            index += 1
        if index >= len(rows):
            for caller, line, chain in frames:  # "done" travels up to everyone waiting
                assert len(rows) in routing.back_lines(flow, caller, line, chain)
            return
        decision = routing.route(flow, here, index, via)
        if isinstance(decision, routing.RunHere):
            index += 1
        elif isinstance(decision, routing.Call):
            assert admitted(here, index), (here, index, text)
            if flow.lines[index].each is not None:
                index += 1  # fanned out from here: the flow stays
                continue
            frames.append((here, index, via))
            via = (*via, here)
            here = decision.machine
        else:
            assert isinstance(decision, routing.HandBack)
            while True:  # each caller down to the owner relays the hand-off, checking it
                caller, line, chain = frames.pop()
                assert index in routing.back_lines(flow, caller, line, chain), (index, text)
                if caller == decision.machine:
                    break
            here, via = decision.machine, via[: via.index(decision.machine)]
