"""Running the flow file's control flow: skipped rows, fan-out (``Each``), sub-flows (``@``).

The runtime's loop (mesh/runtime.py) carries a flow from line to line; for a flow whose
file has conditions, fan-out or sub-flows it asks this module at three points:

* before routing a line, :func:`skip` moves past the rows whose condition does not hold
  (or whose list is empty), logging each as ``mesh.line_skipped`` where the flow is:
  the choice costs no message, and no machine off the chosen path hears of it;
* a row of this machine with ``Each`` or ``@REQUEST`` runs through :func:`run_row`; an
  ``Each`` row of another machine (not upstream) through :func:`fan_out`, which calls it
  once per element, concurrently (``max_fan_out`` at once), on whichever replica is free;
* a peer serving one element's run of a row (:func:`element_of` its flow id) runs that
  row once and replies with what it changed (:func:`serve_element`).

Scopes. Every run of a row for an element, and every sub-flow, is its own call chain
under the flow's id: a sub-flow run by row ``i`` of the flow ``F`` is ``F/i``, element
``k`` of row ``i`` is ``F/i[k]``. So a peer's reply record (keyed by flow id and line)
tells every run apart, a log line says which run it belongs to (``mesh logs`` groups
them under ``F``), and the nesting depth of sub-flows is the count of plain segments.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from mesh import routing, runtime, tracing
from mesh.errors import FlowError, FlowTimeout, MeshError
from mesh.loggers import BoundOnce
from mesh.v1 import mesh_pb2 as _pb2
from mesh.wire import as_steps, failure_to_error, load_context

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FAN_OUT",
    "depth",
    "element_of",
    "fan_out",
    "root",
    "run_row",
    "run_row_from_thread",
    "serve_element",
    "skip",
]

_log = BoundOnce("mesh")

DEFAULT_MAX_DEPTH = 16
DEFAULT_MAX_FAN_OUT = 32

#: The keys an element's run sees besides the flow's context; not part of its results.
ELEMENT_KEYS = ("item", "index")

_ELEMENT = re.compile(r"/(\d+)\[(\d+)\]\Z")


# -- scopes ---------------------------------------------------------------------------------


def root(flow_id: str) -> str:
    """The id of the flow a scoped run belongs to (``F`` of ``F/3[7]/1``)."""
    return flow_id.split("/", 1)[0]


def depth(flow_id: str) -> int:
    """How many sub-flows deep a scoped run is (element scopes do not count)."""
    return sum(1 for part in flow_id.split("/")[1:] if not part.endswith("]"))


def element_of(flow_id: str, index: int) -> int | None:
    """The element position when ``flow_id`` names one run of line ``index`` (a fan-out's
    call), else None."""
    if "[" not in flow_id:
        return None
    m = _ELEMENT.search(flow_id)
    if m is None or int(m.group(1)) != index:
        return None
    return int(m.group(2))


def _limits(place: runtime.Place) -> tuple[int, int]:
    config = getattr(place, "config", None)
    return (
        getattr(config, "max_depth", DEFAULT_MAX_DEPTH),
        getattr(config, "max_fan_out", DEFAULT_MAX_FAN_OUT),
    )


# -- skipping -------------------------------------------------------------------------------


def skip(state: runtime.FlowState, index: int) -> int:
    """Move past the rows from ``index`` on that do not run with the flow's context: each
    is logged as ``mesh.line_skipped`` (with its condition) and is a skipped step of the
    timeline. Returns the line to go on at (``len(lines)``: none is left)."""
    flow = state.flow
    lines = flow.lines
    if index >= len(lines) or (lines[index].when is None and lines[index].each is None):
        return index  # an unconditional row runs: the common case, without a walk
    following, skipped = routing.next_line(flow, index, state.context)
    for i in skipped:
        line = flow.lines[i]
        if line.when is not None and not line.when.holds(state.context):
            why = {"condition": line.when.text}
        else:
            assert line.each is not None
            why = {"each": line.each.key, "reason": f"{line.each.key} is empty"}
        rendered = state.scrub(flow.render(i, state.context))
        _log.info("mesh.line_skipped", line=rendered, **why, **state.fields(i))
        state.steps.append((i, rendered, state.machine, time.time(), 0.0, "", None, True))
    return following


# -- one row, run here ------------------------------------------------------------------------


async def run_row(state: runtime.FlowState, index: int) -> None:
    """Run this machine's row ``index`` that has ``Each`` or is a sub-flow row."""
    if state.flow.lines[index].each is not None:
        await fan_out(state, index, None)
    else:
        await _sub_flow(state, index)


