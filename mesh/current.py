"""The flow a handler runs in, as a plain value: no structlog context variables to dig in.

A handler gets the flow's context as its argument; which flow, which line and which machine
it is running are read here. :func:`current_flow` only reads the runtime's state (the
``mesh.runtime.current`` context variable), so it costs a lookup and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh import runtime
from mesh.errors import MeshError

__all__ = ["CurrentFlow", "current_flow"]


@dataclass(frozen=True, slots=True)
class CurrentFlow:
    """Where a flow is: its id, its request, the line running and the machine running it."""

    flow_id: str
    request: str
    #: The line being run (from 0), as in the flow file's rows of ``request``.
    line_index: int
    #: That line's Log text as the flow file has it (placeholders unrendered).
    line: str
    machine: str


def current_flow() -> CurrentFlow:
    """The flow active in this context: in a handler, or in inline code between its lines.

    Raises :class:`~mesh.MeshError` outside a flow (no flow started here, or it is done).
    """
    state = runtime.current.get()
    if state is None or state.done:
        raise MeshError(
            "no flow is active here: mesh.current_flow() works in a handler,"
            " or in inline code between a flow's lines"
        )
    # Between lines of an inline flow no line is open: the one expected next is where it is.
    index = state.current if state.current >= 0 else state.awaiting
    if index < 0:
        raise MeshError(f"flow {state.flow_id} of {state.flow.name} is between lines here")
    return CurrentFlow(
        flow_id=state.flow_id,
        request=state.flow.name,
        line_index=index,
        line=state.flow.lines[index].text,
        machine=state.machine,
    )
