"""OpenTelemetry tracing: each flow one trace, each line a span on the machine that ran it.

Tracing is on in a process exactly when that process has imported
OpenTelemetry's API, that is when the application set OpenTelemetry up (the
``structlog-mesh[otel]`` extra brings the API and SDK). The mesh itself never imports
it: every hook here first looks ``opentelemetry.trace`` up in ``sys.modules``,
one dict lookup, and does nothing when it is not there. So a mesh without the
extra, or an application that does not use it, loads nothing of OpenTelemetry.
With the API but no SDK ``TracerProvider`` configured, spans are the API's
non-recording ones.

A span is named by its line's template (``Testing password for :username``,
never a rendered value) and carries ``flow_id``, ``request``, ``line_index``
and ``machine``; a step that raised gets an ERROR status with the exception's
type and its message, secrets scrubbed. Spans nest in flow order: a line's
parent is the line before it on this machine in this call, and the first line
a peer runs in a call is the child of the caller's line that handed the flow on
(the W3C ``traceparent`` travels in the gRPC metadata). Line 0's parent is the
span active where the flow was started, if any, so a flow joins the trace of
the web request or job that started it.

Spans are recorded when a line ends, with the line's own start time and
duration, so the hooks cost nothing while a handler runs.
"""

# OpenTelemetry is imported inside the hooks, and only once the application has
# imported it: that is the point of this module.
# ruff: noqa: PLC0415

from __future__ import annotations

import sys
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from mesh.runtime import FlowState, LocalStep

__all__ = ["adopt", "outgoing", "step", "step_failed"]

_API = "opentelemetry.trace"
TRACER = "mesh"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

#: (flow_id, the OpenTelemetry context whose span is the parent of that flow's
#: next line here). Keyed by flow so a new inline flow in the same thread does
#: not hang under the last flow's line.
_parent: ContextVar[tuple[str, Any] | None] = ContextVar("mesh_trace_parent", default=None)
_tracer: Any = None


def _parent_context(flow_id: str) -> Any:
    held = _parent.get()
    if held is not None and held[0] == flow_id:
        return held[1]
    from opentelemetry import context as otel_context

    return otel_context.get_current()


def _record(
    api: Any, state: FlowState, index: int, times: tuple[float, float], error: str = ""
) -> None:
    """Record line ``index``'s span: ``times`` is (wall-clock start, duration) in seconds."""
    start, duration = times
    global _tracer
    flow = state.flow
    tracer = _tracer
    if tracer is None:
        # Made once: a tracer taken before the application sets its provider is
        # OpenTelemetry's proxy, which follows the provider set later.
        tracer = _tracer = api.get_tracer(TRACER)
    start_ns = int(start * 1e9)
    span = tracer.start_span(
        flow.lines[index].text,
        context=_parent_context(state.flow_id),
        start_time=start_ns,
        attributes={
            "flow_id": state.flow_id,
            "request": flow.name,
            "line_index": index,
            "machine": state.node.machine,
        },
    )
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=start_ns + int(duration * 1e9))
    context = api.set_span_in_context(api.NonRecordingSpan(span.get_span_context()))
    _parent.set((state.flow_id, context))


def step(state: FlowState, done: LocalStep) -> None:
    """A line ended on this machine: record its span (no-op when tracing is off)."""
    api = sys.modules.get(_API)
    if api is not None:
        index, _text, _machine, start, duration = done
        _record(api, state, index, (start, duration))


def step_failed(state: FlowState, index: int, exc: BaseException) -> None:
    """A line's handler raised: record its span with an ERROR status."""
    api = sys.modules.get(_API)
    if api is None:
        return
    # The line was opened by runtime.open_line, which noted its wall-clock start.
    start = state._wall or time.time()
    duration = max(time.time() - start, 0.0)
    error = state.scrub(f"{type(exc).__name__}: {exc}")
    _record(api, state, index, (start, duration), error)


def outgoing(state: FlowState) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the trace context to the next machine; None when off."""
    if _API not in sys.modules:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=_parent_context(state.flow_id))
    return tuple(carrier.items()) or None


def adopt(state: FlowState, call: grpc.ServicerContext) -> None:
    """On a peer: make the caller's line, from the call's metadata, the parent of ours."""
    if _API not in sys.modules:
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {
        key: value
        for key, value in call.invocation_metadata() or ()
        if key in (TRACEPARENT, TRACESTATE) and isinstance(value, str)
    }
    if carrier:
        _parent.set((state.flow_id, TraceContextTextMapPropagator().extract(carrier)))
