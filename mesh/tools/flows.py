"""``mesh flows``: durable flows across every machine of a config, seen and steered.

Each peer answers the guarded ``Flows`` and ``Steer`` RPCs (token, mutual TLS, as
``Continue``) about the stays of durable flows its journal holds; a machine without an
address (an originator) has no peer, so its journal file is read here directly when this
host has it. The answers are merged into one summary per flow: where it is now, and why it
waits. Secrets are masked by the peers before anything leaves them.

The web UI (``mesh ui``) reads these functions too: their names, fields and signatures
are a contract (see the module's dataclasses).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from mesh.addresses import dialable
from mesh.config import Config
from mesh.durable import answer_flows, steer_local
from mesh.errors import FlowNotFound, JournalError, MeshError
from mesh.journals import open_journal
from mesh.transport import Transport
from mesh.v1 import mesh_pb2 as _pb2

__all__ = [
    "FlowDetail",
    "FlowNotFound",
    "FlowStep",
    "FlowSummary",
    "Flows",
    "State",
    "cancel_flow",
    "list_flows",
    "machine_flows",
    "retry_flow",
    "show_flow",
]

State = Literal["running", "waiting", "failed", "done", "cancelled"]
STATES: tuple[str, ...] = ("running", "waiting", "failed", "done", "cancelled")

FLOWS_METHOD = "/mesh.v1.Mesh/Flows"
STEER_METHOD = "/mesh.v1.Mesh/Steer"

#: Seconds each peer gets to answer.
ASK_TIMEOUT = 5.0


@dataclass(frozen=True)
class FlowSummary:
    """One durable flow, merged from every machine that journaled part of it."""

    flow_id: str
    request: str
    state: str  # one of State
    machine: str  # machine where the flow is now (or ended)
    line: int  # line index where it is now (or ended / failed)
    started: float  # unix time the flow was started
    updated: float  # unix time of its last journal record
    waiting: (
        str | None
    )  # e.g. "waiting for payments (127.0.0.1:50052): unavailable for 42 s, retrying"
    error: str | None  # one line, for failed flows (names machine and line)


@dataclass(frozen=True)
class FlowStep:
    """A line of a flow's timeline, as the machine that ran it journaled it."""

    machine: str
    line: int
    log: str  # the rendered log line, secrets masked
    state: str  # "accepted" | "done" | "failed" | "skipped"
    at: float  # unix time
    error: str | None


@dataclass(frozen=True)
class FlowDetail:
    """A flow's summary, its timeline, its last context and (when done) its result."""

    summary: FlowSummary
    steps: list[FlowStep]  # in order
    context: dict[str, Any]  # last known context, secrets masked
    result: dict[str, Any] | None  # final context (masked) when done


class Flows(list[FlowSummary]):
    """A list of flows that also says which machines did not answer (``unreachable``)
    and how large each answering machine's journal is (``journal_bytes``)."""

    def __init__(
        self,
        items: Iterable[FlowSummary] = (),
        unreachable: Iterable[str] = (),
        journal_bytes: dict[str, int] | None = None,
    ) -> None:
        super().__init__(items)
        self.unreachable: list[str] = list(unreachable)
        self.journal_bytes: dict[str, int] = dict(journal_bytes or {})


@dataclass
class _Answers:
    stays: list[tuple[str, Any]] = field(default_factory=list)  # (machine, FlowStay)
    unreachable: list[str] = field(default_factory=list)
    journal_bytes: dict[str, int] = field(default_factory=dict)


# -- asking every machine ---------------------------------------------------------------


def _targets(config: Config) -> list[tuple[str, str]]:
    """(machine, address) of every peer of the config: one per replica."""
    out: list[tuple[str, str]] = []
    for name, machine in config.machines.items():
        if not machine.address:
            continue
        if machine.replicas:
            out.extend((name, dialable(bind)) for bind in machine.replicas)
        else:
            out.append((name, machine.address))
    return out


def _transport(config: Config, as_machine: str | None) -> Transport:
    if as_machine is None:
        # Any machine's credentials will do for mutual TLS; an originator's first.
        plain = [m for m, c in config.machines.items() if not c.address]
        as_machine = (plain or list(config.machines) or [""])[0]
    return Transport.of(config, as_machine)


def _unary(  # noqa: PLR0917 - the record's fields, in order
    transport: Transport, machine: str, address: str, method: str, request: Any, reply: Any
) -> Any:
    with transport.open_channel(machine, address) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return call(request, timeout=ASK_TIMEOUT)


