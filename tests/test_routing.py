"""Routing is a pure function of (flow, machine, line, via): tested as such."""

from __future__ import annotations

from mesh.flowfile import Flow, parse_flows
from mesh.routing import DONE, Call, HandBack, RunHere, plan, route

LOGIN = """\
Request\tLog\tMachine
login\tUser attempted login as :username and #password\tclient
login\tReceived request to login as :username\tserver
login\tTesting password for :username\tserver
login\tSetting session for :username\tserver
login\tFinish handling user login\tserver
login\tLogin successful\tclient
"""


def _flow(text: str, name: str) -> Flow:
    return parse_flows(text)[name]


def test_local_line_runs_here() -> None:
    """A line owned by the asking machine runs here."""
    assert route(_flow(LOGIN, "login"), "server", 2, ("client",)) == RunHere(2)


def test_line_of_another_machine_is_called() -> None:
    """A line owned by a machine not in the chain is a call to it."""
    assert route(_flow(LOGIN, "login"), "client", 1, ()) == Call("server", 1)


def test_line_of_an_upstream_machine_is_handed_back() -> None:
    """A line owned by a machine upstream is handed back, not called."""
    assert route(_flow(LOGIN, "login"), "server", 5, ("client",)) == HandBack("client", 5)


def test_past_the_last_line_is_done() -> None:
    """After the last line the flow is done, whoever asks."""
    flow = _flow(LOGIN, "login")
    assert route(flow, "client", 6, ()) is DONE
    assert route(flow, "server", 6, ("client",)) is DONE


def test_plan_of_login_from_its_address_less_client() -> None:
    """The login plan: client starts, calls server, server hands back."""
    hops = plan(_flow(LOGIN, "login"), "client")
    assert [(h.machine, h.how) for h in hops] == [
        ("client", "start"),
        ("server", "call"),
        ("server", "local"),
        ("server", "local"),
        ("server", "local"),
        ("client", "hand back"),
    ]
    assert hops[5].via == ()
    assert hops[1].via == ("client",)


def test_plan_from_an_outside_caller_nests_calls() -> None:
    """A chain A→B→C→A from an outsider: C hands back to A, unwinding B."""
    flow = _flow("r,one,a\nr,two,b\nr,three,c\nr,four,a\nr,five,d\n", "r")
    hops = plan(flow, "cli")
    assert [(h.index, h.machine, h.how, h.via) for h in hops] == [
        (0, "a", "call", ("cli",)),
        (1, "b", "call", ("cli", "a")),
        (2, "c", "call", ("cli", "a", "b")),
        (3, "a", "hand back", ("cli",)),
        (4, "d", "call", ("cli", "a")),
    ]


def test_a_machine_is_never_twice_in_a_chain() -> None:
    """Whatever the order of machines, via never repeats a machine."""
    flow = _flow("r,l0,a\nr,l1,b\nr,l2,a\nr,l3,b\nr,l4,c\nr,l5,b\nr,l6,a\n", "r")
    for origin in ("a", "b", "outside"):
        for hop in plan(flow, origin):
            chain = (*hop.via, hop.machine)
            assert len(chain) == len(set(chain)), (origin, hop)
