"""Durable flows on a node: what handlers use (``step_id``, ``step_transaction``), why a
flow waits, and the answers to the inspection RPCs (``Flows``, ``Steer``).

The records themselves are written by the runtime (mesh/runtime.py) into the machine's
journal (mesh/journal.py); recovery of what a killed process left is in mesh/peer.py (a
peer's stays) and mesh/node.py (flows started by an address-less originator).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh import runtime
from mesh.errors import MeshError
from mesh.flowfile import FlowSet
from mesh.journal import CANCELLED, RUNNING, Journal, Stay
from mesh.journals import open_journal
from mesh.masking import masked
from mesh.v1 import mesh_pb2 as _pb2

if TYPE_CHECKING:
    import sqlite3

    from mesh.config import Config

__all__ = [
    "StepId",
    "Waits",
    "answer_flows",
    "deadline_left",
    "payload_of",
    "stay_message",
    "steer",
    "steer_local",
    "step_id",
    "step_transaction",
]


@dataclass(frozen=True, slots=True)
class StepId:
    """Names one step of one flow: unique, and the same if the step runs again after a
    crash, so a side effect keyed by it (a unique key in your table) happens once."""

    flow_id: str
    line: int

    def __str__(self) -> str:
        return f"{self.flow_id}:{self.line}"


def step_id() -> StepId:
    """The step this handler runs: its flow id and line index."""
    state = runtime.current.get()
    if state is None or state.done:
        raise MeshError("mesh.step_id() works in a handler, or inline code of a flow")
    index = state.current if state.current >= 0 else state.awaiting
    if index < 0:
        raise MeshError(f"flow {state.flow_id} of {state.flow.name} is between lines here")
    return StepId(state.flow_id, index)


@contextlib.contextmanager
def step_transaction() -> Iterator[sqlite3.Connection]:
    """The running step's transaction in its machine's journal (a ``sqlite3`` connection):
    what the handler writes with it commits together with the step's outcome record, when
    the handler returns, or not at all. So a step whose effects are writes to this database
    happens exactly once, even if the process is killed at any instant.

    Only in a (synchronous) handler of a durable request; the journal's write lock is held
    from here until the handler returns, so keep the rest of the handler short.
    """
    state = runtime.current.get()
    if state is None or state.journal is None or not state.in_handler:
        raise MeshError(
            "mesh.step_transaction() works only in a handler of a durable request"
            " (durable in mesh.toml)"
        )
    conn = state.tx
    if conn is None:
        conn = state.journal.step_connection()
        conn.execute("BEGIN IMMEDIATE")
        state.tx = conn
    try:
        yield conn
    except BaseException:
        state.tx = None
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise


class Waits:
    """Why durable flows wait here: the machine a call of theirs cannot reach, since when."""

    def __init__(self) -> None:
        self._waits: dict[str, tuple[str, str, float, str]] = {}

    def waiting(self, flow_id: str, machine: str, address: str, problem: str) -> None:
        known = self._waits.get(flow_id)
        since = known[2] if known is not None and known[0] == machine else time.time()
        self._waits[flow_id] = (machine, address, since, problem)

    def reached(self, flow_id: str) -> None:
        self._waits.pop(flow_id, None)

    def text(self, flow_id: str) -> str:
        known = self._waits.get(flow_id)
        if known is None:
            return ""
        machine, address, since, problem = known
        why = f" ({_short(problem)})" if problem else ""
        return (
            f"waiting for {machine} ({address}): unavailable for"
            f" {time.time() - since:.0f} s, retrying{why}"
        )

    def as_map(self) -> dict[str, str]:
        return {flow_id: self.text(flow_id) for flow_id in list(self._waits)}


def _short(problem: str, most: int = 80) -> str:
    """gRPC's reason a machine cannot be reached, its last clause, cut short."""
    text = problem.rpartition(": ")[2] if ": " in problem else problem
    return text if len(text) <= most else text[: most - 1] + "…"


def _masked_json(raw: bytes | None, secrets: frozenset[str]) -> bytes:
    if not raw:
        return b""
    try:
        context = json.loads(raw)
    except ValueError:
        return b""
    if not isinstance(context, dict):
        return b""
    return json.dumps(masked(context, secrets), ensure_ascii=False).encode()


