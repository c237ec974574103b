"""Runs a flow's lines on this machine: emit each line, call its handler, route on.

One :class:`FlowState` per flow per call chain hop, held in a context variable:
the peer runs every ``Continue`` in a fresh ``contextvars.Context`` (gRPC reuses
pool threads, so nothing may leak from one call to the next), ``node.start``
in a copy of the caller's, and inline code in its own thread's context.

The loop in :func:`advance` is the only place that decides what happens after a
line; the structlog processor and the peer both call into it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from structlog.contextvars import bind_contextvars, reset_contextvars

from mesh import tracing
from mesh.errors import ContextError, FlowError, FlowTimeout, FlowViolation, MeshError
from mesh.flowfile import Flow
from mesh.loggers import BoundOnce
from mesh.masking import scrub, secret_values
from mesh.registry import Handler, describe
from mesh.routing import DONE, Call, HandBack, RunHere, route
from mesh.wire import step_error

if TYPE_CHECKING:
    from mesh.node import Node

_log = BoundOnce("mesh")

#: A line run here: (index, rendered line, machine, start, duration), the fields of Step.
LocalStep = tuple[int, str, str, float, float]

#: The flow active in this context, if any.
current: ContextVar[FlowState | None] = ContextVar("mesh_flow", default=None)


class Rendered(str):
    """A flow line the runtime emits itself, so the processor knows not to route it."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HandOff:
    """The flow must go on at line ``index`` on ``machine``, upstream of here."""

    machine: str
    index: int


class _Waiting:
    """Inline code on this machine will log the line itself."""


class _Finished:
    """The flow has no line left."""


WAITING: Final = _Waiting()
FINISHED: Final = _Finished()
Outcome = HandOff | _Waiting | _Finished


@dataclass(slots=True, eq=False)
class FlowState:
    """One flow as this machine sees it, for the length of its stay here."""

    node: Node
    flow: Flow
    flow_id: str
    context: dict[str, Any]
    deadline: float  # time.monotonic()
    via: tuple[str, ...] = ()
    # Serving a call (a peer), not originating the flow: replies from below then go up as
    # bytes. Not the same as a non-empty ``via``: a caller from outside may name no machine.
    inbound: bool = False
    # The timeline so far. Steps run here are LocalStep tuples (a frozen Step is
    # slow to build, and a peer only encodes it); on a peer, a call downstream adds
    # its reply's bytes, passed up as they came (wire.encode_reply); on the
    # originator, the reply's steps field. All become Step only at the originator
    # (wire.as_steps).
    steps: list[Any] = field(default_factory=list)
    current: int = -1  # the line emitted and not yet finished by "next"
    awaiting: int = -1  # the line inline code is expected to log next
    in_handler: bool = False
    nexted: bool = False  # "next" logged by the running handler
    done: bool = False
    tokens: Mapping[str, Any] | None = None  # contextvars bindings to undo (inline flows)
    # The flow finished below this peer: the last of ``steps`` is the reply that
    # said so, outcome and final context included, passed up the chain as it came
    # (``context`` is then stale; nothing runs here after the flow is done).
    done_below: bool = False
    _bound: int = -1  # the line_index bound in the log context
    _wall: float = 0.0
    _t0: float = 0.0
    _rendered: str = ""

    @property
    def machine(self) -> str:
        return self.node.machine

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fields(self, index: int) -> dict[str, Any]:
        """What every flow line carries in the log."""
        return {
            "flow_id": self.flow_id,
            "request": self.flow.name,
            "line_index": index,
            "machine": self.node.machine,
        }

    def scrub(self, text: str) -> str:
        """``text`` with the values of this flow's secrets masked."""
        if not self.flow.secrets:
            return text
        return scrub(text, secret_values(self.context, self.flow.secrets))


def activate(state: FlowState, index: int = 0) -> None:
    """Make ``state`` the current flow of this context, and bind its log fields.

    Every event logged while the flow is here (a handler's own logging too)
    then carries ``flow_id``, ``request``, ``machine`` and ``line_index``.
    """
    current.set(state)
    state._bound = index
    state.tokens = bind_contextvars(
        flow_id=state.flow_id,
        request=state.flow.name,
        machine=state.node.machine,
        line_index=index,
    )


def finish(state: FlowState) -> None:
    """End an inline flow: undo its log bindings (the state stays readable)."""
    state.done = True
    state.current = state.awaiting = -1
    if state.tokens is not None:
        # ValueError: bound in another context; nothing of ours to undo here.
        with contextlib.suppress(ValueError):
            reset_contextvars(**state.tokens)
        state.tokens = None


