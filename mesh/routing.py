"""Where the next line runs: a pure function of (flow, machine, line, via).

The call chain between peers nests: a machine that calls another waits for its
reply. So a line owned by a machine already waiting upstream (in ``via``) is not
called again but *handed back*: the chain unwinds to that machine, which goes on
locally. That is what lets a client with no listening port take part in a flow
that comes back to it, and it keeps every machine at most once in a chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

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
    how: str  # "start", "local", "call", "hand back" or "fan-out" (the flow stays)


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
        elif isinstance(decision, Call) and flow.lines[index].each is not None:
            # fanned out from here; the flow stays
            hops.append(Hop(index, decision.machine, (*via_t, here), "fan-out"))
            continue
        else:
            assert isinstance(decision, Call)
            via_t = (*via_t, here)
            here, how = decision.machine, "call"
        hops.append(Hop(index, here, via_t, how))
    return tuple(hops)


# -- control flow: conditions, fan-out and sub-flows (the When/Each columns, @REQUEST) ------
#
# Still pure: what follows a line is a function of the flow file and of the context the
# flow carries, evaluated where the flow is. The access list is a function of the file
# alone: whatever the context, a line can only be reached from a line that may run
# right before it on some path.


def skippable(flow: Flow, index: int) -> bool:
    """Whether line ``index`` may not run on some path: it has a condition, or a fan-out
    over a list that may be empty."""
    line = flow.lines[index]
    return line.when is not None or line.each is not None


def runs(flow: Flow, index: int, context: Mapping[str, Any]) -> bool:
    """Whether line ``index`` runs with ``context``: its condition holds, and its fan-out
    list, if it has one, is not empty (an absent or null list is empty)."""
    line = flow.lines[index]
    if line.when is not None and not line.when.holds(context):
        return False
    if line.each is not None:
        items = context.get(line.each.key)
        if items is None or items == []:
            return False
    return True


def next_line(flow: Flow, index: int, context: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    """The first line from ``index`` on that runs with ``context``, and the lines skipped
    before it; ``len(flow.lines)`` when none is left."""
    lines = flow.lines
    skipped: list[int] = []
    while index < len(lines) and not runs(flow, index, context):
        skipped.append(index)
        index += 1
    return index, tuple(skipped)


#: Anyone may send this line: every line before it may be skipped, so it can be a flow's
#: first (like line 0).
ANYONE: Final = None


def predecessors(flow: Flow, index: int) -> frozenset[str] | None:
    """The machines that may hand the flow on to line ``index``: the owners of the lines
    that can run right before it on some path (a sub-flow row's is its machine, where
    the flow is once the sub-flow is done), or :data:`ANYONE` when it can be first."""
    owners: set[str] = set()
    j = index - 1
    while j >= 0:
        owners.add(flow.lines[j].machine)
        if not skippable(flow, j):
            return frozenset(owners)
        j -= 1
    return ANYONE


def back_lines(flow: Flow, machine: str, index: int, via: Sequence[str]) -> tuple[int, ...]:
    """Where a call for line ``index`` from ``machine`` (with ``via`` above it) may come
    back, on some path: each line after it that ``machine`` or a machine upstream owns,
    up to and including the first that cannot be skipped; ``len(flow.lines)`` ("done")
    when every such line may be skipped. For a flow without conditions, one line."""
    lines = flow.lines
    out: list[int] = []
    for j in range(index + 1, len(lines)):
        owner = lines[j].machine
        if owner == machine or owner in via:
            out.append(j)
            if not skippable(flow, j):
                return tuple(out)
    out.append(len(lines))
    return tuple(out)


def every_hop(flow: Flow, origin: str) -> tuple[Hop, ...]:
    """Every hop the runtime could make walking ``flow`` started by ``origin``, on any path
    (each line run or skipped where it may be): what :func:`plan` gives for a flow without
    conditions. A line's fate depends only on where the flow is and on the chain above
    it, so walks that reach a line in the same place with the same chain are one; the
    count stays small for files people write."""
    frontier: set[tuple[str, tuple[str, ...], bool]] = {(origin, (), False)}
    out: dict[Hop, None] = {}
    for index in range(len(flow.lines)):
        following: set[tuple[str, tuple[str, ...], bool]] = set()
        for here, via, started in frontier:
            if skippable(flow, index):
                following.add((here, via, started))
            decision = route(flow, here, index, via)
            if isinstance(decision, RunHere):
                there, chain = here, via
                how = "local" if started else "start"
            elif isinstance(decision, HandBack):
                chain = via[: via.index(decision.machine)]
                there, how = decision.machine, "hand back"
            elif isinstance(decision, Call) and flow.lines[index].each is not None:
                # fanned out from here; the flow stays
                out[Hop(index, decision.machine, (*via, here), "fan-out")] = None
                following.add((here, via, True))
                continue
            else:
                assert isinstance(decision, Call)
                chain = (*via, here)
                there, how = decision.machine, "call"
            out[Hop(index, there, chain, how)] = None
            following.add((there, chain, True))
        frontier = following
    return tuple(out)
