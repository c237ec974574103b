"""Conversions between Python values and the protobuf messages of ``mesh.v1``.

The context travels as JSON bytes, not ``google.protobuf.Struct``, so an int
stays an int. Errors travel as a ``Failure`` message and are rebuilt into the
same ``MeshError`` class at the originator, whichever machine raised them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

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
from mesh.result import Step
from mesh.v1 import mesh_pb2 as _pb2

#: The largest message a peer sends or accepts unless ``max_message_bytes`` says otherwise
#: (gRPC's own default). A context that would not fit fails at the sender, naming its size.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def message_options(limit: int) -> tuple[tuple[str, int], ...]:
    """gRPC options that make channels and servers send and accept ``limit`` bytes."""
    return (
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    )


_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


#: Types whose values always encode (a float may be NaN, which JSON lacks).
_PLAIN: frozenset[type] = frozenset({str, int, bool, type(None)})


def check_value(key: str, value: object) -> None:
    """Raise ContextError unless ``value`` can travel as JSON under ``key``."""
    if type(value) in _PLAIN:  # every "next" checks its values: skip the encoder for these
        return
    try:
        _encoder.encode(value)
    except (TypeError, ValueError) as exc:
        raise ContextError(
            f"context key {key!r}: {type(value).__name__} value is not JSON-serializable ({exc})"
        ) from None


def check_values(updates: Mapping[str, Any]) -> None:
    """Check every value of ``updates`` (keys must be strings too)."""
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ContextError(f"context key {key!r} is not a string")
        check_value(key, value)


def dump_context(context: Mapping[str, Any]) -> bytes:
    """Encode the context for the wire, naming the bad key if one cannot travel."""
    try:
        return _encoder.encode(context).encode()
    except (TypeError, ValueError):
        check_values(context)
        raise


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (the mesh never sends it)")


def load_context(data: bytes) -> dict[str, Any]:
    """Decode a context from the wire; ValueError unless it is a JSON object.

    Stricter than ``json.loads``: NaN and Infinity, which the mesh never sends and could not
    send on, and nesting too deep to decode are ValueErrors too, not a crash later.
    """
    try:
        value = json.loads(data, parse_constant=_no_constant) if data else {}
    except RecursionError:
        raise ValueError("context is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"context is a JSON {type(value).__name__}, not an object")
    return value


def add_steps(reply: _pb2.ContinueReply, steps: Iterable[Any]) -> _pb2.ContinueReply:
    """Put the timeline in ``reply``: steps run here are (index, line, machine, start,
    duration) tuples; the steps a call downstream reported are its reply's ``steps``,
    copied across whole.

    Decoding every downstream step into a Step and encoding it again at every level
    of the call chain cost each hop more the deeper the chain was; building the
    message field by field (``add``/``extend``) is also several times cheaper
    than passing a list of Step messages to the constructor.
    """
    into = reply.steps
    for s in steps:
        if type(s) is tuple:
            into.add(line_index=s[0], line=s[1], machine=s[2], start=s[3], duration=s[4])
        else:
            into.extend(s)
    return reply


def as_steps(steps: Iterable[Any]) -> tuple[Step, ...]:
    """The timeline as Step values, from what :func:`add_steps` takes."""
    out: list[Step] = []
    for s in steps:
        if type(s) is tuple:
            out.append(Step(*s))
        else:
            out.extend(Step(m.line_index, m.line, m.machine, m.start, m.duration) for m in s)
    return tuple(out)


class _StepViolation(FlowError, FlowViolation):
    """A step broke the flow's rules: catchable as FlowError and as FlowViolation."""


class _StepContextError(FlowError, ContextError):
    """A step put a value in the context that cannot travel."""


_STEP_CLASSES: dict[str, type[FlowError]] = {
    "FlowViolation": _StepViolation,
    "ContextError": _StepContextError,
}


def step_error(
    *,
    request: str,
    flow_id: str,
    machine: str,
    line: str,
    line_index: int,
    error_type: str,
    detail: str,
) -> FlowError:
    """The error the originator raises for a failed step, wherever the step ran."""
    cls = _STEP_CLASSES.get(error_type, FlowError)
    message = f'{request} line {line_index} "{line}" failed on {machine}: {error_type}: {detail}'
    return cls(
        message,
        request=request,
        flow_id=flow_id,
        machine=machine,
        line=line,
        line_index=line_index,
        error_type=error_type,
    )


def error_to_failure(exc: MeshError) -> _pb2.Failure:
    """Encode an error raised in this peer so the originator can raise it again."""
    F = _pb2.Failure
    if isinstance(exc, FlowError):
        return F(
            kind=F.STEP,
            machine=exc.machine,
            line_index=exc.line_index,
            error_type=exc.error_type,
            message=str(exc),
        )
    if isinstance(exc, FlowTimeout):
        return F(kind=F.TIMEOUT, machine=exc.machine, line_index=exc.line_index, message=str(exc))
    if isinstance(exc, PeerUnavailable):
        return F(kind=F.UNAVAILABLE, machine=exc.machine, address=exc.address, message=str(exc))
    if isinstance(exc, PeerRefused):
        return F(
            kind=F.REFUSED,
            machine=exc.machine,
            address=exc.address,
            error_type=type(exc).__name__,
            message=str(exc),
        )
    return F(kind=F.REFUSED, error_type=type(exc).__name__, message=str(exc))


def failure_to_error(
    failure: _pb2.Failure, *, request: str, flow_id: str, lines: tuple[str, ...]
) -> MeshError:
    """Rebuild the error a peer downstream reported; ``lines`` are the flow's texts."""
    F = _pb2.Failure
    index = failure.line_index
    if failure.kind == F.STEP:
        err = _STEP_CLASSES.get(failure.error_type, FlowError)
        line = lines[index] if index < len(lines) else "?"
        return err(
            failure.message,
            request=request,
            flow_id=flow_id,
            machine=failure.machine,
            line=line,
            line_index=index,
            error_type=failure.error_type,
        )
    if failure.kind == F.TIMEOUT:
        return FlowTimeout(
            failure.message,
            request=request,
            flow_id=flow_id,
            machine=failure.machine,
            line_index=index,
        )
    if failure.kind == F.UNAVAILABLE:
        return PeerUnavailable(failure.message, machine=failure.machine, address=failure.address)
    refused = AccessDenied if failure.error_type == "AccessDenied" else PeerRefused
    return refused(failure.message, machine=failure.machine, address=failure.address)
