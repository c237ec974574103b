"""``mesh.v1.Frame`` as bytes: built and split by hand, so payloads pass through untouched.

A link carries a ``ContinueRequest`` or a ``ContinueReply`` inside each frame. The
reply a peer relays up a chain is the reply it got from below with its own steps in
front (``wire.encode_reply``), and it goes on as bytes; parsing a frame with the
generated class and serializing its reply again would copy every step of the chain
at every hop. So frames are written and split here, field by field, in exactly the
protobuf encoding of ``Frame`` (a test checks both directions against the generated
class): any other implementation of the proto reads and writes them as usual.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

__all__ = [
    "CANCEL",
    "GOING_AWAY",
    "NONE",
    "REFUSED",
    "REPLY",
    "REQUEST",
    "Parts",
    "ack",
    "batch",
    "cancel",
    "going_away",
    "refused",
    "reply",
    "request",
    "split",
    "unbatch",
]

# Field numbers of Frame's body (the oneof), which is also the kind a frame has.
NONE: Final = 0  # no body: an acknowledgement only (``received``)
REQUEST: Final = 2
REPLY: Final = 3
REFUSED: Final = 4
CANCEL: Final = 5
GOING_AWAY: Final = 6

_CALL = 0x08  # field 1, varint
_TIMEOUT = 0x39  # field 7, 64-bit
_TRACEPARENT = 0x42  # field 8, length-delimited
_RECEIVED = 0x48  # field 9, varint
_double = struct.Struct("<d")


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return bytes(((number << 3) | 2,)) + _varint(len(payload)) + payload


def request(call: int, payload: bytes, timeout: float, traceparent: str = "") -> bytes:
    """A call: ``payload`` is a serialized ``ContinueRequest``; ``timeout`` in seconds."""
    out = b"".join(
        (bytes((_CALL,)), _varint(call), _field(REQUEST, payload), bytes((_TIMEOUT,)))
    ) + _double.pack(timeout)
    if traceparent:
        # The length of the bytes, not of the characters: a non-ASCII traceparent (no
        # tracer makes one, but the field is a string) must not corrupt the frame.
        encoded = traceparent.encode()
        out += bytes((_TRACEPARENT,)) + _varint(len(encoded)) + encoded
    return out


def reply(call: int, payload: bytes, received: int) -> bytes:
    """The answer to ``call``: ``payload`` is a serialized ``ContinueReply``."""
    return b"".join(
        (
            bytes((_CALL,)),
            _varint(call),
            _field(REPLY, payload),
            bytes((_RECEIVED,)),
            _varint(received),
        )
    )


def refused(call: int, code: int, message: str, received: int) -> bytes:
    """Call ``call`` was not admitted: the gRPC status code unary Continue would end with."""
    body = bytes((0x08,)) + _varint(code) + _field(2, message.encode())
    return b"".join(
        (
            bytes((_CALL,)),
            _varint(call),
            _field(REFUSED, body),
            bytes((_RECEIVED,)),
            _varint(received),
        )
    )


def cancel(call: int) -> bytes:
    return bytes((_CALL,)) + _varint(call) + _field(CANCEL, b"")


def going_away(reason: str, received: int) -> bytes:
    body = _field(1, reason.encode())
    return _field(GOING_AWAY, body) + bytes((_RECEIVED,)) + _varint(received)


def ack(received: int) -> bytes:
    """A frame with no body: every call up to ``received`` has been read."""
    return bytes((_RECEIVED,)) + _varint(received)


def batch(frames: list[bytes]) -> bytes:
    """One ``Frames`` message holding ``frames`` (each a serialized ``Frame``), in order."""
    return b"".join(b"\x0a" + _varint(len(frame)) + frame for frame in frames)


def unbatch(message: bytes) -> list[memoryview]:
    """The frames of a ``Frames`` message, as views of it (a context of a megabyte is not
    copied to be taken apart); ValueError if it is not one (other fields of a newer peer
    are skipped)."""
    data = memoryview(message)
    out: list[memoryview] = []
    i, end = 0, len(data)
    try:
        while i < end:
            tag, i = _read_varint(data, i)
            wire = tag & 7
            if wire == 2:
                size, i = _read_varint(data, i)
                if i + size > end:
                    raise ValueError("truncated frame")
                if tag == 0x0A:
                    out.append(data[i : i + size])
                i += size
            elif wire == 0:
                _, i = _read_varint(data, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"wire type {wire}")
    except IndexError:
        raise ValueError("truncated message") from None
    if i != end:
        raise ValueError("truncated message")
    return out


class Parts(NamedTuple):
    """A frame taken apart: the body is a view of the frame, not a copy to parse."""

    call: int
    kind: int  # NONE, REQUEST, REPLY, REFUSED, CANCEL or GOING_AWAY
    body: bytes | memoryview
    timeout: float
    traceparent: str
    received: int


def _read_varint(data: bytes | memoryview, i: int) -> tuple[int, int]:
    b = data[i]
    if b < 0x80:
        return b, i + 1
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def split(data: bytes | memoryview) -> Parts:
    """Take a frame apart; ValueError if it is not a ``Frame`` this side understands.

    Unknown fields are skipped, as protobuf does, so a newer peer's frames still read.
    """
    call = received = 0
    kind = NONE
    body: bytes | memoryview = b""
    timeout = 0.0
    traceparent = ""
    i = 0
    end = len(data)
    try:
        while i < end:
            tag, i = _read_varint(data, i)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                value, i = _read_varint(data, i)
                if number == 1:
                    call = value
                elif number == 9:
                    received = value
            elif wire == 2:
                size, i = _read_varint(data, i)
                if i + size > end:
                    raise ValueError("truncated field")
                chunk = data[i : i + size]
                i += size
                if REQUEST <= number <= GOING_AWAY:
                    kind, body = number, chunk
                elif number == 8:
                    traceparent = bytes(chunk).decode()
            elif wire == 1:
                if i + 8 > end:
                    raise ValueError("truncated field")
                if number == 7:
                    timeout = _double.unpack_from(data, i)[0]
                i += 8
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"wire type {wire}")
    except IndexError:
        raise ValueError("truncated frame") from None
    except UnicodeDecodeError:
        raise ValueError("traceparent is not UTF-8") from None
    if i != end:
        raise ValueError("truncated frame")
    return Parts(call, kind, body, timeout, traceparent, received)


def refusal(body: bytes | memoryview) -> tuple[int, str]:
    """The (code, message) of a ``refused`` body."""
    code, message = 0, ""
    i, end = 0, len(body)
    while i < end:
        tag, i = _read_varint(body, i)
        if tag == 0x08:
            code, i = _read_varint(body, i)
        elif tag & 7 == 2:
            size, i = _read_varint(body, i)
            if tag >> 3 == 2:
                message = bytes(body[i : i + size]).decode("utf-8", "replace")
            i += size
        elif tag & 7 == 0:
            _, i = _read_varint(body, i)
        else:
            raise ValueError("malformed refusal")
    return code, message
