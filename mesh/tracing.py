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
(the W3C ``traceparent`` travels with the call: a field of its link frame, or the
gRPC metadata of a unary ``Continue``). Line 0's parent is the
span active where the flow was started, if any, so a flow joins the trace of
the web request or job that started it.

Spans are recorded when a line ends, with the line's own start time and
duration, so the hooks cost nothing while a handler runs. The parent of a flow's
next line travels with the flow's state (``FlowState.trace``), not in a context
variable: a flow's lines run on the event loop, on worker threads and in the
caller's thread, one after another.
"""

# OpenTelemetry is imported inside the hooks, and only once the application has
# imported it: that is the point of this module.
# ruff: noqa: PLC0415

from __future__ import annotations

import sys
from typing import Any

__all__ = ["enabled", "open_span", "parent_from", "record", "started_here", "traceparent"]

_API = "opentelemetry.trace"
TRACER = "mesh"

_tracer: Any = None


def enabled() -> bool:
    """Whether this process traces: the application has imported OpenTelemetry."""
    return _API in sys.modules


def started_here() -> Any:
    """The parent of line 0 of a flow started now: the span active here, if tracing."""
    if _API not in sys.modules:
        return None
    from opentelemetry import context as otel_context

    return otel_context.get_current()


def record(
    parent: Any,
    name: str,
    attributes: dict[str, Any],
    start: float,
    duration: float,
    *,
    error: str = "",
) -> Any:
    """Record one line's span under ``parent``; returns the parent of the flow's next line
    here (this span). ``start`` is wall-clock seconds; ``error``, secrets scrubbed, marks
    a step that raised. A no-op (returning ``parent``) when tracing is off."""
    api = sys.modules.get(_API)
    if api is None:
        return parent
    global _tracer
    tracer = _tracer
    if tracer is None:
        # Made once: a tracer taken before the application sets its provider is
        # OpenTelemetry's proxy, which follows the provider set later.
        tracer = _tracer = api.get_tracer(TRACER)
    if parent is None:
        from opentelemetry import context as otel_context

        parent = otel_context.get_current()
    start_ns = int(start * 1e9)
    span = tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=start_ns + int(duration * 1e9))
    return api.set_span_in_context(api.NonRecordingSpan(span.get_span_context()))


def traceparent(parent: Any) -> str:
    """The W3C ``traceparent`` of ``parent``, for the next machine; "" when tracing is off."""
    if _API not in sys.modules:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=parent)
    return carrier.get("traceparent", "")


def parent_from(value: str) -> Any:
    """On a peer: the caller's line, from the ``traceparent`` it sent, as our parent."""
    if not value or _API not in sys.modules:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": value})


def open_span(parent: Any, name: str, attributes: dict[str, Any], start: float) -> tuple[Any, Any]:
    """Start a span that other lines nest under before it ends (a sub-flow's row: its
    lines are its children); ``(span, context for the children)``, ``(None, parent)``
    when tracing is off. End it with ``span.end()``."""
    api = sys.modules.get(_API)
    if api is None:
        return None, parent
    global _tracer
    if _tracer is None:
        _tracer = api.get_tracer(TRACER)
    if parent is None:
        from opentelemetry import context as otel_context

        parent = otel_context.get_current()
    span = _tracer.start_span(
        name, context=parent, start_time=int(start * 1e9), attributes=attributes
    )
    return span, api.set_span_in_context(span, parent)


def close_span(span: Any, error: str = "") -> None:
    """End a span :func:`open_span` started (``error``: the step failed), once."""
    if span is None or not span.is_recording():
        return
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
