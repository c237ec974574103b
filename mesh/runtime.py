"""A flow's state on this machine, and the loop that carries it from line to line.

One :class:`FlowState` per flow per stay on a machine: a peer makes one for each
call it serves, ``node.start`` and inline code one for each flow they start. This
module is the only one that changes it: the structlog processor reports what code
logged (:func:`note_next`, :func:`open_line`, ...), the transport returns answers
as values (``mesh.links.Answer``) that :func:`absorb` turns into the flow's next
move, and routing stays a pure function (``mesh.routing.route``).

The loop that decides what happens after a line has two faces over the same
steps, as httpx has a sync and an async client over one model:

* :func:`advance` blocks its thread: ``node.start`` and inline code, whose callers
  wait anyway. A call to another machine waits for the node's event loop.
* :func:`advance_async` runs on the node's event loop: every call a peer serves,
  and ``node.start_async``. A flow waiting for a reply from below is a suspended
  coroutine, not a blocked thread; a synchronous handler runs on a worker thread
  (it may block), an ``async def`` handler on the loop itself.

The flow active in a context is :data:`current`, so that code a handler calls, and
the structlog processor, find it: a peer serves each call in a fresh
``contextvars.Context``, a worker thread runs a step in a copy of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from structlog.contextvars import bind_contextvars, reset_contextvars

from mesh import tracing
from mesh.errors import (
    AccessDenied,
    ContextError,
    FlowError,
    FlowTimeout,
    FlowViolation,
    MeshError,
    PeerRefused,
    PeerUnavailable,
)
from mesh.flowfile import Flow, FlowSet
from mesh.links import Answer
from mesh.loggers import BoundOnce
from mesh.masking import scrub, secret_values
from mesh.registry import Handler, describe
from mesh.result import FlowResult
from mesh.routing import DONE, Call, Decision, HandBack, RunHere, back_lines, route
from mesh.v1 import mesh_pb2 as _pb2
from mesh.wire import (
    as_steps,
    dump_context,
    encode_reply,
    error_to_failure,
    failure_to_error,
    load_context,
    step_error,
    steps_only,
)

__all__ = [
    "FINISHED",
    "WAITING",
    "FlowState",
    "HandOff",
    "Journaled",
    "Place",
    "Rendered",
    "advance",
    "advance_async",
    "current",
    "originate",
    "originate_async",
    "resume_origin",
    "serve",
]

T = TypeVar("T")

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


class Place(Protocol):
    """What a flow needs of the machine it is on: mesh.node.Node is the one there is.

    A protocol rather than the class, so that this module, which the node imports,
    does not import the node back.
    """

    @property
    def machine(self) -> str: ...

    @property
    def flows(self) -> FlowSet: ...

    @property
    def handlers(self) -> Mapping[str, tuple[Handler | None, ...]]: ...

    @property
    def strict(self) -> bool: ...

    @property
    def max_message_bytes(self) -> int: ...

    def address_of(self, machine: str) -> str: ...

    def unavailable_hint(self, machine: str, details: str) -> str: ...

    def handlers_of(self, flow: Flow) -> tuple[Handler | None, ...]:
        """Each line's handler of ``flow``: the config's version, or one kept from an
        earlier flow file (mesh/versions.py) for a flow that started on it."""

    def new_state(
        self, flow: Flow, context: Mapping[str, Any], timeout: float | None = None
    ) -> FlowState: ...

    def call(
        self,
        machine: str,
        payload: bytes,
        deadline: float,
        traceparent: str,
        *,
        patient: str = "",
    ) -> Answer:
        """Send a call over the node's links and wait for its answer (a blocking thread).
        ``patient``: the flow id of a durable flow, whose call waits for a machine that
        cannot be reached until its deadline, instead of failing after a few attempts."""

    async def call_async(
        self,
        machine: str,
        payload: bytes,
        deadline: float,
        traceparent: str,
        *,
        patient: str = "",
    ) -> Answer:
        """The same, on the node's event loop."""

    def run_on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the node's event loop, waiting for it in this thread."""

    def run_in_worker(
        self, context: contextvars.Context, fn: Callable[..., T], *args: Any
    ) -> Awaitable[T]:
        """Run ``fn(*args)`` on a worker thread, in ``context``; await its result."""


#: mesh/control.py (conditions, fan-out, sub-flows), which imports this module and so
#: registers itself here when it is imported (mesh.node imports it) rather than being
#: imported from here: the import graph stays one-way.
_control: Any = None


def use_control(module: Any) -> None:
    """Called by mesh/control.py as it is imported."""
    global _control
    _control = module


def controller() -> Any:
    """mesh/control.py, for a flow whose file has When, Each or @REQUEST rows."""
    if _control is None:
        raise MeshError("mesh.control is not imported: import mesh (or mesh.node) first")
    return _control


@dataclass(slots=True, eq=False)
class FlowState:
    """One flow as this machine sees it, for the length of its stay here."""

    place: Place
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
    # Why the flow was stopped here before its deadline (its caller gave up or went
    # away): from then on it is as late as a flow past its deadline.
    stopped: str = ""
    # The tracing parent of this flow's next line here (mesh/tracing.py), if tracing.
    trace: Any = None
    # Durable flows (mesh/journal.py): the machine's journal, None for every other flow
    # (which then pays nothing); the line this stay began at (its key with flow_id); how
    # many of ``steps`` are journaled; the handler's own transaction (step_transaction),
    # and whether it recorded the step's progress already.
    journal: Any = None
    stay: int = -1
    recorded: int = 0
    tx: Any = None
    tx_done: bool = False
    # A handler ran here since the last journal record: the stay's end must then be
    # recorded before its reply leaves (else the end is implied by the last record).
    ran_handler: bool = False
    # A flow started here whose accept record is not written yet: it goes with the first
    # record that follows (a call, or its end), or alone before a handler runs.
    unaccepted: Any = None
    origin: bool = False
    wall_deadline: float = 0.0
    _bound: int = -1  # the line_index bound in the log context
    _wall: float = 0.0
    _t0: float = 0.0
    _rendered: str = ""

    @property
    def machine(self) -> str:
        return self.place.machine

    def remaining(self) -> float:
        if self.stopped:
            return -1.0
        return self.deadline - time.monotonic()

    def fields(self, index: int) -> dict[str, Any]:
        """What every flow line carries in the log."""
        return {
            "flow_id": self.flow_id,
            "request": self.flow.name,
            "line_index": index,
            "machine": self.place.machine,
        }

    def scrub(self, text: str) -> str:
        """``text`` with the values of this flow's secrets masked."""
        if not self.flow.secrets:
            return text
        return scrub(text, secret_values(self.context, self.flow.secrets))


