"""Conversions between Python values and the protobuf messages of ``mesh.v1``.

The context travels as JSON bytes, not ``google.protobuf.Struct``, so an int
stays an int. Errors travel as a ``Failure`` message and are rebuilt into the
same ``MeshError`` class at the originator, whichever machine raised them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mesh.errors import (
    AccessDenied,
    ContextError,
    FlowError,
    FlowTimeout,
    FlowViolation,
    MeshError,
    PeerError,
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


#: Ints this small always print (Python refuses to print one of more than
#: ``sys.get_int_max_str_digits()`` digits, 4,300 by default): only larger ones are encoded
#: to be sure.
_SAFE_INT = 2**63


def _why(exc: BaseException) -> str:
    """Why a value cannot travel, in words (Python's own message, clearer where it is cryptic)."""
    if isinstance(exc, UnicodeEncodeError):
        bad = exc.object[exc.start : exc.start + 1]
        return f"it holds a lone surrogate {bad!r}, which UTF-8 cannot encode"
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    text = str(exc)
    if "integer string conversion" in text:
        return f"an int of more than {sys.get_int_max_str_digits():,} digits cannot be written"
    return text


def _travels(value: object) -> bool:
    """True when ``value`` certainly encodes, decided without encoding it (the common case)."""
    if type(value) is str:
        return value.isascii()
    if type(value) is int:
        return -_SAFE_INT < value < _SAFE_INT
    return type(value) is bool or value is None


def check_value(key: str, value: object) -> None:
    """Raise ContextError unless ``value`` can travel as JSON under ``key``: encodable, and
    as UTF-8 (no lone surrogate), with no NaN, infinity or int too long to print."""
    if _travels(value):  # every "next" checks its values: skip the encoder for these
        return
    try:
        _encoder.encode(value).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ContextError(
            f"context key {key!r}: {type(value).__name__} value is not JSON-serializable"
            f" ({_why(exc)})"
        ) from None


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise ContextError(f"context key {key!r} is not a string")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ContextError(f"context key {key!r} cannot travel as JSON ({_why(exc)})") from None


def check_values(updates: Mapping[str, Any]) -> None:
    """Check every key and value of ``updates``, as :func:`check_value` does."""
    plain = True
    for key, value in updates.items():
        if type(key) is not str or not key.isascii():
            _check_key(key)
        if plain and not _travels(value):
            plain = False
    if plain:
        return
    try:  # one encoding of the whole, not one per list or dict in it
        _encoder.encode(dict(updates)).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        for key, value in updates.items():
            check_value(key, value)  # names the key
        raise ContextError(f"the context is not JSON-serializable ({_why(exc)})") from None


def dump_context(context: Mapping[str, Any]) -> bytes:
    """Encode the context for the wire; ContextError naming the key if one cannot travel."""
    try:
        return _encoder.encode(context).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        check_values(context)
        raise ContextError(f"the context is not JSON-serializable ({_why(exc)})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (the mesh never sends it)")


class _Overflow(ValueError):
    """A JSON number too large for a float: it would decode as infinity."""


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _Overflow(f"the number {text[:20]} is too large for a float")
    return value


#: One decoder for every context: json.loads builds a new one per call when given options.
_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def load_context(data: bytes) -> dict[str, Any]:
    """Decode a context from the wire; ValueError unless it is a JSON object the mesh could
    send on as it is.

    Stricter than ``json.loads``: NaN and Infinity, numbers too large for a float, lone
    surrogates (escaped, or as bytes that are not UTF-8), and nesting too deep to decode are
    ValueErrors too, not a crash later when the context is encoded again.
    """
    text = ""
    try:
        if not data:
            value = {}
        elif data[:1] == b"{":  # what dump_context sends: UTF-8 without a BOM
            text = data.decode("utf-8")
            value = _decoder.decode(text)
        else:  # json.loads works out other encodings, and says what else is wrong
            value = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("context is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"context is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    except _Overflow as exc:
        if text:  # name the key: decode again letting the number be infinity, then check
            _check_loaded(json.loads(text, parse_constant=_no_constant))
        raise ValueError(str(exc)) from None
    if not isinstance(value, dict):
        raise ValueError(f"context is a JSON {type(value).__name__}, not an object")
    # A lone surrogate can only arrive escaped (\ud800-\udfff) or through json.loads'
    # own decoding of other encodings: look only then.
    if not text or b"\\ud" in data or b"\\uD" in data:
        _check_loaded(value)
    return value


def _check_loaded(value: Any) -> None:
    """ValueError naming the key of a decoded context that could not be encoded again."""
    if not isinstance(value, dict):
        return
    try:
        check_values(value)
    except ContextError as exc:
        raise ValueError(str(exc)) from None


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


def _add_step(reply: _pb2.ContinueReply, s: tuple[Any, ...]) -> None:
    # Field by field: several times cheaper than a Step message passed to the constructor.
    step = reply.steps.add(line_index=s[0], line=s[1], machine=s[2], start=s[3], duration=s[4])
    if len(s) > 5:  # a control-flow step: (..., request, element, skipped), as result.Step
        step.request = s[5]
        if s[6] is not None:
            step.element = s[6]
        step.skipped = s[7]


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
        field = _pb2.ContinueReply.FromString(s).steps if isinstance(s, bytes | memoryview) else s
        out.extend(
            Step(m.line_index, m.line, m.machine, m.start, m.duration)
            if not (m.request or m.skipped or m.HasField("element"))
            else Step(
                m.line_index,
                m.line,
                m.machine,
                m.start,
                m.duration,
                m.request,
                m.element if m.HasField("element") else None,
                m.skipped,
            )
            for m in field
        )
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


def error_to_failure(exc: MeshError, *, machine: str = "", line_index: int = 0) -> _pb2.Failure:
    """Encode an error raised in this peer so the originator can raise it again.

    Every field is filled for every kind: the machine, the line and the error's type name
    (the handler's exception's for a step; the mesh's own error class otherwise).
    ``machine`` and ``line_index`` stand in where the error does not say (an error of this
    peer's own, not a peer's further down).
    """
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
        return F(
            kind=F.TIMEOUT,
            machine=exc.machine,
            line_index=exc.line_index,
            error_type="FlowTimeout",
            message=str(exc),
        )
    if isinstance(exc, PeerError):
        return F(
            kind=F.UNAVAILABLE if isinstance(exc, PeerUnavailable) else F.REFUSED,
            machine=exc.machine,
            address=exc.address,
            line_index=line_index if exc.line_index is None else exc.line_index,
            error_type=type(exc).__name__,
            message=str(exc),
        )
    return F(
        kind=F.REFUSED,
        machine=machine,
        line_index=line_index,
        error_type=type(exc).__name__,
        message=str(exc),
    )


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
        cls: type[PeerError] = PeerUnavailable
    else:
        cls = AccessDenied if failure.error_type == "AccessDenied" else PeerRefused
    return cls(
        failure.message,
        machine=failure.machine,
        address=failure.address,
        request=request,
        flow_id=flow_id,
        line_index=index,
    )
