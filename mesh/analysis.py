"""What ``mesh check`` finds: every request's plan, and the problems no run would survive.

Pure: it reads a loaded :class:`~mesh.config.Config` and a registry of handlers and
returns values (table rows, warnings, problems); ``mesh check`` prints them. The
plans come from :func:`mesh.routing.plan`, the same routing the runtime follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh.config import Config
from mesh.flowfile import Flow, Line
from mesh.registry import Registry, describe
from mesh.routing import Hop, every_hop, plan

__all__ = ["CALLER", "Check", "FlowPlan", "check", "control_of", "default_origin"]

#: The machine name ``mesh call`` originates as when it is no machine of the mesh.
CALLER = "mesh-call"


@dataclass(frozen=True, slots=True)
class FlowPlan:
    """One request as it would run when started by default: a row per line."""

    name: str
    path: str
    digest: str
    #: ``(index, line, machine, handler, how)`` for each line, as text; a request with
    #: conditions, fan-out or sub-flows adds a sixth, ``control`` (:func:`control_of`).
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class Check:
    """The whole analysis of a config: what to show, and what is wrong with it."""

    #: ``(machine, address[, "listens on …"])`` for each machine.
    machines: tuple[tuple[str, ...], ...]
    plans: tuple[FlowPlan, ...]
    #: Things that work only when a flow is started a particular way; once each.
    warnings: tuple[str, ...]
    #: Things that would fail at run time; the config is not ok when there is one.
    problems: tuple[str, ...]
    handlers: int

    @property
    def ok(self) -> bool:
        return not self.problems


def check(config: Config, registry: Registry) -> Check:
    """Analyse ``config`` with the handlers ``registry`` holds (its services imported)."""
    problems = registry.problems(config.flows)
    warnings: list[str] = []
    registered = registry.registered()
    machines = config.machines
    machine_rows = tuple(
        (m.name, m.address or "(no address: originates only)")
        + ((f"listens on {', '.join(m.binds)}",) if m.listen and m.listen != m.address else ())
        for m in machines.values()
    )
    plans: list[FlowPlan] = []
    for name, flow in config.flows.flows.items():
        first = flow.lines[0]
        origin = default_origin(flow, config)
        hops = plan(flow, origin)
        rows: list[tuple[str, ...]] = []
        for line, hop in zip(flow.lines, hops, strict=True):
            fn = registered.get((name, line.text))
            handler = "sub-flow" if line.sub else describe(fn) if fn else "pass-through"
            row: tuple[str, ...] = (str(line.index), line.text, line.machine, handler, hop.how)
            if flow.controlled:
                row = (*row, control_of(line))
            rows.append(row)
        plans.append(FlowPlan(name, first.path, flow.digest, tuple(rows)))
        if flow.controlled:
            # Every path: a line skipped on one may change who calls the lines after it.
            hops = every_hop(flow, origin)
            problems.extend(_sub_flow_problems(flow, config))
        walk = every_hop if flow.controlled else plan
        unreachable = _unreachable(hops, config)
        if unreachable:
            # `mesh call` would start it from outside; an address-less machine of the
            # flow may still start it so that the flow comes back to it.
            starters = [
                m
                for m in flow.machines
                if m != origin
                and not machines[m].address
                and not _unreachable(walk(flow, m), config)
            ]
            if starters:
                warnings.append(
                    f"{name} reaches {', '.join(sorted({h.machine for h in unreachable}))} only"
                    f" when started by {' or '.join(starters)}"
                    f" (mesh call --as {starters[0]}, or mesh.connect(machine={starters[0]!r}))"
                )
            else:
                problems.append(_unreachable_message(flow, unreachable[0]))
        openers = config.flows.openers(first.text)
        if len(openers) > 1:
            warnings.append(
                f"{first.text!r} opens requests {', '.join(openers)}:"
                " logging it cannot start a flow inline (node.start still works)"
            )
    problems.extend(_recursion_problems(config))
    return Check(
        machines=machine_rows,
        plans=tuple(plans),
        warnings=tuple(dict.fromkeys(warnings)),
        problems=tuple(problems),
        handlers=len(registered),
    )


def default_origin(flow: Flow, config: Config) -> str:
    """Who starts a flow by default: line 0's machine if it has no address, else an outsider."""
    first = flow.lines[0].machine
    return first if not config.machines[first].address else CALLER


def _unreachable(hops: Sequence[Hop], config: Config) -> list[Hop]:
    """Hops that would call an address-less machine: no flow can get there."""
    return [
        h for h in hops if h.how in ("call", "fan-out") and not config.machines[h.machine].address
    ]


def _unreachable_message(flow: Flow, hop: Hop) -> str:
    line = flow.lines[hop.index]
    chain = " → ".join(m for m in hop.via if m != CALLER) or "none"
    return (
        f'{line.path}:{line.row}: {flow.name} line {line.index} "{line.text}" runs on'
        f" {hop.machine}, which has no address and is not upstream there"
        f" (call chain: {chain}), so the flow cannot reach it"
    )


def control_of(line: Line) -> str:
    """What ``mesh check`` shows of a row's control flow: its condition, its fan-out, the
    request it runs as a sub-flow ("" for none)."""
    parts = []
    if line.when is not None:
        parts.append(f"when {line.when.text}")
    if line.each is not None:
        parts.append(f"each {line.each.key} → {line.each.results}")
    if line.sub:
        parts.append(f"runs {line.sub}")
    return "; ".join(parts)


def _sub_flow_problems(flow: Flow, config: Config) -> list[str]:
    """A sub-flow runs as a flow its row's machine starts: each line of it must be reachable
    from there, on every path, like a request ``mesh call`` starts."""
    problems = []
    for line in flow.lines:
        if not line.sub:
            continue
        sub = config.flows[line.sub]
        for hop in _unreachable(every_hop(sub, line.machine), config):
            target = sub.lines[hop.index]
            problems.append(
                f'{line.path}:{line.row}: {flow.name} line {line.index} "{line.text}" runs'
                f' {sub.name} on {line.machine}, and its line {target.index} "{target.text}"'
                f" runs on {hop.machine}, which has no address and is not upstream there"
                f" ({target.path}:{target.row}), so the sub-flow cannot reach it"
            )
    return problems


def _recursion_problems(config: Config) -> list[str]:
    """Sub-flows that would call each other with no condition to stop them: a cycle of
    ``@REQUEST`` rows none of which has a ``When`` or an ``Each`` (an empty list skips)."""
    calls: dict[str, list[Line]] = {}
    for flow in config.flows.flows.values():
        calls[flow.name] = [
            line for line in flow.lines if line.sub and line.when is None and line.each is None
        ]
    problems: list[str] = []
    reported: set[str] = set()
    for start in calls:
        # Depth-first from each request: a path back to it is a loop no condition ends.
        stack: list[tuple[str, tuple[Line, ...]]] = [(start, ())]
        seen: set[str] = set()
        while stack:
            name, path = stack.pop()
            for line in calls[name]:
                if line.sub == start:
                    loop = (*path, line)
                    if not reported.intersection(ln.request for ln in loop):
                        reported.update(ln.request for ln in loop)
                        chain = " → ".join([*(ln.request for ln in loop), start])
                        first = loop[0]
                        problems.append(
                            f"{first.path}:{first.row}: {chain} calls itself as a sub-flow with"
                            " no condition (When) on the way, so it recurses until max_depth"
                        )
                elif line.sub not in seen:
                    seen.add(line.sub)
                    stack.append((line.sub, (*path, line)))
    return problems
