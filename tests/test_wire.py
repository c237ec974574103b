"""The reply a peer sends: its own steps, the reply from below passed on as bytes, an outcome."""

from __future__ import annotations

import pytest

from mesh.errors import ContextError
from mesh.v1 import mesh_pb2 as pb
from mesh.wire import as_steps, check_values, dump_context, encode_reply, load_context, steps_only


def step(index: int, machine: str) -> tuple[int, str, str, float, float]:
    return (index, f"line {index}", machine, 1000.0 + index, 0.001 * (index + 1))


def below(*steps: tuple[int, str, str, float, float], outcome: pb.ContinueReply) -> bytes:
    """A reply as a peer further down the chain sent it."""
    return encode_reply(outcome, list(steps))


def timeline(reply: pb.ContinueReply) -> list[tuple[int, str]]:
    return [(s.line_index, s.machine) for s in reply.steps]


def test_a_reply_from_below_passes_on_whole_after_our_own_steps() -> None:
    """A middle peer's reply is its step, then the bytes from below, outcome included."""
    done = pb.ContinueReply(done={"context": b'{"hop":2}'})
    from_below = below(step(1, "m1"), step(2, "m2"), outcome=done)
    sent = encode_reply(None, [step(0, "m0"), from_below])
    reply = pb.ContinueReply.FromString(sent)
    assert timeline(reply) == [(0, "m0"), (1, "m1"), (2, "m2")]
    assert reply.WhichOneof("outcome") == "done"
    assert reply.done.context == b'{"hop":2}'
    assert sent.endswith(from_below)  # passed on as it came, not decoded and encoded again


def test_our_outcome_replaces_a_hand_off_from_below() -> None:
    """Below handed the flow back to us; we ran more lines and finished: our outcome wins,
    the steps stay in the order they ran."""
    hand_back = pb.ContinueReply(hand_off={"machine": "m0", "line_index": 2, "context": b"{}"})
    reply_below = pb.ContinueReply.FromString(below(step(1, "m1"), outcome=hand_back))
    done = pb.ContinueReply(done={"context": b'{"end":true}'})
    sent = encode_reply(done, [step(0, "m0"), steps_only(reply_below), step(2, "m0")])
    reply = pb.ContinueReply.FromString(sent)
    assert timeline(reply) == [(0, "m0"), (1, "m1"), (2, "m0")]
    assert reply.WhichOneof("outcome") == "done"
    assert reply.done.context == b'{"end":true}'
    assert not reply.HasField("hand_off")


def test_a_failure_here_wins_over_a_done_from_below() -> None:
    """Even after a reply that said done, a failure of ours is what the caller reads."""
    done = pb.ContinueReply(done={"context": b"{}"})
    failed = pb.ContinueReply(failed={"machine": "m0", "line_index": 0, "message": "boom"})
    sent = encode_reply(failed, [step(0, "m0"), below(step(1, "m1"), outcome=done)])
    reply = pb.ContinueReply.FromString(sent)
    assert reply.WhichOneof("outcome") == "failed"
    assert reply.failed.message == "boom"
    assert timeline(reply) == [(0, "m0"), (1, "m1")]


def test_a_reply_without_calls_below_is_one_message() -> None:
    """The last peer of a chain: its steps ride in the outcome's message."""
    done = pb.ContinueReply(done={"context": b'{"a":1}'})
    sent = encode_reply(done, [step(3, "m3")])
    expected = pb.ContinueReply(done={"context": b'{"a":1}'})
    expected.steps.add(line_index=3, line="line 3", machine="m3", start=1003.0, duration=0.004)
    assert pb.ContinueReply.FromString(sent) == expected


def test_the_originator_reads_steps_from_any_of_the_shapes() -> None:
    """Local tuples, a reply's steps field, and bytes from below all become Step values."""
    decoded = pb.ContinueReply.FromString(below(step(1, "m1"), outcome=pb.ContinueReply()))
    raw = below(step(2, "m2"), outcome=pb.ContinueReply())
    steps = as_steps([step(0, "m0"), decoded.steps, raw])
    assert [(s.index, s.machine, s.line) for s in steps] == [
        (0, "m0", "line 0"),
        (1, "m1", "line 1"),
        (2, "m2", "line 2"),
    ]
    assert steps[2].duration == 0.003


# -- values JSON cannot carry ------------------------------------------------------------------


CANNOT_TRAVEL = [
    pytest.param("\ud83d", id="lone-surrogate"),
    pytest.param(["ok", {"deep": "\udead"}], id="nested-lone-surrogate"),
    pytest.param(10**5000, id="int-of-5001-digits"),
    pytest.param(-(10**4400), id="negative-int-of-4401-digits"),
    pytest.param(float("inf"), id="infinity"),
    pytest.param(float("nan"), id="nan"),
]


@pytest.mark.parametrize("value", CANNOT_TRAVEL)
def test_a_value_json_cannot_carry_is_a_context_error_naming_the_key(value: object) -> None:
    """check_values (what node.start and every "next" call) and dump_context (every hop)
    raise ContextError naming the key, never a bare UnicodeEncodeError or ValueError."""
    for check in (check_values, dump_context):
        with pytest.raises(ContextError, match=r"context key 'bad'"):
            check({"fine": "héllo", "n": 10**100, "bad": value})


def test_a_key_json_cannot_carry_is_a_context_error() -> None:
    """A lone surrogate in a key is named as well."""
    for check in (check_values, dump_context):
        with pytest.raises(ContextError, match=r"context key '\\ud83d'"):
            check({"\ud83d": 1})


def test_values_that_travel_pass_and_round_trip() -> None:
    """The strict checks keep everything JSON can carry: non-ASCII text, emoji (a surrogate
    pair escaped by another encoder), long ints up to the limit, nested values."""
    context = {"text": "héllo 😀", "big": 10**4000, "nested": [{"a": 1.5}, None, True]}
    check_values(context)
    assert load_context(dump_context(context)) == context
    assert load_context(b'{"e": "\\ud83d\\ude00"}') == {"e": "😀"}


@pytest.mark.parametrize(
    "data",
    [b'{"a": "\\ud83d"}', b'{"a": "\xed\xa0\xbd"}', b'{"a": 1e400}', b'{"a": -1e999}'],
    ids=["escaped-surrogate", "surrogate-bytes", "overflow", "negative-overflow"],
)
def test_load_context_refuses_what_it_could_not_send_on(data: bytes) -> None:
    """A peer refuses, as it decodes it, a context it could not send on."""
    with pytest.raises(ValueError, match=r"'a'|UTF-8"):
        load_context(data)
