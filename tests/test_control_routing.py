"""Routing every control-flow construct, as pure functions: which line runs next, who may
send a line (the access list), where a call may come back, every hop of every path;
and the scopes of sub-flows and fan-out runs."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import control, routing
from mesh.flowfile import parse_flows

SHOP = parse_flows(
    "Request\tLog\tMachine\tWhen\tEach\n"
    "checkout\tCart submitted by :user\tweb\n"
    "checkout\tReserving :sku\tinventory\t\titems\n"
    "checkout\tCharging card #card for :total\tpayments\n"
    "checkout\t@receipt\tweb\tcharged\n"
    "checkout\tPayment declined for :user\tweb\tnot charged\n"
    "receipt\tRendering receipt for :user\tweb\n"
    "receipt\tSending receipt to :email\tmailer\n"
    "gate\tMaybe first\tm\tok\n"
    "gate\tSecond\tn\n"
)
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