def _ask(config: Config, request: _pb2.FlowsRequest, as_machine: str | None = None) -> _Answers:
    answers = _Answers()
    transport = _transport(config, as_machine)
    for machine, address in _targets(config):
        try:
            reply = _unary(transport, machine, address, FLOWS_METHOD, request, _pb2.FlowsReply)
        except grpc.RpcError as exc:
            answers.unreachable.append(f"{machine} ({address}): {exc.code().name}")
            continue
        key = f"{machine}@{address}"
        answers.journal_bytes[key] = reply.journal_bytes
        answers.stays.extend((machine, stay) for stay in reply.stays)
    for name, machine_config in config.machines.items():
        if machine_config.address:
            continue
        local = _local(config, name, request)
        if local is not None:
            answers.journal_bytes[name] = local.journal_bytes
            answers.stays.extend((name, stay) for stay in local.stays)
    return answers


def _local(config: Config, machine: str, request: _pb2.FlowsRequest) -> Any:
    """What an address-less machine's journal file on this host says, if there is one."""
    url = config.journal_url(machine)
    try:
        journal = open_journal(
            url, synchronous=config.journal.synchronous, create=False, machine=machine
        )
    except JournalError:
        return None
    try:
        return answer_flows(journal, machine, config.flows, request, {})
    finally:
        journal.close()


# -- merging stays into flows -----------------------------------------------------------


def _summary(
    flow_id: str, stays: list[tuple[str, Any]], config: Config | None = None
) -> FlowSummary:
    request = stays[0][1].request
    started = min(s.started for _, s in stays)
    updated = max(s.updated for _, s in stays)
    cancelled = [s for _, s in stays if s.state == "cancelled"]
    open_ = [(m, s) for m, s in stays if s.state in ("running", "waiting")]
    origin = [(m, s) for m, s in stays if s.origin]
    waiting = None
    error = None
    if cancelled:
        machine, stay = next((m, s) for m, s in stays if s.state == "cancelled")
        state = "cancelled"
        error = stay.error or None
    elif origin and origin[0][1].state in ("done", "failed"):
        machine, stay = origin[0]
        state = stay.state
        error = stay.error or None
    elif open_:
        # Where it is now: the deepest stay still open (the ones above wait for it).
        machine, stay = max(open_, key=lambda ms: (ms[1].line, ms[1].updated))
        waiters = [s for _, s in open_ if s.waiting]
        if waiters:
            state = "waiting"
            waiting = waiters[0].waiting
        else:
            state = "running"
    else:
        # Every stay finished: the outermost one says how the flow ended.
        machine, stay = min(stays, key=lambda ms: (ms[1].line, -ms[1].updated))
        state = stay.state
        error = stay.error or None
    if state == "failed" and error is None:
        error = next((s.error for _, s in stays if s.error), None)
    line = int(stay.position)
    if state == "failed":
        # Where it failed: the deepest stay that failed.
        machine, stay = max(
            ((m, s) for m, s in stays if s.state == "failed"), key=lambda ms: ms[1].line
        )
        line = int(stay.position)
    elif state == "done" and config is not None and request in config.flows.flows:
        last = config.flows.flows[request].lines[-1]
        machine, line = last.machine, len(config.flows.flows[request].lines) - 1
    return FlowSummary(
        flow_id=flow_id,
        request=request,
        state=state,
        machine=machine,
        line=line,
        started=started,
        updated=updated,
        waiting=waiting,
        error=error,
    )