# -- the state's changes: lines, "next", stopping -------------------------------------------


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
        machine=state.place.machine,
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


def stop(state: FlowState, why: str) -> None:
    """Nobody waits for this flow here any more (``why``): its next move fails fast."""
    if not state.stopped:
        state.stopped = why


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
    index = state.current
    duration = time.perf_counter() - state._t0
    state.steps.append((index, state._rendered, state.place.machine, state._wall, duration))
    if tracing.enabled():
        state.trace = tracing.record(
            state.trace, state.flow.lines[index].text, state.fields(index), state._wall, duration
        )
    state.current = -1


def merge(state: FlowState, updates: Mapping[str, Any]) -> None:
    """Inline code logged the line the flow waits for here, with ``updates``."""
    state.context.update(updates)


def inline_next(state: FlowState, updates: Mapping[str, Any]) -> int:
    """Inline code (not a handler) logged ``"next"``: merge ``updates``, end the open line;
    returns the line that follows, which the caller carries the flow on to at once."""
    state.context.update(updates)
    following = state.current + 1
    close_line(state)
    return following


def note_next(state: FlowState, updates: Mapping[str, Any]) -> None:
    """A handler logged ``"next"``: merge ``updates``; the hand-off is when it returns."""
    state.context.update(updates)
    state.nexted = True


def note_inline_line(state: FlowState, updates: Mapping[str, Any]) -> None:
    """A handler, having logged ``"next"``, logged the following line itself."""
    state.context.update(updates)
    close_line(state)
    state.nexted = False


def emit(state: FlowState, index: int) -> None:
    """Log line ``index`` as the runtime reaches it."""
    rendered = open_line(state, index)
    _log.info(  # state.fields(index), without building a dict to unpack on every line
        Rendered(rendered),
        flow_id=state.flow_id,
        request=state.flow.name,
        line_index=index,
        machine=state.place.machine,
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
        machine=state.place.machine,
        line=state.flow.lines[index].text,
        line_index=index,
        error_type=error_type,
        detail=state.scrub(str(exc)),
    )


def _timeout(state: FlowState, index: int) -> FlowTimeout:
    flow = state.flow
    me = state.place.machine
    if state.stopped:
        why = f"was stopped on {me} before line {index} {flow.lines[index].text!r}: {state.stopped}"
    else:
        why = f"passed its deadline on {me} before line {index} {flow.lines[index].text!r}"
    return FlowTimeout(
        f"{flow.name} {why}",
        request=flow.name,
        flow_id=state.flow_id,
        machine=me,
        line_index=index,
    )


# -- handlers ---------------------------------------------------------------------------

_async_handlers: dict[Handler, bool] = {}


def is_async(fn: Handler) -> bool:
    """Whether ``fn`` is an ``async def`` handler (asked once per handler)."""
    known = _async_handlers.get(fn)
    if known is None:
        known = _async_handlers[fn] = inspect.iscoroutinefunction(fn)
    return known


def _begin_handler(state: FlowState, index: int) -> None:
    emit(state, index)
    state.in_handler = True
    state.nexted = False
    state.ran_handler = True


def _end_handler(state: FlowState, fn: Handler) -> None:
    state.in_handler = False
    if not state.nexted:
        raise FlowViolation(
            f'handler {describe(fn)} returned without logging "next"'
            f" for line {state.current} {state.flow.lines[state.current].text!r}"
        )
    state.nexted = False
    close_line(state)


def _handler_failed(state: FlowState, index: int, fn: Handler, exc: BaseException) -> MeshError:
    """Log a step's failure where it ran, with the traceback; the originator gets the
    one-line FlowError. SystemExit and KeyboardInterrupt too: raised in a worker thread
    they would end no process, only leave the call without a reply until its deadline;
    in node.start or inline code, a step's failure is the flow's, not the program's."""
    state.in_handler = False
    line = state.current if state.current >= 0 else index
    message = state.scrub(f"{type(exc).__name__}: {exc}")
    if tracing.enabled():
        start = state._wall or time.time()
        state.trace = tracing.record(
            state.trace,
            state.flow.lines[line].text,
            state.fields(line),
            start,
            max(time.time() - start, 0.0),
            error=message,
        )
    _log.error(
        "mesh.step_failed", handler=describe(fn), error=message, exc_info=exc, **state.fields(line)
    )
    return fail_step(state, line, exc)


def run_handler(state: FlowState, index: int, fn: Handler) -> None:
    """Run a line's handler; its "next" (and any inline lines after it) end the step."""
    _begin_handler(state, index)
    try:
        fn(state.context)
        _end_handler(state, fn)
    except BaseException as exc:
        if state.tx is not None:
            _rollback(state)
        raise _handler_failed(state, index, fn, exc) from exc
    if state.tx is not None:
        _commit_step(state)