async def run_row_from_thread(state: runtime.FlowState, index: int) -> None:
    """:func:`run_row` for a flow driven by a blocking thread (``node.start``): on the
    node's loop, in a task that gets the flow's log bindings first."""
    runtime.activate(state, index)
    await run_row(state, index)


async def _once(state: runtime.FlowState, index: int) -> None:
    """Row ``index`` run once here: its handler (or its pass-through), or its sub-flow."""
    flow = state.flow
    if flow.lines[index].sub:
        await _sub_flow(state, index)
        return
    fn = state.place.handlers_of(flow)[index]
    if fn is None:
        runtime.emit(state, index)
        runtime.close_line(state)
    elif runtime.is_async(fn):
        await runtime.run_handler_async(state, index, fn)
    else:
        await runtime._in_worker(state.place, state, index, fn)


class _Recording(dict[str, Any]):
    """A run's context that notes the keys written to it: ``"next"`` merges its updates
    with ``update``, a handler may set a key itself. So a run's result is exactly what it
    logged, even a value equal to the one the flow had."""

    __slots__ = ("written",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    def __setitem__(self, key: str, value: Any) -> None:
        self.written.add(key)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        other = dict(*args, **kwargs)
        self.written.update(other)
        super().update(other)


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a run logged with ``"next"`` (its result), ``item`` and ``index`` aside: the
    keys written to its context when it recorded them (a handler's row), else what
    differs from ``before`` (a sub-flow's final context, merged whole)."""
    written = after.written if isinstance(after, _Recording) else set()
    return {
        key: value
        for key, value in after.items()
        if key not in ELEMENT_KEYS and (key in written or key not in before or before[key] != value)
    }


def _recording(state: runtime.FlowState, index: int) -> None:
    """Record what the run of row ``index`` writes, when it is a handler's row."""
    if not state.flow.lines[index].sub:
        state.context = _Recording(state.context)


def _marked(steps: list[Any], request: str, element: int | None) -> list[tuple[Any, ...]]:
    """A child run's steps, as this flow's: each names its sub-flow's request and its
    element's position, unless a deeper run named its own already."""
    return [
        (
            s.index,
            s.line,
            s.machine,
            s.start,
            s.duration,
            s.request or request,
            element if s.element is None else s.element,
            s.skipped,
        )
        for s in as_steps(steps)
    ]


def _child(
    state: runtime.FlowState,
    flow_id: str,
    context: dict[str, Any],
    *,
    flow: Any = None,
    via: tuple[str, ...] | None = None,
) -> runtime.FlowState:
    return runtime.FlowState(
        state.place,
        state.flow if flow is None else flow,
        flow_id,
        context,
        state.deadline,
        state.via if via is None else via,
        trace=state.trace,
    )


# -- sub-flows ------------------------------------------------------------------------------


async def _sub_flow(state: runtime.FlowState, index: int) -> None:
    """Row ``index`` is ``@REQUEST``: run that request here from its line 0 with the flow's
    context, as a flow this machine starts (its own call chain), wait for it, merge its
    final context and go on. Its steps name its request, under this flow's id."""
    place = state.place
    flow = state.flow
    line = flow.lines[index]
    max_depth, _ = _limits(place)
    deeper = depth(state.flow_id) + 1
    if deeper > max_depth:
        error = _row_error(
            state,
            index,
            "RecursionError",
            f"{line.text} would run {line.sub!r} {deeper} sub-flows deep, over max_depth"
            f" {max_depth} (mesh.toml)",
        )
        _log.error("mesh.step_failed", error=str(error), **state.fields(index))
        raise error
    runtime.emit(state, index)
    # The row's span is open while the sub-flow runs: the sub-flow's lines are its children.
    span, inside = tracing.open_span(state.trace, line.text, state.fields(index), time.time())
    child = _child(
        state, f"{state.flow_id}/{index}", dict(state.context), flow=place.flows[line.sub], via=()
    )
    child.trace = inside

    async def run() -> None:
        runtime.activate(child, 0)
        await runtime.advance_async(child, 0)

    task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
    try:
        await task
    except asyncio.CancelledError:
        task.cancel()
        raise
    except MeshError as exc:
        state.steps.extend(_marked(child.steps, line.sub, None))
        failure = _wrapped(state, index, exc, "")
        tracing.close_span(span, str(failure))
        raise failure from exc
    finally:
        tracing.close_span(span)  # a no-op once closed
    state.context.update(child.context)
    # The row's step, by hand: runtime.close_line would record a second span for it.
    duration = time.perf_counter() - state._t0
    state.steps.append((index, state._rendered, state.machine, state._wall, duration))
    state.current = -1
    if span is not None:
        state.trace = inside  # the next line here is the row's child, as after any line
    state.steps.extend(_marked(child.steps, line.sub, None))


def _row_error(state: runtime.FlowState, index: int, error_type: str, detail: str) -> FlowError:
    flow = state.flow
    text = flow.lines[index].text
    return FlowError(
        state.scrub(
            f'{flow.name} line {index} "{text}" failed on {state.machine}: {error_type}: {detail}'
        ),
        request=flow.name,
        flow_id=state.flow_id,
        machine=state.machine,
        line=text,
        line_index=index,
        error_type=error_type,
    )


def _wrapped(state: runtime.FlowState, index: int, exc: MeshError, where: str) -> MeshError:
    """A run of row ``index`` failed with ``exc``: the row's own error, saying which run
    (``where``: "for element 7 of items") and what failed inside it."""
    flow = state.flow
    text = flow.lines[index].text
    machine = exc.machine if isinstance(exc, FlowError | FlowTimeout) else state.machine
    if isinstance(exc, FlowError) and exc.request == flow.name and exc.line_index == index:
        error_type = exc.error_type
        prefix = f"failed on {exc.machine}: {error_type}: "
        message = str(exc)
        detail = message.split(prefix, 1)[1] if prefix in message else message
    else:
        error_type = exc.error_type if isinstance(exc, FlowError) else type(exc).__name__
        detail = str(exc)
    message = (
        f'{flow.name} line {index} "{text}" failed on {machine}{where}: {error_type}: {detail}'
    )
    if isinstance(exc, FlowTimeout):
        return FlowTimeout(
            message, request=flow.name, flow_id=state.flow_id, machine=machine, line_index=index
        )
    return FlowError(
        state.scrub(message),
        request=flow.name,
        flow_id=state.flow_id,
        machine=machine,
        line=text,
        line_index=index,
        error_type=error_type,
    )


# -- fan-out --------------------------------------------------------------------------------


async def fan_out(state: runtime.FlowState, index: int, machine: str | None) -> None:
    """Row ``index`` has ``Each``: run it once per element of its list, concurrently (at most
    ``max_fan_out`` at once), here (``machine`` None) or as calls to ``machine``, which its
    links spread over its replicas. Each run sees ``item`` and ``index``; what each run's
    ``"next"`` changed goes, in order, into the row's results list. One failed run fails
    the row, naming its position (the first such position, once every run has ended)."""
    flow = state.flow
    line = flow.lines[index]
    each = line.each
    assert each is not None
    items = state.context.get(each.key)
    if not isinstance(items, list):
        raise _row_error(
            state,
            index,
            "TypeError",
            f"Each {each.key}: {each.key} is a {type(items).__name__}, not a list",
        )
    # How many runs the row has, so that a reader of the logs (mesh logs) can tell that
    # every one of them ran: each run logs the line under a flow id of its own.
    _log.info("mesh.fan_out", each=each.key, elements=len(items), **state.fields(index))
    _, bound = _limits(state.place)
    gate = asyncio.Semaphore(bound)
    loop = asyncio.get_running_loop()
    start = time.time()
    t0 = time.perf_counter()

    async def one(k: int, item: Any) -> tuple[dict[str, Any], list[Any]]:
        async with gate:
            context = dict(state.context)
            context["item"] = item
            context["index"] = k
            child = _child(state, f"{state.flow_id}/{index}[{k}]", context)
            if machine is None:
                _recording(child, index)
                try:
                    await _local_run(child, index)
                finally:
                    steps = _marked(child.steps, "", k)
                return _changes(state.context, child.context), steps
            return await _remote_run(state, child, index, machine, k)

    tasks = [
        loop.create_task(one(k, item), context=contextvars.copy_context())
        for k, item in enumerate(items)
    ]
    try:
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        raise
    results: list[Any] = []
    failed: tuple[int, BaseException] | None = None
    for k, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            if failed is None:
                failed = (k, outcome)
            results.append(None)
            continue
        changes, steps = outcome
        results.append(changes)
        state.steps.extend(steps)
    if failed is not None:
        k, exc = failed
        if not isinstance(exc, MeshError):
            raise exc
        raise _wrapped(state, index, exc, f" for element {k} of {each.key}") from exc
    state.context[each.results] = results
    if machine is not None and tracing.enabled():  # the row's own span, over its runs
        state.trace = tracing.record(
            state.trace, line.text, state.fields(index), start, time.perf_counter() - t0
        )


async def _local_run(child: runtime.FlowState, index: int) -> None:
    runtime.activate(child, index)
    await _once(child, index)


async def _remote_run(
    state: runtime.FlowState, child: runtime.FlowState, index: int, machine: str, k: int
) -> tuple[dict[str, Any], list[Any]]:
    """One element's run of row ``index`` as a call to ``machine``; its changes and steps."""
    place = state.place
    payload = runtime.request_bytes(child, machine, index)
    answer = await place.call_async(
        machine, payload, state.deadline, tracing.traceparent(state.trace)
    )
    if answer.code is not grpc.StatusCode.OK:
        raise runtime._call_error(child, machine, index, answer)
    try:
        reply = _pb2.ContinueReply.FromString(answer.reply)
    except DecodeError:
        raise runtime._refused(
            child, machine, index, "sent a reply that is not a mesh.v1.ContinueReply"
        ) from None
    outcome = reply.WhichOneof("outcome")
    if outcome == "failed":
        raise failure_to_error(
            reply.failed,
            request=state.flow.name,
            flow_id=child.flow_id,
            lines=tuple(ln.text for ln in state.flow.lines),
        )
    own = [s.line_index for s in reply.steps if not s.request]
    if outcome != "done" or not own or set(own) != {index}:
        raise runtime._refused(
            child,
            machine,
            index,
            f"answered element {k}'s run of line {index} with"
            f" {'a ' + outcome if outcome else 'no outcome'} and steps of lines {sorted(set(own))}",
        )
    try:
        changes = load_context(reply.done.context)
    except ValueError as exc:
        raise runtime._refused(
            child, machine, index, f"sent back a context that cannot be used: {exc}"
        ) from None
    return changes, _marked([reply.steps], "", k)


async def serve_element(state: runtime.FlowState, index: int) -> runtime._Finished:
    """A peer's side of one element's run: row ``index`` once, then the flow's context is
    what the run changed (the reply carries only that back)."""
    before = dict(state.context)
    _recording(state, index)
    await _once(state, index)
    state.context = _changes(before, state.context)
    return runtime.FINISHED


runtime.use_control(sys.modules[__name__])
