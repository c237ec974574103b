"""Conversions between Python values and the protobuf messages of ``mesh.v1``.

The context travels as JSON bytes, not ``google.protobuf.Struct``, so an int
stays an int. Errors travel as a ``Failure`` message and are rebuilt into the
same ``MeshError`` class at the originator, whichever machine raised them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
    plain = True
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ContextError(f"context key {key!r} is not a string")
        if type(value) not in _PLAIN:
            plain = False
    if plain:
        return
    try:  # one encoding of the whole, not one per list or dict in it
        _encoder.encode(dict(updates))
    except (TypeError, ValueError) as exc:
        for key, value in updates.items():
            check_value(key, value)  # names the key
        raise ContextError(f"the context is not JSON-serializable ({exc})") from None


def dump_context(context: Mapping[str, Any]) -> bytes:
    """Encode the context for the wire, naming the bad key if one cannot travel."""
    try:
        return _encoder.encode(context).encode()
    except (TypeError, ValueError):
        check_values(context)
        raise


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (the mesh never sends it)")


#: One decoder for every context: json.loads builds a new one per call when given options.
_decoder = json.JSONDecoder(parse_constant=_no_constant)


def load_context(data: bytes) -> dict[str, Any]:
    """Decode a context from the wire; ValueError unless it is a JSON object.

    Stricter than ``json.loads``: NaN and Infinity, which the mesh never sends and could not
    send on, and nesting too deep to decode are ValueErrors too, not a crash later.
    """
    try:
        if not data:
            value = {}
        elif data[:1] == b"{":  # what dump_context sends: UTF-8 without a BOM
            value = _decoder.decode(data.decode("utf-8", "surrogatepass"))
        else:  # json.loads works out other encodings, and says what else is wrong
            value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("context is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"context is a JSON {type(value).__name__}, not an object")
    return value


def encode_reply(outcome: _pb2.ContinueReply | None, steps: Sequence[Any]) -> bytes:
    """A peer's reply as sent: the timeline, then ``outcome`` (None: a reply from below
    that ended the flow carries it already, as the last part of ``steps``).

    Steps run here are (index, line, machine, start, duration) tuples; what a call
    downstream reported is that call's reply as received, bytes. Those bytes are
    passed on as they are: protobuf reads concatenated messages as one, repeated
    fields appended in order and the last ``outcome`` winning, so a peer neither
    decodes nor copies the steps below it, and a chain of N hops encodes N steps
    instead of N*(N+1)/2.
    """
    last = -1  # where the last reply from below is: the steps after it go with the outcome
    for i, s in enumerate(steps):
        if type(s) is not tuple:
            last = i
    parts: list[bytes] = []
    message = None
    for s in steps[: last + 1]:
        if type(s) is tuple:
            if message is None:
                message = _pb2.ContinueReply()
            _add_step(message, s)
        else:
            if message is not None:
                parts.append(message.SerializeToString())
                message = None
            parts.append(s)
    if message is not None:
        parts.append(message.SerializeToString())
    trailing = steps[last + 1 :]
    if outcome is not None or trailing:
        tail = outcome if outcome is not None else _pb2.ContinueReply()
        for s in trailing:
            _add_step(tail, s)
        parts.append(tail.SerializeToString())
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _add_step(reply: _pb2.ContinueReply, s: tuple[int, str, str, float, float]) -> None:
    # Field by field: several times cheaper than a Step message passed to the constructor.
    reply.steps.add(line_index=s[0], line=s[1], machine=s[2], start=s[3], duration=s[4])


def steps_only(reply: _pb2.ContinueReply) -> bytes:
    """The steps of ``reply`` without its outcome, to go on under an outcome of our own."""
    return _pb2.ContinueReply(steps=reply.steps).SerializeToString()  # type: ignore[no-any-return]


def as_steps(steps: Iterable[Any]) -> tuple[Step, ...]:
    """The timeline as Step values, from what :func:`encode_reply` takes, or the steps
    field of a reply (the originator's dialer has the reply decoded already)."""
    out: list[Step] = []
    for s in steps:
        if type(s) is tuple:
            out.append(Step(*s))
            continue
        field = _pb2.ContinueReply.FromString(s).steps if isinstance(s, bytes) else s
        out.extend(Step(m.line_index, m.line, m.machine, m.start, m.duration) for m in field)
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