def open_line(state: FlowState, index: int) -> str:
    """Start timing line ``index`` and render it; returns the rendered text."""
    rendered = state.scrub(state.flow.render(index, state.context))
    state.current = index
    state.awaiting = -1
    state._rendered = rendered
    state._wall = time.time()
    state._t0 = time.perf_counter()
    if state._bound != index:  # activate() bound the first line already
        bind_contextvars(line_index=index)
        state._bound = index
    return rendered


def close_line(state: FlowState) -> None:
    """Record the open line as a step of the timeline."""
    step: LocalStep = (
        state.current,
        state._rendered,
        state.node.machine,
        state._wall,
        time.perf_counter() - state._t0,
    )
    state.steps.append(step)
    tracing.step(state, step)
    state.current = -1


def emit(state: FlowState, index: int) -> None:
    """Log line ``index`` as the runtime reaches it."""
    rendered = open_line(state, index)
    _log.info(  # state.fields(index), without building a dict to unpack on every line
        Rendered(rendered),
        flow_id=state.flow_id,
        request=state.flow.name,
        line_index=index,
        machine=state.node.machine,
    )


def fail_step(state: FlowState, index: int, exc: BaseException) -> MeshError:
    """The FlowError for a step that raised ``exc``, secrets scrubbed."""
    # The mesh's own rule-breaking errors keep their public names, so the
    # originator can raise them as the same classes.
    if isinstance(exc, FlowViolation):
        error_type = "FlowViolation"
    elif isinstance(exc, ContextError):
        error_type = "ContextError"
    else:
        error_type = type(exc).__name__
    return step_error(
        request=state.flow.name,
        flow_id=state.flow_id,
        machine=state.node.machine,
        line=state.flow.lines[index].text,
        line_index=index,
        error_type=error_type,
        detail=state.scrub(str(exc)),
    )


def run_handler(state: FlowState, index: int, fn: Handler) -> None:
    """Run a line's handler; its "next" (and any inline lines after it) end the step."""
    emit(state, index)
    state.in_handler = True
    state.nexted = False
    try:
        fn(state.context)
        if not state.nexted:
            raise FlowViolation(
                f'handler {describe(fn)} returned without logging "next"'
                f" for line {state.current} {state.flow.lines[state.current].text!r}"
            )
    except BaseException as exc:
        # Logged here, with the traceback, on the machine that ran the step; the
        # originator gets the one-line FlowError. SystemExit and KeyboardInterrupt
        # too: raised in a peer's worker thread they would end no process, only leave
        # the call without a reply until its deadline; in node.start or inline code,
        # a step's failure is the flow's, not the program's.
        line = state.current if state.current >= 0 else index
        tracing.step_failed(state, line, exc)
        _log.error(
            "mesh.step_failed",
            handler=describe(fn),
            error=state.scrub(f"{type(exc).__name__}: {exc}"),
            exc_info=exc,
            **state.fields(line),
        )
        raise fail_step(state, line, exc) from exc
    finally:
        state.in_handler = False
    state.nexted = False
    close_line(state)


def advance(state: FlowState, index: int, *, inline: bool = False) -> Outcome:
    """Carry the flow on from line ``index`` until it leaves this machine or ends.

    ``inline`` is set when inline code logged "next" itself: a local line with no
    handler then waits for that code to log it, instead of passing through.
    Raises the MeshError of a failed step, refused call or passed deadline.
    """
    node = state.node
    flow = state.flow
    me = node.machine
    handlers = node.handlers[flow.name]
    while True:
        decision = route(flow, me, index, state.via)
        if decision is not DONE and state.remaining() <= 0:
            raise FlowTimeout(
                f"{flow.name} passed its deadline on {me} before line {index}"
                f" {flow.lines[index].text!r}",
                request=flow.name,
                flow_id=state.flow_id,
                machine=me,
                line_index=index,
            )
        if type(decision) is RunHere:
            fn = handlers[index]
            if fn is None:
                if inline:
                    state.awaiting = index
                    return WAITING
                emit(state, index)
                close_line(state)
                index += 1
                continue
            run_handler(state, index, fn)
            index = state.steps[-1][0] + 1  # the handler's last line (LocalStep)
        elif type(decision) is Call:
            try:
                back = node.dialer.continue_flow(state, decision.machine, index)
            except ContextError as exc:
                # A step further down that failed is already a FlowError; the
                # caller's own arguments (line 0) are theirs to fix, at the call.
                if isinstance(exc, FlowError) or index == 0:
                    raise
                raise fail_step(state, index - 1, exc) from exc
            if back is None:
                return FINISHED
            # The dialer checked the hand-off: this machine's line or one upstream's.
            if back.machine == me:
                index = back.index
                continue
            return back
        elif type(decision) is HandBack:
            return HandOff(decision.machine, decision.index)
        else:
            return FINISHED