def _result_context(stay: Stay) -> bytes | None:
    """The final context of a finished stay whose reply (or result) says done."""
    if stay.outcome is None:
        return None
    with contextlib.suppress(Exception):
        reply = _pb2.ContinueReply.FromString(stay.outcome)
        if reply.WhichOneof("outcome") == "done":
            return reply.done.context  # type: ignore[no-any-return]
        if reply.WhichOneof("outcome") == "hand_off":
            return reply.hand_off.context  # type: ignore[no-any-return]
    return None


def stay_message(
    stay: Stay, machine: str, flows: FlowSet, waiting: str, *, with_steps: bool, journal: Journal
) -> _pb2.FlowStay:
    flow = flows.flows.get(stay.request)
    secrets = flow.secrets if flow is not None else frozenset()
    state = stay.state
    if state == RUNNING and waiting:
        state = "waiting"
    message = _pb2.FlowStay(
        flow_id=stay.flow_id,
        line=stay.line,
        request=stay.request,
        state=state,
        machine=machine,
        position=stay.position,
        started=stay.started,
        updated=stay.updated,
        waiting=waiting if stay.state == RUNNING else "",
        error=stay.error or "",
        origin=stay.origin,
        sender=stay.sender,
        call_machine=stay.call_machine or "",
    )
    context = stay.last_context()
    if stay.state == "done":
        final = _result_context(stay)
        if final is not None:
            message.result = _masked_json(final, secrets)
            context = final
    message.context = _masked_json(context, secrets)
    if with_steps:
        for row in journal.steps(stay.flow_id):
            if row.stay != stay.line:
                continue
            message.steps.add(
                line=row.line,
                machine=row.machine,
                log=row.log,
                state=row.state,
                at=row.at,
                duration=row.duration,
                error=row.error or "",
            )
    return message


def answer_flows(
    journal: Journal,
    machine: str,
    flows: FlowSet,
    request: _pb2.FlowsRequest,
    waits: Mapping[str, str],
) -> _pb2.FlowsReply:
    """The ``Flows`` RPC's answer from ``journal``: the stays asked for, secrets masked."""
    stays = journal.stays(
        flow_id=request.flow_id or None,
        since=request.since or None,
    )
    reply = _pb2.FlowsReply(machine=machine, journal_bytes=journal.size())
    for stay in stays:
        if request.request and stay.request != request.request:
            continue
        waiting = waits.get(stay.flow_id, "")
        message = stay_message(
            stay, machine, flows, waiting, with_steps=bool(request.flow_id), journal=journal
        )
        if request.state and message.state != request.state:
            continue
        reply.stays.append(message)
    return reply


def steer_local(config: Config, machine: str, action: str, flow_id: str) -> int:
    """``mesh flows cancel|retry`` for an address-less machine's journal on this host: its
    stays of the flow marked cancelled, or reset to run again (its next process, on
    ``mesh.connect``, recovers them). How many stays changed."""
    try:
        journal = open_journal(
            config.journal_url(machine),
            synchronous=config.journal.synchronous,
            create=False,
            machine=machine,
        )
    except MeshError:
        return 0
    try:
        return steer(journal, action, flow_id)
    finally:
        journal.close()


def steer(journal: Journal, action: str, flow_id: str) -> int:
    """Cancel or reset (retry) the stays of ``flow_id`` in ``journal``; how many changed."""
    changed = 0
    for stay in journal.stays(flow_id=flow_id):
        if action == "cancel" and stay.state == RUNNING:
            journal.set_state(stay.flow_id, stay.line, CANCELLED, "cancelled by mesh flows cancel")
            changed += 1
        elif action == "retry" and journal.reset(stay.flow_id, stay.line):
            changed += 1
    return changed


def deadline_left(stay: Stay) -> float:
    """Seconds a recovered stay has left, from its wall-clock deadline."""
    return stay.deadline - time.time()


def payload_of(stay: Stay) -> Any:
    """The call that began ``stay`` (decoded), for a recovered peer's record."""
    return _pb2.ContinueRequest.FromString(stay.payload or b"")
