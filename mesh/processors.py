"""The structlog processors: routing flow lines and ``"next"``, masking secrets.

:data:`processor` goes first in the chain, before ``merge_contextvars``, so what
``"next"`` merges into the flow context is the event's own data (its keyword
arguments and the logger's bound values), never ambient context variables.
An event that is neither a flow line nor ``"next"`` costs one set lookup.
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

from mesh.errors import FlowViolation, MeshError
from mesh.masking import MASK, scrub_fields, secret_values
from mesh.registry import describe
from mesh.runtime import (
    FINISHED,
    FlowState,
    Place,
    Rendered,
    activate,
    advance,
    close_line,
    current,
    finish,
    inline_next,
    merge,
    note_inline_line,
    note_next,
    open_line,
)
from mesh.wire import check_values

# The processor routes for "places": a machine of a mesh in this process, which is
# what a mesh.node.Node is (a protocol in mesh/runtime.py, so no import of the node).
Node = Place

EventDict = MutableMapping[str, Any]

NEXT = "next"

# Derived from the nodes installed in this process (mesh.connect() installs each; its
# close() uninstalls it): the events worth a second look, the flow lines of all of
# them and "next", and the node inline flows start on, the latest installed. Module
# globals, so the hot path is one global lookup.
_watched: frozenset[Any] = frozenset()
_node: Node | None = None
_installed: tuple[Node, ...] = ()  # oldest first; replaced, never changed in place
_installing = threading.Lock()
_log = structlog.get_logger("mesh")


def install(node: Node) -> None:
    """Route flow lines for ``node``, and make it the one inline flows start on.

    Several nodes may be installed (a process embedding a peer that also originates
    as another machine); each stays routed until it is uninstalled itself.
    """
    global _installed
    with _installing:
        _installed = (*(n for n in _installed if n is not node), node)
        _derive()


def uninstall(node: Node) -> None:
    """Stop routing for ``node``; the nodes still installed keep theirs."""
    global _installed
    with _installing:
        _installed = tuple(n for n in _installed if n is not node)
        _derive()


def _derive() -> None:
    global _watched, _node
    _node = _installed[-1] if _installed else None
    texts: set[Any] = {NEXT} if _installed else set()
    for node in _installed:
        texts.update(node.flows.texts)
    _watched = frozenset(texts)


def default_node() -> Node | None:
    return _node


def _node_for(event: str) -> Node | None:
    """The node an event logged outside any flow belongs to: the latest installed that
    has the line (nodes of different configs may share a process), else the default."""
    if event != NEXT:
        for node in reversed(_installed):
            if event in node.flows.texts:
                return node
    return _node


def processor(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """Route flow lines and ``"next"``; every other event passes untouched.

    A plain function rather than a callable object: it runs for every event the
    application logs, and a function call costs half as much.
    """
    event = event_dict.get("event")
    try:
        if event not in _watched:
            return event_dict
    except TypeError:  # an unhashable event: not ours
        return event_dict
    if type(event) is Rendered:
        return event_dict
    if event == NEXT:
        state = current.get()
        if state is not None and state.in_handler and not state.nexted and not state.done:
            # The common case, once per hop: a handler hands its line on.
            note_next(state, _updates(event_dict))
            raise structlog.DropEvent
    return _flow_event(str(event), event_dict)


def _flow_event(event: str, event_dict: EventDict) -> EventDict:
    state = current.get()
    node = state.place if state is not None else _node_for(event)
    if node is None:
        return event_dict
    if event == NEXT:
        _on_next(state, node, event_dict)
        raise structlog.DropEvent
    return _on_line(state, node, event, event_dict)


def _violation(node: Node, message: str, event_dict: EventDict) -> EventDict:
    """Raise FlowViolation, or (``strict = false``) warn and let the event through."""
    if node.strict:
        raise FlowViolation(message)
    _log.warning("mesh.flow_violation", problem=message)
    return event_dict


def _updates(event_dict: EventDict) -> dict[str, Any]:
    updates = dict(event_dict)
    del updates["event"]
    check_values(updates)
    return updates


def _on_next(state: FlowState | None, node: Node, event_dict: EventDict) -> None:
    if state is None or state.done:
        _violation(node, '"next" logged while no flow is active', event_dict)
        return
    flow = state.flow
    if state.in_handler:  # and "next" was logged already: processor() takes the first
        _violation(
            node,
            f'"next" logged twice for {flow.name} line {state.current}'
            f" {flow.lines[state.current].text!r}",
            event_dict,
        )
        return
    if state.current < 0:
        expected = flow.lines[state.awaiting].text if state.awaiting >= 0 else "?"
        _violation(
            node,
            f'"next" logged but {flow.name} line {state.awaiting} {expected!r} was not logged',
            event_dict,
        )
        return
    # Inline code at top level: carry out the hand-off now, until the flow
    # comes back to a line this code logs itself, or is done.
    following = inline_next(state, _updates(event_dict))
    try:
        outcome = advance(state, following, inline=True)
    except MeshError:
        finish(state)
        raise
    if outcome is FINISHED:
        finish(state)


def _start_inline(node: Node, request: str, event_dict: EventDict) -> EventDict:
    flow = node.flows[request]
    owner = flow.lines[0].machine
    if owner != node.machine:
        return _violation(
            node,
            f"{request} line 0 {flow.lines[0].text!r} runs on {owner}, not on {node.machine};"
            f" use node.start({request!r}) to send it there",
            event_dict,
        )
    state = node.new_state(flow, _updates(event_dict))
    activate(state)
    return _open(state, 0, event_dict)


def _open(state: FlowState, index: int, event_dict: EventDict) -> EventDict:
    """Turn the user's own log event into the flow line it stands for."""
    rendered = open_line(state, index)
    event_dict["event"] = rendered
    for key in state.flow.secrets:
        if key in event_dict:
            event_dict[key] = MASK
    event_dict.update(state.fields(index))
    return event_dict


