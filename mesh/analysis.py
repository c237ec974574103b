"""What ``mesh check`` finds: every request's plan, and the problems no run would survive.

Pure: it reads a loaded :class:`~mesh.config.Config` and a registry of handlers and
returns values (table rows, warnings, problems); ``mesh check`` prints them. The
plans come from :func:`mesh.routing.plan`, the same routing the runtime follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh.config import Config
from mesh.flowfile import Flow
from mesh.registry import Registry, describe
from mesh.routing import Hop, plan

__all__ = ["CALLER", "Check", "FlowPlan", "check", "default_origin"]

#: The machine name ``mesh call`` originates as when it is no machine of the mesh.
CALLER = "mesh-call"


@dataclass(frozen=True, slots=True)
class FlowPlan:
    """One request as it would run when started by default: a row per line."""

    name: str
    path: str
    digest: str
    #: ``(index, line, machine, handler, how)`` for each line, as text.
    rows: tuple[tuple[str, str, str, str, str], ...]


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
        rows = []
        for line, hop in zip(flow.lines, hops, strict=True):
            fn = registered.get((name, line.text))
            handler = describe(fn) if fn else "pass-through"
            rows.append((str(line.index), line.text, line.machine, handler, hop.how))
        plans.append(FlowPlan(name, first.path, flow.digest, tuple(rows)))
        unreachable = _unreachable(hops, config)
        if unreachable:
            # `mesh call` would start it from outside; an address-less machine of the
            # flow may still start it so that the flow comes back to it.
            starters = [
                m
                for m in flow.machines
                if m != origin
                and not machines[m].address
                and not _unreachable(plan(flow, m), config)
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
    return [h for h in hops if h.how == "call" and not config.machines[h.machine].address]


def _unreachable_message(flow: Flow, hop: Hop) -> str:
    line = flow.lines[hop.index]
    chain = " → ".join(m for m in hop.via if m != CALLER) or "none"
    return (
        f'{line.path}:{line.row}: {flow.name} line {line.index} "{line.text}" runs on'
        f" {hop.machine}, which has no address and is not upstream there"
        f" (call chain: {chain}), so the flow cannot reach it"
    )