def _grouped(stays: list[tuple[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    flows: dict[str, list[tuple[str, Any]]] = {}
    for machine, stay in stays:
        flows.setdefault(stay.flow_id, []).append((machine, stay))
    return flows


def _since(since: float | None) -> float:
    """``since`` as given to :func:`list_flows`: seconds ago when small, else a Unix time."""
    if not since:
        return 0.0
    return time.time() - since if since < 10 * 365 * 86400 else since


def list_flows(
    config: Config,
    *,
    state: str | None = None,
    request: str | None = None,
    since: float | None = None,
    as_machine: str | None = None,
) -> Flows:
    """Every durable flow the machines of ``config`` journaled, newest first.

    ``state``: only flows in that state (``running``, ``waiting``, ``failed``, ``done``,
    ``cancelled``); ``request``: only that request's; ``since``: only flows updated in the
    last ``since`` seconds (or since that Unix time, when it is one). Machines that did
    not answer are named in the result's ``unreachable``.
    """
    if state is not None and state not in STATES:
        raise MeshError(f"--state must be one of {', '.join(STATES)}, not {state!r}")
    ask = _pb2.FlowsRequest(request=request or "", since=_since(since))
    answers = _ask(config, ask, as_machine)
    flows = [_summary(fid, stays, config) for fid, stays in _grouped(answers.stays).items()]
    if state is not None:
        flows = [f for f in flows if f.state == state]
    flows.sort(key=lambda f: f.started, reverse=True)
    return Flows(flows, answers.unreachable, answers.journal_bytes)


def show_flow(config: Config, flow_id: str, *, as_machine: str | None = None) -> FlowDetail:
    """One flow: its summary, timeline, last context and result. FlowNotFound when no
    machine knows it."""
    answers = _ask(config, _pb2.FlowsRequest(flow_id=flow_id), as_machine)
    stays = [(m, s) for m, s in answers.stays if s.flow_id == flow_id]
    if not stays:
        unreachable = (
            f" ({len(answers.unreachable)} machines did not answer: "
            + "; ".join(answers.unreachable)
            + ")"
            if answers.unreachable
            else ""
        )
        raise FlowNotFound(f"no machine's journal knows flow {flow_id}{unreachable}")
    summary = _summary(flow_id, stays, config)
    steps: list[FlowStep] = []
    for _, stay in stays:
        for s in stay.steps:
            steps.append(FlowStep(s.machine, s.line, s.log, s.state, s.at, s.error or None))
    steps.sort(key=lambda s: (s.at, s.line))
    seen: set[tuple[int, str]] = set()
    ordered: list[FlowStep] = []
    for step in steps:  # a line run again after a crash shows once, its last run kept
        key = (step.line, step.state)
        if key in seen and step.state == "done":
            ordered = [s for s in ordered if (s.line, s.state) != key]
        seen.add(key)
        ordered.append(step)
    if summary.state in ("running", "waiting"):
        ordered.append(
            FlowStep(summary.machine, summary.line, "", "accepted", summary.updated, None)
        )
    latest = max(stays, key=lambda ms: ms[1].updated)[1]
    context = json.loads(latest.context) if latest.context else {}
    result = None
    origin = [s for _, s in stays if s.origin and s.state == "done" and s.result]
    if origin:
        result = json.loads(origin[0].result)
    elif summary.state == "done":
        done = [s for _, s in stays if s.result]
        result = json.loads(done[0].result) if done else context
    return FlowDetail(summary, ordered, context, result)


def _steer(config: Config, action: str, flow_id: str, as_machine: str | None) -> FlowSummary:
    detail = show_flow(config, flow_id, as_machine=as_machine)
    answers = _ask(config, _pb2.FlowsRequest(flow_id=flow_id), as_machine)
    # Deepest stays first: a stay run again below answers the resends of those above it.
    order: dict[str, int] = {}
    for machine, stay in answers.stays:
        order[machine] = max(order.get(machine, -1), stay.line)
    transport = _transport(config, as_machine)
    changed = 0
    targets = sorted(_targets(config), key=lambda t: order.get(t[0], -1), reverse=True)
    for machine, address in targets:
        if machine not in order:
            continue
        try:
            reply = _unary(
                transport,
                machine,
                address,
                STEER_METHOD,
                _pb2.SteerRequest(action=action, flow_id=flow_id),
                _pb2.SteerReply,
            )
            changed += reply.changed
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                raise MeshError(
                    f"{machine} ({address}) refused to {action} {flow_id}: {exc.details()}"
                ) from None
    for name, machine_config in config.machines.items():
        if not machine_config.address:
            changed += steer_local(config, name, action, flow_id)
    if not changed and detail.summary.state not in ("failed", "cancelled") and action == "retry":
        raise MeshError(f"flow {flow_id} is {detail.summary.state}, not failed: nothing to retry")
    return show_flow(config, flow_id, as_machine=as_machine).summary


def cancel_flow(config: Config, flow_id: str, *, as_machine: str | None = None) -> FlowSummary:
    """Stop a durable flow on every machine that runs part of it; its summary after."""
    return _steer(config, "cancel", flow_id, as_machine)


def retry_flow(config: Config, flow_id: str, *, as_machine: str | None = None) -> FlowSummary:
    """Run a failed (or cancelled) durable flow again from the line that failed: each
    machine runs its failed stays again from their last record, deepest first."""
    return _steer(config, "retry", flow_id, as_machine)


def machine_flows(config: Config, *, as_machine: str | None = None) -> dict[str, int]:
    """Running and waiting flows per ``machine@address`` (a machine without an address:
    its name), every answering peer listed, with 0 when it has none."""
    answers = _ask(config, _pb2.FlowsRequest(), as_machine)
    counts: dict[str, int] = dict.fromkeys(answers.journal_bytes, 0)
    keys = {m: k for k in answers.journal_bytes for m in [k.partition("@")[0]]}
    for machine, stay in answers.stays:
        if stay.state in ("running", "waiting"):
            key = keys.get(machine, machine)
            counts[key] = counts.get(key, 0) + 1
    return counts
