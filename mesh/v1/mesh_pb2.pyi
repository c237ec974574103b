from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContinueRequest(_message.Message):
    __slots__ = ("request", "line_index", "context", "flow_id", "digest", "via")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LINE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    request: str
    line_index: int
    context: bytes
    flow_id: str
    digest: str
    via: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request: _Optional[str] = ..., line_index: _Optional[int] = ..., context: _Optional[bytes] = ..., flow_id: _Optional[str] = ..., digest: _Optional[str] = ..., via: _Optional[_Iterable[str]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("line_index", "machine", "line", "start", "duration", "request", "element", "skipped")
    LINE_INDEX_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    line_index: int
    machine: str
    line: str
    start: float
    duration: float
    request: str
    element: int
    skipped: bool
    def __init__(self, line_index: _Optional[int] = ..., machine: _Optional[str] = ..., line: _Optional[str] = ..., start: _Optional[float] = ..., duration: _Optional[float] = ..., request: _Optional[str] = ..., element: _Optional[int] = ..., skipped: _Optional[bool] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: bytes
    def __init__(self, context: _Optional[bytes] = ...) -> None: ...

class HandOff(_message.Message):
    __slots__ = ("machine", "line_index", "context")
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    LINE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    machine: str
    line_index: int
    context: bytes
    def __init__(self, machine: _Optional[str] = ..., line_index: _Optional[int] = ..., context: _Optional[bytes] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("kind", "machine", "line_index", "error_type", "message", "address")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STEP: _ClassVar[Failure.Kind]
        UNAVAILABLE: _ClassVar[Failure.Kind]
        REFUSED: _ClassVar[Failure.Kind]
        TIMEOUT: _ClassVar[Failure.Kind]
    STEP: Failure.Kind
    UNAVAILABLE: Failure.Kind
    REFUSED: Failure.Kind
    TIMEOUT: Failure.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    LINE_INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    kind: Failure.Kind
    machine: str
    line_index: int
    error_type: str
    message: str
    address: str
    def __init__(self, kind: _Optional[_Union[Failure.Kind, str]] = ..., machine: _Optional[str] = ..., line_index: _Optional[int] = ..., error_type: _Optional[str] = ..., message: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ContinueReply(_message.Message):
    __slots__ = ("done", "hand_off", "failed", "steps")
    DONE_FIELD_NUMBER: _ClassVar[int]
    HAND_OFF_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    done: Done
    hand_off: HandOff
    failed: Failure
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    def __init__(self, done: _Optional[_Union[Done, _Mapping]] = ..., hand_off: _Optional[_Union[HandOff, _Mapping]] = ..., failed: _Optional[_Union[Failure, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("call", "request", "reply", "refused", "cancel", "going_away", "timeout", "traceparent", "received")
    CALL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    GOING_AWAY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    call: int
    request: ContinueRequest
    reply: ContinueReply
    refused: Refusal
    cancel: Cancel
    going_away: GoingAway
    timeout: float
    traceparent: str
    received: int
    def __init__(self, call: _Optional[int] = ..., request: _Optional[_Union[ContinueRequest, _Mapping]] = ..., reply: _Optional[_Union[ContinueReply, _Mapping]] = ..., refused: _Optional[_Union[Refusal, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., going_away: _Optional[_Union[GoingAway, _Mapping]] = ..., timeout: _Optional[float] = ..., traceparent: _Optional[str] = ..., received: _Optional[int] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GoingAway(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class FlowsRequest(_message.Message):
    __slots__ = ("state", "request", "since", "flow_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    state: str
    request: str
    since: float
    flow_id: str
    def __init__(self, state: _Optional[str] = ..., request: _Optional[str] = ..., since: _Optional[float] = ..., flow_id: _Optional[str] = ...) -> None: ...

class FlowStep(_message.Message):
    __slots__ = ("line", "machine", "log", "state", "at", "duration", "error")
    LINE_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    line: int
    machine: str
    log: str
    state: str
    at: float
    duration: float
    error: str
    def __init__(self, line: _Optional[int] = ..., machine: _Optional[str] = ..., log: _Optional[str] = ..., state: _Optional[str] = ..., at: _Optional[float] = ..., duration: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class FlowStay(_message.Message):
    __slots__ = ("flow_id", "line", "request", "state", "machine", "position", "started", "updated", "waiting", "error", "origin", "sender", "context", "result", "steps", "call_machine")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CALL_MACHINE_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    line: int
    request: str
    state: str
    machine: str
    position: int
    started: float
    updated: float
    waiting: str
    error: str
    origin: bool
    sender: str
    context: bytes
    result: bytes
    steps: _containers.RepeatedCompositeFieldContainer[FlowStep]
    call_machine: str
    def __init__(self, flow_id: _Optional[str] = ..., line: _Optional[int] = ..., request: _Optional[str] = ..., state: _Optional[str] = ..., machine: _Optional[str] = ..., position: _Optional[int] = ..., started: _Optional[float] = ..., updated: _Optional[float] = ..., waiting: _Optional[str] = ..., error: _Optional[str] = ..., origin: _Optional[bool] = ..., sender: _Optional[str] = ..., context: _Optional[bytes] = ..., result: _Optional[bytes] = ..., steps: _Optional[_Iterable[_Union[FlowStep, _Mapping]]] = ..., call_machine: _Optional[str] = ...) -> None: ...

class FlowsReply(_message.Message):
    __slots__ = ("machine", "stays", "journal_bytes")
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    STAYS_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    machine: str
    stays: _containers.RepeatedCompositeFieldContainer[FlowStay]
    journal_bytes: int
    def __init__(self, machine: _Optional[str] = ..., stays: _Optional[_Iterable[_Union[FlowStay, _Mapping]]] = ..., journal_bytes: _Optional[int] = ...) -> None: ...

class SteerRequest(_message.Message):
    __slots__ = ("action", "flow_id")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    action: str
    flow_id: str
    def __init__(self, action: _Optional[str] = ..., flow_id: _Optional[str] = ...) -> None: ...

class SteerReply(_message.Message):
    __slots__ = ("changed", "message")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    changed: int
    message: str
    def __init__(self, changed: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
