"""What the pages of ``mesh ui`` show, worked out from the config and what peers said.

Pure: values in (the config, health answers, flow summaries and details as
:mod:`mesh.tools.flows` returns them), values out (rows, filters, diagrams). The
I/O that gets the answers is :mod:`mesh.ui.gather`; turning these values into HTML
is :mod:`mesh.ui.pages`. Flow summaries, steps and details are read through the
small protocols below, the fields :mod:`mesh.tools.flows` promises, so this
module is tested with plain values and never dials anything.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mesh.addresses import dialable
from mesh.analysis import Check
from mesh.config import Config
from mesh.flowfile import Flow
from mesh.result import Step
from mesh.tools import diagram

__all__ = [
    "ACTIVE",
    "STATES",
    "FlowFilter",
    "FlowView",
    "MachineRow",
    "RequestView",
    "ago",
    "flow_rows",
    "flow_view",
    "machine_rows",
    "parse_age",
    "parse_filter",
    "request_views",
]

#: Every state a durable flow can be in, in the order the filter lists them.
STATES = ("running", "waiting", "failed", "done", "cancelled")
#: States in which a flow still holds a place on a machine: it can be cancelled.
ACTIVE = frozenset({"running", "waiting"})
#: States from which a flow can be started again at the line where it stopped.
RETRYABLE = frozenset({"failed", "cancelled"})


class Summary(Protocol):
    """One flow as ``mesh flows`` lists it (``mesh.tools.flows.FlowSummary``)."""

    @property
    def flow_id(self) -> str: ...
    @property
    def request(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def machine(self) -> str: ...
    @property
    def line(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def updated(self) -> float: ...
    @property
    def waiting(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


class StepRecord(Protocol):
    """One record of a flow's journal (``mesh.tools.flows.FlowStep``), secrets masked."""

    @property
    def machine(self) -> str: ...
    @property
    def line(self) -> int: ...
    @property
    def log(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def at(self) -> float: ...
    @property
    def error(self) -> str | None: ...


class Detail(Protocol):
    """One flow in full (``mesh.tools.flows.FlowDetail``), secrets masked."""

    @property
    def summary(self) -> Summary: ...
    @property
    def steps(self) -> Sequence[StepRecord]: ...
    @property
    def context(self) -> Mapping[str, Any]: ...
    @property
    def result(self) -> Mapping[str, Any] | None: ...


# -- machines ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MachineRow:
    """One machine, or one replica of a machine with several, as the Machines page lists it."""

    machine: str
    replica: int | None  # 1..N for a machine with replicas
    address: str  # what other machines dial ("" for a pure originator)
    dial: str  # where this replica is asked for its health ("" when it has no peer)
    health: str  # SERVING, NOT_SERVING, unreachable, or "no peer" for an originator
    flows: int  # durable flows running or waiting there now

    @property
    def name(self) -> str:
        return self.machine if self.replica is None else f"{self.machine} #{self.replica}"


def machine_rows(
    config: Config, health: Mapping[str, str], flows_at: Mapping[str, int]
) -> list[MachineRow]:
    """A row per machine and replica of ``config``, in its order.

    ``health`` maps a dialled address to its answer; ``flows_at`` maps
    ``"machine@address"`` (either the bind or the dialled form) or a bare machine
    name to the number of flows running or waiting there.
    """
    rows: list[MachineRow] = []
    for machine in config.machines.values():
        binds = machine.binds
        if not binds:
            count = flows_at.get(machine.name, 0)
            rows.append(MachineRow(machine.name, None, "", "", "no peer", count))
            continue
        many = len(binds) > 1
        for n, bind in enumerate(binds, 1):
            dial = dialable(bind)
            keys = {f"{machine.name}@{bind}", f"{machine.name}@{dial}"}
            if not many:
                keys.add(f"{machine.name}@{machine.address}")
            count = sum(flows_at.get(k, 0) for k in keys)
            if not many:
                count += flows_at.get(machine.name, 0)
            rows.append(
                MachineRow(
                    machine.name,
                    n if many else None,
                    machine.address if not many else bind,
                    dial,
                    health.get(dial, "unknown"),
                    count,
                )
            )
    return rows


# -- the flow file -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineView:
    index: int
    text: str
    machine: str
    handler: str  # the handler's name, or "pass-through" when none is registered
    how: str  # how the flow gets there: local, call, hand back…

    @property
    def registered(self) -> bool:
        return self.handler != "pass-through"


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request of the flow file: its diagram and a row per line."""

    name: str
    path: str
    digest: str
    lines: tuple[LineView, ...]
    svg: str


def request_views(config: Config, found: Check | None) -> list[RequestView]:
    """Every request of the flow files, with ``mesh check``'s rows when it could run."""
    plans = {p.name: p for p in found.plans} if found is not None else {}
    views = []
    for name, flow in config.flows.flows.items():
        plan = plans.get(name)
        if plan is not None:
            lines = tuple(
                LineView(int(i), text, machine, handler, how)
                for i, text, machine, handler, how in plan.rows
            )
        else:
            lines = tuple(LineView(ln.index, ln.text, ln.machine, "?", "?") for ln in flow.lines)
        svg = diagram.to_svg(diagram.from_flow(flow), standalone=False)
        views.append(RequestView(name, flow.lines[0].path, flow.digest, lines, svg))
    return views


# -- the flows list ----------------------------------------------------------------------

_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*", re.IGNORECASE)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """Seconds in ``30s``, ``5m``, ``2h``, ``1d`` (a bare number is seconds)."""
    match = _AGE.fullmatch(text)
    if match is None:
        raise ValueError(f"age {text!r} is not a number of s, m, h or d (e.g. 5m)")
    return float(match.group(1)) * _UNIT[(match.group(2) or "s").lower()]


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """The flows list's filters, from its query string; ``problems`` name what was ignored."""

    state: str | None = None
    request: str | None = None
    age: str | None = None
    max_age: float | None = None
    problems: tuple[str, ...] = ()


def parse_filter(query: Mapping[str, str], requests: Collection[str]) -> FlowFilter:
    """``?state=failed&request=login&age=5m``: an unknown value is named and left out."""
    problems = []
    state = (query.get("state") or "").strip() or None
    if state is not None and state not in STATES:
        problems.append(f"no state {state!r} (one of {', '.join(STATES)})")
        state = None
    request = (query.get("request") or "").strip() or None
    if request is not None and request not in requests:
        problems.append(f"no request {request!r} in the flow files")
        request = None
    age = (query.get("age") or "").strip() or None
    max_age = None
    if age is not None:
        try:
            max_age = parse_age(age)
        except ValueError as exc:
            problems.append(str(exc))
            age = None
    return FlowFilter(state, request, age, max_age, tuple(problems))


@dataclass(frozen=True, slots=True)
class FlowRow:
    flow_id: str
    request: str
    state: str
    machine: str
    line: int
    line_text: str
    started: float
    updated: float
    note: str  # where it waits, or its error, or ""


def flow_rows(
    summaries: Iterable[Summary], config: Config, chosen: FlowFilter, now: float | None = None
) -> list[FlowRow]:
    """The flows ``chosen`` lets through, newest first (peers may answer out of order)."""
    now = time.time() if now is None else now
    rows = []
    for s in summaries:
        if chosen.state and s.state != chosen.state:
            continue
        if chosen.request and s.request != chosen.request:
            continue
        if chosen.max_age is not None and now - s.started > chosen.max_age:
            continue
        note = s.waiting or s.error or ""
        rows.append(
            FlowRow(
                s.flow_id,
                s.request,
                s.state,
                s.machine,
                s.line,
                line_text(config, s.request, s.line),
                s.started,
                s.updated,
                note,
            )
        )
    rows.sort(key=lambda r: (r.started, r.flow_id), reverse=True)
    return rows


def line_text(config: Config, request: str, index: int) -> str:
    """The flow file's text of ``request`` line ``index``, or "" when there is none."""
    flow = config.flows.flows.get(request)
    if flow is None or not 0 <= index < len(flow.lines):
        return ""
    return flow.lines[index].text


def ago(seconds: float) -> str:
    """``4 s ago``, ``3 min ago``, ``2 h ago``, ``5 d ago``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


# -- one flow ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimelineRow:
    line: int
    machine: str
    log: str  # rendered, secrets masked
    state: str
    at: float  # when the line began, by its machine's clock
    ms: float | None  # its own time; else the time to the next line, the hop included
    error: str | None
    own_time: bool = True  # False: ``ms`` is the time to the next line's record


@dataclass(frozen=True, slots=True)
class FlowView:
    """Everything a flow's page shows."""

    summary: Summary
    timeline: tuple[TimelineRow, ...]
    svg: str  # the sequence diagram of the path taken ("" when nothing ran yet)
    context: Mapping[str, Any]
    result: Mapping[str, Any] | None
    waits_at: str  # "stock, before line 2 (Charging :customer, on billing)", when it waits
    failed_at: tuple[str, int] | None  # the machine and line that failed
    can_cancel: bool
    can_retry: bool
    lines: tuple[tuple[int, str, str], ...] = field(default=())  # the flow file's rows


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def timeline(steps: Sequence[StepRecord]) -> tuple[TimelineRow, ...]:
    """One row per line as it ran, in order (two records of one line, as when it was
    accepted and then finished, folded into one).

    A record that carries its ``duration`` gives the line's own time; else a line's time
    is the time to the next line's record, the hop included, as ``mesh logs`` shows it.
    """
    rows: list[TimelineRow] = []
    for step in steps:
        own = _seconds(getattr(step, "duration", None))
        ms = own * 1000.0 if own is not None else None
        last = rows[-1] if rows else None
        if last is not None and last.line == step.line and last.machine == step.machine:
            rows[-1] = TimelineRow(
                step.line,
                step.machine,
                step.log or last.log,
                step.state,
                last.at,
                ms if ms is not None else last.ms,
                step.error or last.error,
            )
            continue
        rows.append(
            TimelineRow(step.line, step.machine, step.log, step.state, step.at, ms, step.error)
        )
    for i, row in enumerate(rows[:-1]):
        if row.ms is None:
            rows[i] = replace(row, ms=max(rows[i + 1].at - row.at, 0.0) * 1000.0, own_time=False)
    return tuple(rows)


def run_diagram(flow: Flow | None, rows: Sequence[TimelineRow], title: str) -> str:
    """The path the flow took as an SVG sequence diagram: the lines that ran (not the one
    it waits to start, nor skipped ones), each with its time, the slowest marked."""
    ran = [r for r in rows if r.state != "skipped" and r.log]
    if flow is None or not ran:
        return ""
    steps = [Step(r.line, r.log, r.machine, r.at, (r.ms or 0.0) / 1000.0) for r in ran]
    picture = diagram.from_run(flow, steps, title)
    return diagram.to_svg(picture, standalone=False)


def flow_view(detail: Detail, config: Config) -> FlowView:
    """The page of one flow: its diagram, timeline, masked context, where it waits."""
    s = detail.summary
    flow = config.flows.flows.get(s.request)
    ran = timeline(detail.steps)
    svg = run_diagram(flow, ran, s.flow_id)
    # The line a flow waits to start has no log yet: the flow file's text stands in.
    rows = tuple(
        replace(r, log=f"({r.state}) {line_text(config, s.request, r.line)}") if not r.log else r
        for r in ran
    )
    waits_at = ""
    if s.state == "waiting":
        waits_at = f"{s.machine}, before line {s.line}"
        if flow is not None and 0 <= s.line < len(flow.lines):
            line = flow.lines[s.line]
            waits_at += f" ({line.text}, on {line.machine})"
    failed_at = None
    if s.state == "failed":
        failed = [r for r in rows if r.state == "failed"]
        failed_at = (failed[-1].machine, failed[-1].line) if failed else (s.machine, s.line)
    lines = tuple((ln.index, ln.text, ln.machine) for ln in flow.lines) if flow else ()
    return FlowView(
        summary=s,
        timeline=rows,
        svg=svg,
        context=dict(detail.context),
        result=dict(detail.result) if detail.result is not None else None,
        waits_at=waits_at,
        failed_at=failed_at,
        can_cancel=s.state in ACTIVE,
        can_retry=s.state in RETRYABLE,
        lines=lines,
    )
