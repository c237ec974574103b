"""Where the next line runs: a pure function of (flow, machine, line, via).

The call chain between peers nests: a machine that calls another waits for its
reply. So a line owned by a machine already waiting upstream (in ``via``) is not
called again but *handed back*: the chain unwinds to that machine, which goes on
locally. That is what lets a client with no listening port take part in a flow
that comes back to it, and it keeps every machine at most once in a chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mesh.flowfile import Flow


@dataclass(frozen=True, slots=True)
class Done:
    """The flow has no line left: it is finished."""


@dataclass(frozen=True, slots=True)
class RunHere:
    """This machine owns the line: run it in this process."""

    index: int


@dataclass(frozen=True, slots=True)
class HandBack:
    """An upstream machine owns the line: reply so the chain unwinds to it."""

    machine: str
    index: int


@dataclass(frozen=True, slots=True)
class Call:
    """Another machine, not in the chain, owns the line: call it and wait."""

    machine: str
    index: int


Decision = Done | RunHere | HandBack | Call

DONE: Final = Done()


def route(flow: Flow, machine: str, index: int, via: Sequence[str]) -> Decision:
    """Decide what ``machine`` does about line ``index``, with ``via`` upstream of it."""
    lines = flow.lines
    if index >= len(lines):
        return DONE
    owner = lines[index].machine
    if owner == machine:
        return RunHere(index)
    if owner in via:
        return HandBack(owner, index)
    return Call(owner, index)


@dataclass(frozen=True, slots=True)
class Hop:
    """One line in a flow's plan: who runs it, and the call chain above it then."""

    index: int
    machine: str
    via: tuple[str, ...]
    how: str  # "start", "local", "call" or "hand back"


def plan(flow: Flow, origin: str) -> tuple[Hop, ...]:
    """Walk a flow as the runtime would, started by ``origin``.

    ``origin`` is the originator: the machine that starts the flow (it may own no
    line at all, as a CLI caller does). Used by ``mesh check`` to show the call
    chain and to find lines that an address-less machine could never receive.
    """
    hops: list[Hop] = []
    here, via = origin, ()
    via_t: tuple[str, ...] = via
    for index in range(len(flow.lines)):
        decision = route(flow, here, index, via_t)
        if isinstance(decision, RunHere):
            how = "start" if index == 0 else "local"
        elif isinstance(decision, HandBack):
            via_t = via_t[: via_t.index(decision.machine)]
            here, how = decision.machine, "hand back"
        else:
            assert isinstance(decision, Call)
            via_t = (*via_t, here)
            here, how = decision.machine, "call"
        hops.append(Hop(index, here, via_t, how))
    return tuple(hops)