def _on_line(state: FlowState | None, node: Node, text: str, event_dict: EventDict) -> EventDict:
    flows = node.flows
    if state is None or state.done:
        openers = flows.openers(text)
        if len(openers) == 1:
            return _start_inline(node, openers[0], event_dict)
        if openers:
            return _violation(
                node,
                f"{text!r} opens several requests ({', '.join(openers)}), so logging it cannot"
                " start a flow; use node.start(REQUEST)",
                event_dict,
            )
        where = ", ".join(f"{ln.request} line {ln.index}" for ln in flows.lines_with(text))
        return _violation(
            node,
            f"{text!r} is {where}, but no flow is active; a flow starts at its line 0",
            event_dict,
        )
    flow = state.flow
    lines = flow.lines
    if state.in_handler:
        # A handler logging the line after its own, having logged "next".
        following = state.current + 1
        if (
            state.nexted
            and following < len(lines)
            and lines[following].text == text
            and lines[following].machine == node.machine
            and node.handlers[flow.name][following] is None
        ):
            note_inline_line(state, _updates(event_dict))
            return _open(state, following, event_dict)
        return _violation(node, _in_handler_problem(state, node, text), event_dict)
    if state.awaiting >= 0 and lines[state.awaiting].text == text:
        merge(state, _updates(event_dict))
        return _open(state, state.awaiting, event_dict)
    openers = flows.openers(text)
    if len(openers) == 1:
        if state.current == len(lines) - 1:
            # The earlier flow was at its last line: only its final "next" is
            # missing, and nothing is left to run. It is complete, not abandoned.
            close_line(state)
        else:
            # An earlier flow never finished (its code raised or returned early):
            # start afresh rather than poison the thread.
            _log.warning(
                "mesh.flow_abandoned",
                abandoned=state.flow_id,
                at_line=max(state.current, state.awaiting),
                request=flow.name,
            )
        finish(state)
        return _start_inline(node, openers[0], event_dict)
    expected = state.awaiting if state.awaiting >= 0 else state.current + 1
    return _violation(node, _expected(state, text, expected), event_dict)


def _in_handler_problem(state: FlowState, node: Node, text: str) -> str:
    """Why a handler may not log ``text`` now, in the terms of the flow file."""
    flow = state.flow
    following = state.current + 1
    if following < len(flow.lines) and flow.lines[following].text == text:
        line = flow.lines[following]
        if not state.nexted:
            return (
                f'{flow.name} line {following} {text!r} logged before "next" for line'
                f" {state.current} {flow.lines[state.current].text!r}"
            )
        if line.machine != node.machine:
            return (
                f"{flow.name} line {following} {text!r} runs on {line.machine}, not"
                f" {node.machine}; it is called when this handler returns"
            )
        fn = node.handlers[flow.name][following]
        return (
            f"{flow.name} line {following} {text!r} has its own handler,"
            f" {describe(fn) if fn else '?'}; it runs when this handler returns"
        )
    return _expected(state, text, following)


def _expected(state: FlowState, text: str, expected: int) -> str:
    flow = state.flow
    if state.current >= 0 and not state.nexted:
        want = f'"next" for line {state.current} {flow.lines[state.current].text!r}'
    elif expected < len(flow.lines):
        want = f"line {expected} {flow.lines[expected].text!r}"
    else:
        want = "nothing more (the flow has ended)"
    return f"{flow.name} flow {state.flow_id} expected {want}, but {text!r} was logged"


def mask_secrets(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """Mask the active flow's secrets: their keys, and their values inside text.

    Put it after ``merge_contextvars`` (so values bound in context variables are
    masked too) and before the renderer. While a flow with secrets is active it
    renders ``exc_info`` itself, so a traceback cannot show a secret either.
    """
    state = current.get()
    if state is None or not state.flow.secrets:
        return event_dict
    if "exc_info" in event_dict:
        # A traceback rendered later would show the exception's message unmasked.
        event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
    for key in state.flow.secrets:
        if key in event_dict:
            event_dict[key] = MASK
    values = secret_values(state.context, state.flow.secrets)  # once per event, not per field
    if values:
        scrub_fields(event_dict, values)  # keys and values, in every form they are shown
    return event_dict
