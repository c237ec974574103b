"""Link frames as the Python peers build them by hand (mesh/frames.py) are the proto's.

A peer or client in another language reads and writes ``mesh.v1.Frames`` with its own
generated code; the Python side writes and splits them byte by byte so that payloads pass
through uncopied. So every frame it builds must parse with the generated classes to the
fields the docs define, and every frame the generated classes build must split back to the
same parts, or a link between the two would break on the first message.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh import frames
from mesh.v1 import mesh_pb2 as pb

_ids = st.integers(0, 2**64 - 1)
_payload = st.builds(
    pb.ContinueRequest,
    request=st.text(max_size=20),
    line_index=st.integers(0, 2**32 - 1),
    context=st.binary(max_size=200),
    flow_id=st.text(max_size=40),
    via=st.lists(st.text(max_size=10), max_size=4),
).map(lambda r: r.SerializeToString())
_text = st.text(max_size=40)


def _one(data: bytes) -> pb.Frame:
    (frame,) = pb.Frames.FromString(frames.batch([data])).frames
    return frame


@given(call=_ids, payload=_payload, timeout=st.floats(0, 1e9), traceparent=_text)
def test_a_request_frame_is_the_protos(
    call: int, payload: bytes, timeout: float, traceparent: str
) -> None:
    """A request: the call id, the ContinueRequest bytes as they were, the seconds left and
    the traceparent, read by the generated class; and split back unchanged."""
    data = frames.request(call, payload, timeout, traceparent)
    frame = _one(data)
    assert frame.WhichOneof("body") == "request"
    assert frame.call == call
    assert frame.request == pb.ContinueRequest.FromString(payload)
    assert frame.timeout == timeout
    assert frame.traceparent == traceparent
    parts = frames.split(frame.SerializeToString())
    assert (parts.call, parts.kind, parts.timeout, parts.traceparent) == (
        call,
        frames.REQUEST,
        timeout,
        traceparent,
    )
    assert pb.ContinueRequest.FromString(bytes(parts.body)) == frame.request


@given(call=_ids, received=_ids, code=st.integers(0, 16), message=_text)
def test_answers_are_the_protos(call: int, received: int, code: int, message: str) -> None:
    """A reply, a refusal, a cancel, going away and an acknowledgement, each with the fields
    the docs give it, as the generated class reads them."""
    body = pb.ContinueReply(done=pb.Done(context=b"{}")).SerializeToString()
    reply = _one(frames.reply(call, body, received))
    assert (reply.WhichOneof("body"), reply.call, reply.received) == ("reply", call, received)
    assert reply.reply.done.context == b"{}"

    refused = _one(frames.refused(call, code, message, received))
    assert refused.WhichOneof("body") == "refused"
    assert (refused.call, refused.received) == (call, received)
    assert (refused.refused.code, refused.refused.message) == (code, message)
    assert frames.refusal(frames.split(refused.SerializeToString()).body) == (code, message)

    cancel = _one(frames.cancel(call))
    assert (cancel.WhichOneof("body"), cancel.call) == ("cancel", call)

    away = _one(frames.going_away(message, received))
    assert away.WhichOneof("body") == "going_away"
    assert (away.call, away.going_away.reason, away.received) == (0, message, received)

    ack = _one(frames.ack(received))
    assert (ack.WhichOneof("body"), ack.call, ack.received) == (None, 0, received)


@given(
    batch=st.lists(
        st.builds(
            pb.Frame,
            call=_ids,
            received=_ids,
            timeout=st.floats(0, 1e6),
            traceparent=_text,
            cancel=st.just(pb.Cancel()),
        ),
        max_size=5,
    )
)
def test_messages_of_generated_frames_split_back(batch: list[pb.Frame]) -> None:
    """A Frames message another implementation writes comes apart into its frames, in order,
    each with its call id, kind and acknowledgement."""
    message = pb.Frames(frames=batch).SerializeToString()
    parts = [frames.split(view) for view in frames.unbatch(message)]
    assert [(p.call, p.kind, p.received) for p in parts] == [
        (f.call, frames.CANCEL, f.received) for f in batch
    ]


def test_the_first_frame_of_a_link_is_an_empty_acknowledgement() -> None:
    """The message a peer sends when it admits a link: one frame, no body, received 0."""
    message = pb.Frames.FromString(frames.batch([frames.ack(0)]))
    assert len(message.frames) == 1
    assert message.frames[0].WhichOneof("body") is None
    assert message.frames[0].received == 0