def _commit_step(state: FlowState) -> None:
    """A handler wrote in its step's transaction (mesh.step_transaction): the step's
    progress record joins those writes, and both commit now, in this thread."""
    conn, state.tx = state.tx, None
    try:
        state.journal.progress_in(
            conn,
            state.flow_id,
            state.stay,
            state.steps[-1][0] + 1,
            dump_context(state.context),
            _unrecorded(state),
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    state.tx_done = True


def _rollback(state: FlowState) -> None:
    conn, state.tx = state.tx, None
    with contextlib.suppress(Exception):
        conn.execute("ROLLBACK")


def _unrecorded(state: FlowState) -> list[LocalStep]:
    """The lines run here since the last journal record (they go into the next)."""
    steps = state.steps
    new = [s for s in steps[state.recorded :] if type(s) is tuple]
    state.recorded = len(steps)
    state.ran_handler = False
    return new


async def run_handler_async(state: FlowState, index: int, fn: Handler) -> None:
    """:func:`run_handler` for an ``async def`` handler, on the event loop."""
    _begin_handler(state, index)
    try:
        await fn(state.context)  # type: ignore[misc]
        _end_handler(state, fn)
    except asyncio.CancelledError:
        state.in_handler = False
        if state.tx is not None:
            _rollback(state)
        raise  # the flow was stopped here: the caller of the loop says so
    except BaseException as exc:
        if state.tx is not None:
            _rollback(state)
        raise _handler_failed(state, index, fn, exc) from exc
    if state.tx is not None:
        _commit_step(state)


async def _async_handler_from_thread(state: FlowState, index: int, fn: Handler) -> None:
    """An ``async def`` handler reached by a flow driven in a blocking thread: it runs on
    the node's loop, in a task of its own, which gets the flow's bindings first."""
    activate(state, index)
    await run_handler_async(state, index, fn)


async def _in_worker(place: Place, state: FlowState, index: int, fn: Handler) -> None:
    """A synchronous handler, on a worker thread, in a copy of this task's context; what
    it bound there (structlog's context variables, its own) comes back into the task, so
    the flow's next handler here sees it, as it would if both ran in one thread. (The
    task's own context cannot be lent to the thread: a task that is cancelled meanwhile
    wakes up in it.)"""
    variables = contextvars.copy_context()
    ran = place.run_in_worker(variables, run_handler, state, index, fn)
    # The handler cannot be stopped (its future refuses to be cancelled), so if the flow
    # is stopped here meanwhile (runtime.stop cancels its task) the flow still waits for
    # the handler to return; its next move then fails, naming the line it did not run.
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    try:
        await ran
    except asyncio.CancelledError:
        if task is None or not asyncio.isfuture(ran) or not ran.done() or ran.cancelled():
            raise
        while task.cancelling() > cancelling:
            task.uncancel()
        ran.result()  # the handler's own failure, if it failed
    for var, value in variables.items():
        if var.get(_UNSET) is not value:
            var.set(value)


_UNSET: Final = object()


# -- the loop ---------------------------------------------------------------------------


def _decide(state: FlowState, index: int) -> Decision:
    decision = route(state.flow, state.place.machine, index, state.via)
    if decision is not DONE and state.remaining() <= 0:
        raise _timeout(state, index)
    return decision


def _call_failed(state: FlowState, index: int, exc: ContextError) -> MeshError:
    """A call that could not be made because of the context: a step further down that
    failed is already a FlowError; the caller's own arguments (line 0) are theirs to fix,
    at the call; otherwise the line before it, which put the value there, failed."""
    if isinstance(exc, FlowError) or index == 0:
        return exc
    return fail_step(state, index - 1, exc)


def advance(
    state: FlowState,
    index: int,
    *,
    inline: bool = False,
    pending: tuple[str, bytes] | None = None,
) -> Outcome:
    """Carry the flow on from line ``index`` until it leaves this machine or ends,
    blocking this thread (``node.start`` and inline code).

    ``inline`` is set when inline code logged "next" itself: a local line with no
    handler then waits for that code to log it, instead of passing through.
    ``pending``: a durable flow's call for line ``index`` that was in flight when its
    process died, (machine, bytes): sent again, unchanged, before anything else.
    Raises the MeshError of a failed step, refused call or passed deadline.
    """
    place = state.place
    me = place.machine
    handlers = place.handlers_of(state.flow)
    controlled = state.flow.controlled
    while True:
        if pending is not None:
            machine, payload = pending
            pending = None
            answer = place.call(machine, payload, state.deadline, "", patient=_patient(state))
            back = absorb(state, machine, index, answer)
            if back is None:
                return FINISHED
            if back.machine == me:
                index = back.index
                continue
            return back
        if controlled:  # conditions, fan-out, sub-flows: mesh/control.py
            control = controller()

            index = control.skip(state, index)
            line = state.flow.lines[index] if index < len(state.flow.lines) else None
            if line is not None and (line.sub or line.each is not None):
                decision = _decide(state, index)
                ran = True
                if type(decision) is RunHere:
                    place.run_on_loop(control.run_row_from_thread(state, index))
                elif type(decision) is Call and line.each is not None:
                    place.run_on_loop(_fan_out_from_thread(state, index, decision.machine))
                else:
                    ran = False
                if ran:
                    index += 1
                    if state.journal is not None:  # a durable flow goes on after the row
                        _checkpoint(state, index).result()
                    continue
        decision = _decide(state, index)
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
            if state.unaccepted is not None:  # accepted before any handler runs
                state.journal.accept(_take_accept(state)).result()
            if is_async(fn):
                place.run_on_loop(_async_handler_from_thread(state, index, fn))
            else:
                run_handler(state, index, fn)
            index = state.steps[-1][0] + 1  # the handler's last line (LocalStep)
            if state.journal is not None:
                _checkpoint(state, index).result()
        elif type(decision) is Call:
            machine = decision.machine
            try:
                payload = request_bytes(state, machine, index)
            except ContextError as exc:
                raise _call_failed(state, index, exc) from exc
            if state.journal is not None:
                _record_call(state, index, machine, payload).result()
            answer = place.call(
                machine,
                payload,
                state.deadline,
                tracing.traceparent(state.trace),
                patient=_patient(state),
            )
            back = absorb(state, machine, index, answer)
            if back is None:
                return FINISHED
            if back.machine == me:
                index = back.index
                continue
            return back
        elif type(decision) is HandBack:
            return HandOff(decision.machine, decision.index)
        else:
            return FINISHED


async def advance_async(
    state: FlowState, index: int, *, pending: tuple[str, bytes] | None = None
) -> Outcome:
    """:func:`advance` on the node's event loop: a peer serving a call, ``start_async``."""
    place = state.place
    me = place.machine
    handlers = place.handlers_of(state.flow)
    controlled = state.flow.controlled
    while True:
        if pending is not None:
            machine, payload = pending
            pending = None
            answer = await place.call_async(
                machine, payload, state.deadline, "", patient=_patient(state)
            )
            back = absorb(state, machine, index, answer)
            if back is None:
                return FINISHED
            if back.machine == me:
                index = back.index
                continue
            return back
        if controlled:  # conditions, fan-out, sub-flows: mesh/control.py
            control = controller()

            index = control.skip(state, index)
            line = state.flow.lines[index] if index < len(state.flow.lines) else None
            if line is not None and (line.sub or line.each is not None):
                decision = _decide(state, index)
                ran = True
                if type(decision) is RunHere:
                    await control.run_row(state, index)
                elif type(decision) is Call and line.each is not None:
                    await control.fan_out(state, index, decision.machine)
                else:
                    ran = False
                if ran:
                    index += 1
                    if state.journal is not None:  # a durable flow goes on after the row
                        await asyncio.wrap_future(_checkpoint(state, index))
                    continue
        decision = _decide(state, index)
        if type(decision) is RunHere:
            fn = handlers[index]
            if fn is None:
                emit(state, index)
                close_line(state)
                index += 1
                continue
            if state.unaccepted is not None:  # accepted before any handler runs
                await state.journal.accept_async(_take_accept(state))
            if is_async(fn):
                await run_handler_async(state, index, fn)
            else:
                await _in_worker(place, state, index, fn)
            index = state.steps[-1][0] + 1
            if state.journal is not None:
                await _checkpoint_async(state, index)
        elif type(decision) is Call:
            machine = decision.machine
            try:
                payload = request_bytes(state, machine, index)
            except ContextError as exc:
                raise _call_failed(state, index, exc) from exc
            if state.journal is not None:
                await state.journal.progress_async(
                    state.flow_id,
                    state.stay,
                    index,
                    b"",  # the call's bytes hold the context (Stay.last_context)
                    payload,
                    machine,
                    _unrecorded(state),
                    first=_take_accept(state),
                )
            answer = await place.call_async(
                machine,
                payload,
                state.deadline,
                tracing.traceparent(state.trace),
                patient=_patient(state),
            )
            back = absorb(state, machine, index, answer)
            if back is None:
                return FINISHED
            if back.machine == me:
                index = back.index
                continue
            return back
        elif type(decision) is HandBack:
            return HandOff(decision.machine, decision.index)
        else:
            return FINISHED


async def _fan_out_from_thread(state: FlowState, index: int, machine: str) -> None:
    control = controller()

    activate(state, index)
    await control.fan_out(state, index, machine)


# -- the journal of a durable flow (mesh/journal.py) ------------------------------------

_NOTHING: concurrent.futures.Future[int] = concurrent.futures.Future()
_NOTHING.set_result(0)


def _patient(state: FlowState) -> str:
    """The flow id when the flow is durable (its calls wait for a machine that is down)."""
    return state.flow_id if state.journal is not None else ""


def _checkpoint(state: FlowState, index: int) -> concurrent.futures.Future[int]:
    """After a step of a durable flow: record that it goes on here at line ``index``, with
    its context, when it does; a call or the stay's end is recorded as such instead."""
    if state.tx_done:  # the handler's own transaction recorded it
        state.tx_done = False
        return _NOTHING
    if type(route(state.flow, state.place.machine, index, state.via)) is not RunHere:
        return _NOTHING
    return state.journal.progress(  # type: ignore[no-any-return]
        state.flow_id,
        state.stay,
        index,
        dump_context(state.context),
        None,
        None,
        _unrecorded(state),
    )


async def _checkpoint_async(state: FlowState, index: int) -> None:
    """:func:`_checkpoint` on the node's event loop."""
    if state.tx_done:
        state.tx_done = False
        return
    if type(route(state.flow, state.place.machine, index, state.via)) is not RunHere:
        return
    await state.journal.progress_async(
        state.flow_id,
        state.stay,
        index,
        dump_context(state.context),
        None,
        None,
        _unrecorded(state),
    )


def _record_call(
    state: FlowState, index: int, machine: str, payload: bytes
) -> concurrent.futures.Future[int]:
    """Before a durable flow's call leaves: its bytes, to send again after a crash."""
    return state.journal.progress(  # type: ignore[no-any-return]
        state.flow_id,
        state.stay,
        index,
        b"",  # the call's bytes hold the context (Stay.last_context)
        payload,
        machine,
        _unrecorded(state),
        first=_take_accept(state),
    )


# -- calls to other machines: the request out, the answer in ----------------------------

#: Bytes of a ContinueRequest that are not its context, at most, for a quick size check.
_NOT_CONTEXT = 64 * 1024


def request_bytes(state: FlowState, machine: str, index: int) -> bytes:
    """The serialized call for line ``index`` on ``machine``; ContextError when the context
    cannot travel, or would make the call larger than this machine's limit."""
    flow = state.flow
    context = dump_context(state.context)
    request = _pb2.ContinueRequest(
        request=flow.name,
        line_index=index,
        context=context,
        flow_id=state.flow_id,
        digest=flow.digest,
        via=(*state.via, state.place.machine),
    )
    limit = state.place.max_message_bytes
    if len(context) + _NOT_CONTEXT > limit and request.ByteSize() > limit:
        # Refused here, not as a cryptic RESOURCE_EXHAUSTED from the receiver.
        raise ContextError(
            f"{flow.name} context is {len(context):,} bytes of JSON; the call to {machine}"
            f" would be {request.ByteSize():,} bytes, over the {limit:,}-byte limit"
            " (max_message_bytes in mesh.toml)"
        )
    return request.SerializeToString()  # type: ignore[no-any-return]


def absorb(state: FlowState, machine: str, index: int, answer: Answer) -> HandOff | None:
    """What the call for line ``index`` on ``machine`` came back with, into ``state``.

    Returns None when the flow is done, or where it must go on; merges the context
    and the remote steps. Raises MeshError otherwise: the failure the reply reports,
    the call's own (unreachable, refused, timed out), or a PeerRefused for a reply no
    honest peer sends (see :func:`misrouted`).
    """
    if answer.code is not grpc.StatusCode.OK:
        raise _call_error(state, machine, index, answer)
    raw = answer.reply
    try:
        reply = _pb2.ContinueReply.FromString(raw)
    except DecodeError:
        raise _refused(
            state, machine, index, "sent a reply that is not a mesh.v1.ContinueReply"
        ) from None
    outcome = reply.WhichOneof("outcome")
    flow = state.flow
    if outcome == "failed":
        # The steps go on without this outcome: this machine will reply with its own.
        state.steps.append(steps_only(reply) if state.inbound else reply.steps)
        raise failure_to_error(
            reply.failed,
            request=flow.name,
            flow_id=state.flow_id,
            lines=tuple(line.text for line in flow.lines),
        )
    if outcome is None:
        raise _refused(state, machine, index, "sent a reply with no outcome")
    problem = misrouted(state, index, reply)
    if problem:
        raise _refused(state, machine, index, problem)
    if outcome == "done":
        if state.inbound:  # a peer in the chain: the reply goes up as it came
            state.steps.append(raw)
            state.done_below = True
            return None
        context_bytes = reply.done.context
    else:
        context_bytes = reply.hand_off.context
    try:
        loaded = load_context(context_bytes)
    except ValueError as exc:
        raise _refused(
            state, machine, index, f"sent back a context that cannot be used: {exc}"
        ) from None
    state.context = loaded
    if outcome == "done":
        state.steps.append(reply.steps)  # decoded only here (wire.as_steps)
        return None
    state.steps.append(steps_only(reply) if state.inbound else reply.steps)
    return HandOff(reply.hand_off.machine, reply.hand_off.line_index)


def misrouted(state: FlowState, index: int, reply: _pb2.ContinueReply) -> str | None:
    """Why a done or hand-off ``reply`` to the call for line ``index`` is one no honest peer
    sends, in words, or None when it is what the flow file says.

    Below the call, the flow runs on machines that are not upstream of it, until the first
    line after ``index`` that this machine or one upstream (``via``) owns: the flow comes back
    exactly there, as a hand-off to that line and that machine, and it is done only if no
    such line is left. The reply's steps must run from ``index`` to the line before. So a
    peer cannot send the flow back to a line run already (line 0 again and again), past the
    end, to a line the flow file gives another machine, or say "done" with lines not run.
    Checking costs the lines between, which the chain below ran anyway; the steps are
    decoded already, and only the first and the last are read.
    """
    if state.flow.controlled:
        return _misrouted_on_some_path(state, index, reply)
    lines = state.flow.lines
    me = state.place.machine
    via = state.via
    back = index + 1
    while back < len(lines) and lines[back].machine != me and lines[back].machine not in via:
        back += 1
    flow = state.flow.name
    if reply.WhichOneof("outcome") == "hand_off":
        hand_off = reply.hand_off
        line, owner = hand_off.line_index, hand_off.machine
        if owner != me and owner not in via:
            return f"handed {flow} line {line} back to {_shown(owner)}, which is not upstream of it"
        if line != back:
            expected = (
                f"line {back} ({lines[back].machine}) is the next line upstream"
                if back < len(lines)
                else "no line upstream is left (the flow ends below)"
            )
            return f"handed {flow} line {line} back to {_shown(owner)}, but {expected}"
        if owner != lines[back].machine:
            return (
                f"handed {flow} line {line} back to {_shown(owner)}, but the flow file gives"
                f" it to {lines[back].machine}"
            )
    elif back < len(lines):
        return (
            f"said {flow} is done, but line {back} {lines[back].text!r} is next and runs on"
            f" {lines[back].machine}, upstream of it"
        )
    steps = reply.steps
    first = steps[0].line_index if steps else None
    last = steps[-1].line_index if steps else None
    if first != index or last != back - 1:
        ran = f"lines {first} to {last}" if steps else "no line"
        return (
            f"replied for {flow} lines {index} to {back - 1} with steps that ran {ran}"
            f" (a {'hand-off' if back < len(lines) else 'done'} to line {back})"
        )
    return None


def _misrouted_on_some_path(state: FlowState, index: int, reply: _pb2.ContinueReply) -> str | None:
    """:func:`misrouted` for a flow with conditions: the flow may come back at any line
    some path allows (``mesh.routing.back_lines``), and the steps of its own request
    (skipped rows included; a sub-flow's steps name theirs) must run from ``index`` to
    the line before."""
    lines = state.flow.lines
    me = state.place.machine
    flow = state.flow.name
    allowed = back_lines(state.flow, me, index, state.via)
    if reply.WhichOneof("outcome") == "hand_off":
        hand_off = reply.hand_off
        back, owner = hand_off.line_index, hand_off.machine
        if back not in allowed or back >= len(lines) or owner != lines[back].machine:
            return (
                f"handed {flow} line {back} back to {_shown(owner)}, which no path of the flow"
                f" file allows after line {index}"
            )
    else:
        back = len(lines)
        if back not in allowed:
            return f"said {flow} is done, but a line upstream of it is still to run"
    own = [s.line_index for s in reply.steps if not s.request]
    if not own or own[0] != index or own[-1] != back - 1:
        ran = f"lines {own[0]} to {own[-1]}" if own else "no line"
        return f"replied for {flow} lines {index} to {back - 1} with steps that ran {ran}"
    return None


def _shown(name: str) -> str:
    """A machine name from a reply, quoted and cut when it is not a plain short name."""
    return name if len(name) <= 60 and name.isprintable() and name else repr(name[:60])


def _where(flow: Flow, index: int) -> str:
    return f"{flow.name} line {index} {flow.lines[index].text!r}"


def _fields(machine: str, state: FlowState, index: int) -> dict[str, Any]:
    """The keyword arguments of a PeerError about ``machine`` but its address, for this flow
    and line."""
    return {
        "machine": machine,
        "request": state.flow.name,
        "flow_id": state.flow_id,
        "line_index": index,
    }


def _refused(state: FlowState, machine: str, index: int, problem: str) -> PeerRefused:
    """A reply no honest peer sends: the flow fails here, naming the peer that sent it."""
    address = state.place.address_of(machine)
    message = state.scrub(f"{machine} at {address} {problem} ({_where(state.flow, index)})")
    _log.warning(
        "mesh.reply_refused",
        peer=machine,
        reason=message,
        flow_id=state.flow_id,
        request=state.flow.name,
        line_index=index,
    )
    return PeerRefused(message, address=address, **_fields(machine, state, index))


#: gRPC's words when a message is over a limit (either side): the size, then the limit.
_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


def _call_error(state: FlowState, machine: str, index: int, answer: Answer) -> MeshError:
    """The MeshError for a call that came back with no reply (``answer.code`` says why)."""
    code = answer.code
    details = state.scrub(answer.message or code.name)
    address = answer.address or state.place.address_of(machine)
    flow = state.flow
    where = _where(flow, index)
    fields = _fields(machine, state, index)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return FlowTimeout(
            f"{flow.name} timed out waiting for {machine} ({address}) at line {index}"
            f" {flow.lines[index].text!r}",
            request=flow.name,
            flow_id=state.flow_id,
            machine=machine,
            line_index=index,
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        hint = state.place.unavailable_hint(machine, details)
        return PeerUnavailable(
            f"{machine} is unavailable at {address} (for {where}): {details}{hint}",
            address=address,
            **fields,
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AccessDenied(
            f"{machine} at {address} refused {where}: {details} ({code.name})",
            address=address,
            **fields,
        )
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        sizes = _TOO_LARGE.search(details)
        if sizes is not None:
            size, limit = int(sizes.group(1)), int(sizes.group(2))
            return PeerRefused(
                f"{machine} at {address}: a message for {where} was {size:,} bytes, over"
                f" a {limit:,}-byte limit (max_message_bytes in mesh.toml must be the same on"
                " every machine)",
                address=address,
                **fields,
            )
        return PeerRefused(
            f"{machine} at {address} is busy (for {where}): {details}",
            address=address,
            **fields,
        )
    return PeerRefused(
        f"{machine} at {address} refused {where}: {details} ({code.name})",
        address=address,
        **fields,
    )


# -- whole flows: originated here, or served for a caller -------------------------------


def _result(state: FlowState) -> FlowResult:
    return FlowResult(
        state.flow.name, state.flow_id, state.context, as_steps(state.steps), state.flow.secrets
    )


def originate(state: FlowState) -> FlowResult:
    """Run a flow started here from its line 0, blocking this thread (``node.start``)."""
    activate(state)
    try:
        if state.journal is not None:
            state.unaccepted = _origin_stay(state)
        advance(state, 0)
    except MeshError as exc:
        if state.journal is not None:
            _finish_origin(state, exc).result()
        raise
    finally:
        finish(state)
    if state.journal is not None:
        implied = _implied(state)
        _settled(implied, _finish_origin(state, None))
    return _result(state)


async def originate_async(state: FlowState) -> FlowResult:
    """:func:`originate` on the node's event loop (``node.start_async``), in a task of its
    own context: it sets the flow's log bindings there."""
    activate(state)
    try:
        if state.journal is not None:
            state.unaccepted = _origin_stay(state)
        await advance_async(state, 0)
    except MeshError as exc:
        if state.journal is not None:
            await _finish_origin(state, exc, on_loop=True)
        raise
    finally:
        finish(state)
    if state.journal is not None:
        implied = _implied(state)
        await _settled_async(implied, _finish_origin(state, None, on_loop=True))
    return _result(state)


async def resume_origin(state: FlowState, position: int, pending: tuple[str, bytes] | None) -> None:
    """Go on with a durable flow started here by a process that died: from its last record
    (``position``, or the call ``pending`` then), to its result in the journal."""
    activate(state, position)
    try:
        await advance_async(state, position, pending=pending)
    except MeshError as exc:
        await _finish_origin(state, exc, on_loop=True)
        _log.warning("mesh.flow_failed", error=str(exc), **state.fields(max(state.current, 0)))
        return
    finally:
        finish(state)
    implied = _implied(state)
    await _settled_async(implied, _finish_origin(state, None, on_loop=True))


def _implied(state: FlowState) -> bool:
    """Whether the stay's successful end follows from its records already: no handler ran
    since the last one, so a recovery from it (pass-through lines, the same call resent
    and answered from the journal below) ends the same way, running nothing twice. Its
    end record then goes with the next commit instead of being waited for."""
    return not state.ran_handler


def _settled(implied: bool, record: concurrent.futures.Future[int]) -> None:
    """Wait for the end record of a flow, unless it is ``implied`` (:func:`_implied`)."""
    if not implied:
        record.result()
    else:
        record.add_done_callback(_log_failed_record)


async def _settled_async(implied: bool, record: asyncio.Future[int]) -> None:
    """:func:`_settled` on the event loop."""
    if not implied:
        await record
    else:
        record.add_done_callback(_log_failed_record)


def _log_failed_record(record: Any) -> None:
    if not record.cancelled() and record.exception() is not None:
        _log.warning("mesh.journal_write_failed", error=str(record.exception()))


def _origin_stay(state: FlowState) -> Any:
    """The accept record of a flow started here (mesh.journal.Stay)."""
    from mesh.journal import RUNNING, Stay  # noqa: PLC0415 - durable flows only

    now = time.time()
    return Stay(
        flow_id=state.flow_id,
        line=0,
        request=state.flow.name,
        digest=state.flow.digest,
        sender="",
        origin=True,
        fingerprint=None,
        payload=None,
        context=dump_context(state.context),
        position=0,
        call=None,
        call_machine=None,
        state=RUNNING,
        outcome=None,
        error=None,
        deadline=now + max(state.remaining(), 0.0),
        owner=state.journal.owner,
        started=now,
        updated=now,
    )


def _take_accept(state: FlowState) -> Any:
    """The accept record still to write (it goes with the record being made), or None."""
    stay, state.unaccepted = state.unaccepted, None
    return stay


def _finish_origin(state: FlowState, exc: MeshError | None, *, on_loop: bool = False) -> Any:
    """Record a durable flow's result where it started: its final context and timeline,
    or the failure, as a ContinueReply (``node.result`` reads it back)."""
    from mesh.journal import DONE, FAILED  # noqa: PLC0415 - durable flows only

    if exc is not None:
        failure = error_to_failure(exc, machine=state.machine, line_index=max(state.current, 0))
        reply = _pb2.ContinueReply(failed=failure)
        status, error = FAILED, str(exc)
    else:
        reply = _pb2.ContinueReply(done={"context": dump_context(state.context)})
        status, error = DONE, None
    for step in as_steps(state.steps):
        reply.steps.add(
            line_index=step.index,
            line=step.line,
            machine=step.machine,
            start=step.start,
            duration=step.duration,
        )
    record = state.journal.finish_async if on_loop else state.journal.finish
    return record(
        state.flow_id,
        0,
        status,
        reply.SerializeToString(),
        error,
        None,
        _unrecorded(state),
        first=_take_accept(state),
    )


@dataclass(slots=True)
class Journaled:
    """A call of a durable request a peer serves: its journal, the call's fingerprint and
    bytes (for the accept record), or the stay to go on from (recovery) and the lines it
    had run (``steps``)."""

    journal: Any
    fingerprint: bytes
    payload: bytes
    resume: Any = None  # mesh.journal.Stay
    steps: list[Any] = field(default_factory=list)


async def serve(
    place: Place,
    request: _pb2.ContinueRequest,
    context: dict[str, Any],
    deadline: float,
    *,
    traceparent: str = "",
    started: Callable[[FlowState], None] | None = None,
    journaled: Journaled | None = None,
    flow: Flow | None = None,
) -> bytes:
    """A peer's whole handling of one admitted call: run ``request``'s line, and what
    follows here, until the flow leaves this machine; the serialized reply.

    No exception escapes but ``CancelledError`` (the call was given up, the flow stopped
    waiting below: the peer answers nobody): a failure is a ``Failure`` in the reply.
    ``started`` gets the flow's state, for a peer to :func:`stop` it when nobody waits
    any more. ``journaled``: the request is durable; the stay is recorded as accepted
    before it runs and its reply before it is returned (or, with ``resume``, it goes on
    from its last record). ``flow``: the version of the request the call is for, when it
    is not the config's (a flow that started on an earlier flow file). Run it as a task in
    a fresh ``contextvars.Context``: it makes the flow current there.
    """
    index = request.line_index
    state = FlowState(
        place,
        flow or place.flows.flows[request.request],
        request.flow_id,
        context,
        deadline,
        tuple(request.via),
        inbound=True,
        trace=tracing.parent_from(traceparent),
    )
    if started is not None:
        started(state)
    activate(state, index)
    if journaled is None:
        reply, _ = await _serve(state, index, None)
        return reply
    state.journal = journaled.journal
    state.stay = index
    pending = None
    position = index
    try:
        resume = journaled.resume
        if resume is None and not await _accept(state, request, journaled):
            # The journal knows this stay: a previous process of this machine ran it (or
            # began to). The very call that ran it gets its reply again; nothing runs.
            resume = state.journal.stay(state.flow_id, index)
            known = _known_stay(state, request, journaled, resume)
            if known is not None:
                return known
            journaled.steps = state.journal.local_steps(state.flow_id, index)
        if resume is not None:
            state.steps = list(journaled.steps)
            state.recorded = len(state.steps)
            position = resume.position
            if resume.call is not None and resume.call_machine:
                pending = (resume.call_machine, resume.call)
    except MeshError as exc:  # the journal cannot record it: the step does not run
        failure = error_to_failure(exc, machine=state.machine, line_index=index)
        return _pb2.ContinueReply(failed=failure).SerializeToString()  # type: ignore[no-any-return]
    reply, error = await _serve(state, position, pending)
    if error is None:
        implied = _implied(state)
        await _settled_async(implied, _finish_stay(state, reply, error))
    else:
        await _finish_stay(state, reply, error)
    return reply


def _known_stay(
    state: FlowState, request: _pb2.ContinueRequest, journaled: Journaled, stay: Any
) -> bytes | None:
    """The reply to a call whose stay the journal had already, or None when it is to go
    on from its record (it was running when its process died)."""
    if stay is None or stay.state == "running":
        return None
    flow = state.flow
    if stay.fingerprint != journaled.fingerprint:
        failure = _pb2.Failure(
            kind=_pb2.Failure.REFUSED,
            machine=state.machine,
            line_index=request.line_index,
            error_type="PeerRefused",
            message=f"{state.machine}: flow id {state.flow_id} is in use here by another call;"
            " a new flow needs a new flow id, and a retry must repeat its call exactly",
        )
        return _pb2.ContinueReply(failed=failure).SerializeToString()  # type: ignore[no-any-return]
    _log.info(
        "mesh.step_repeated",
        caller=request.via[-1] if request.via else "caller",
        journaled=True,
        **state.fields(request.line_index),
    )
    if stay.outcome is None:
        return stopped_reply(state.place, request, f"the flow was {stay.state} ({flow.name})")
    return stay.outcome  # type: ignore[no-any-return]


def _accept(
    state: FlowState, request: _pb2.ContinueRequest, journaled: Journaled
) -> asyncio.Future[int]:
    from mesh.journal import RUNNING, Stay  # noqa: PLC0415 - durable flows only

    now = time.time()
    return state.journal.accept_async(  # type: ignore[no-any-return]
        Stay(
            flow_id=state.flow_id,
            line=request.line_index,
            request=request.request,
            digest=request.digest,
            sender=request.via[-1] if request.via else "",
            origin=False,
            fingerprint=journaled.fingerprint,
            payload=journaled.payload,
            context=request.context or b"{}",
            position=request.line_index,
            call=None,
            call_machine=None,
            state=RUNNING,
            outcome=None,
            error=None,
            deadline=now + max(state.remaining(), 0.0),
            owner=state.journal.owner,
            started=now,
            updated=now,
        )
    )


def _finish_stay(state: FlowState, reply: bytes, error: str | None) -> asyncio.Future[int]:
    from mesh.journal import DONE, FAILED, StepRow  # noqa: PLC0415 - durable flows only

    failed = None
    if error is not None and state.current >= 0:
        failed = StepRow(
            state.flow_id,
            state.stay,
            state.current,
            state.machine,
            state._rendered,
            "failed",
            state._wall or time.time(),
            0.0,
            error,
        )
    # The context is the reply's (a done or hand-off): not written twice.
    return state.journal.finish_async(  # type: ignore[no-any-return]
        state.flow_id,
        state.stay,
        DONE if error is None else FAILED,
        reply,
        error,
        None,
        _unrecorded(state),
        failed,
    )


async def _serve(
    state: FlowState, index: int, pending: tuple[str, bytes] | None
) -> tuple[bytes, str | None]:
    """Run the flow here from ``index``: the reply, and the failure's message if it failed."""
    try:
        outcome: Outcome
        if state.flow.controlled and "[" in state.flow_id:
            control = controller()

            if control.element_of(state.flow_id, index) is not None:  # one run of a fan-out
                outcome = await control.serve_element(state, index)
            else:
                outcome = await advance_async(state, index, pending=pending)
        else:
            outcome = await advance_async(state, index, pending=pending)
    except MeshError as exc:
        if isinstance(exc, FlowTimeout) and exc.machine == state.machine:
            # The flow stops here: say so where it happened, not only at the originator.
            _log.warning(
                "mesh.flow_expired",
                cause=_cause(state),
                reason=str(exc),
                **state.fields(exc.line_index),
            )
        failure = error_to_failure(exc, machine=state.machine, line_index=max(state.current, index))
        return encode_reply(_pb2.ContinueReply(failed=failure), state.steps), failure.message
    except asyncio.CancelledError:
        stop(state, "cancelled")
        _log.warning(
            "mesh.flow_expired",
            cause=_cause(state),
            reason=f"{state.flow.name} stopped on {state.machine} waiting for the machine"
            f" it called: {_cause(state)}",
            **state.fields(max(state.current, index)),
        )
        raise
    except BaseException as exc:  # a bug of ours: say so rather than hang the chain
        _log.exception("mesh.internal_error", **state.fields(index))
        failure = _pb2.Failure(
            kind=_pb2.Failure.STEP,
            machine=state.machine,
            line_index=max(state.current, index),
            error_type=type(exc).__name__,
            message=state.scrub(f"internal error on {state.machine}: {exc}"),
        )
        return encode_reply(_pb2.ContinueReply(failed=failure), state.steps), failure.message
    if outcome is FINISHED and state.done_below:
        # The reply from below says so, context included.
        return encode_reply(None, state.steps), None
    try:
        dumped = dump_context(state.context)
    except ContextError as exc:
        # A handler put a value JSON cannot carry straight into the dict, behind "next"'s
        # back: fail the last line run here, naming the key, rather than the whole call.
        failed = _unsendable(state, index, exc)
        return encode_reply(failed, state.steps), failed.failed.message
    if outcome is FINISHED:
        return encode_reply(_pb2.ContinueReply(done={"context": dumped}), state.steps), None
    assert isinstance(outcome, HandOff)
    hand_off = {"machine": outcome.machine, "line_index": outcome.index, "context": dumped}
    # Sub-messages as dicts: upb builds them faster than from message objects.
    return encode_reply(_pb2.ContinueReply(hand_off=hand_off), state.steps), None


def _cause(state: FlowState) -> str:
    """Why a flow stopped here early: its deadline, when that passed first; else what
    :func:`stop` was told (its caller gave up on it, or went away)."""
    if time.monotonic() >= state.deadline or not state.stopped:
        return "deadline passed"
    return state.stopped


def _unsendable(state: FlowState, index: int, exc: ContextError) -> _pb2.ContinueReply:
    """The reply for a flow whose context cannot travel on: its last step here failed."""
    ran = [s for s in state.steps if type(s) is tuple]
    line = ran[-1][0] if ran else index
    error = fail_step(state, line, exc)
    _log.error("mesh.step_failed", error=str(error), **state.fields(line))
    return _pb2.ContinueReply(failed=error_to_failure(error))


def stopped_reply(place: Place, request: _pb2.ContinueRequest, why: str) -> bytes:
    """The reply to a call this peer gives up on while its step may be running (a stop
    past ``grace``): a failure that says so, which no caller sends anywhere else."""
    flow = place.flows.flows[request.request]
    index = request.line_index
    failure = _pb2.Failure(
        kind=_pb2.Failure.UNAVAILABLE,
        machine=place.machine,
        line_index=index,
        error_type="PeerUnavailable",
        message=f"{place.machine} ({place.address_of(place.machine)}) stopped while running"
        f" {_where(flow, index)}: {why}; the step may have run, so it was not retried",
    )
    return _pb2.ContinueReply(failed=failure).SerializeToString()  # type: ignore[no-any-return]
