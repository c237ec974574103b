"""Channels to other machines, and the ``Continue`` call that hands a flow on.

One channel per machine, opened on first use and kept: a channel is expensive to
set up and cheap to share between threads. No ``grpc.RpcError`` escapes from
here: each status becomes the mesh's own error, naming the machine and address.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from mesh import tracing
from mesh.config import MachineConfig
from mesh.errors import (
    AccessDenied,
    ContextError,
    FlowTimeout,
    MeshError,
    PeerRefused,
    PeerUnavailable,
)
from mesh.runtime import HandOff
from mesh.transport import Transport
from mesh.v1 import mesh_pb2 as _pb2
from mesh.wire import dump_context, failure_to_error, load_context, step_error, steps_only

if TYPE_CHECKING:
    from mesh.flowfile import Flow
    from mesh.runtime import FlowState

_log = structlog.get_logger("mesh")

_SERVICE = _pb2.DESCRIPTOR.services_by_name["Mesh"].full_name
_CONTINUE = f"/{_SERVICE}/Continue"


def service_config() -> str:
    """gRPC's service config for every channel to a machine: balancing and retries.

    * ``round_robin`` over the addresses the target resolves to (the replicas of
      the machine), skipping any whose grpc.health.v1 says NOT_SERVING: a
      replica that is down or draining gets no new flows.
    * Calls that fail UNAVAILABLE (a refused connection, a peer restarting or
      draining, a connection lost before any reply) are retried with exponential
      backoff, within the call's deadline. A retried step that already ran is
      answered from the called peer's record (dedup.py), not run again.
    """
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": _SERVICE},
            "methodConfig": [
                {
                    "name": [{"service": _SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


#: Channel options every peer and originator use (the transport adds the message limit).
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # Our own connection per channel: channels to one target otherwise share a
    # subchannel, and with it the reconnect backoff of a peer that was down.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", service_config()),
    # A replica that comes back is dialled again within two seconds, not minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


#: Far more than a request holds besides its context (flow name, ids, the call chain of
#: machine names): below this, the size check needs no ByteSize() of the request.
_NOT_CONTEXT = 1 << 20

#: What grpcio says when this process cancelled a call itself (its channel was closed).
_LOCAL_CANCEL = frozenset({"Channel closed!", "Locally cancelled by application!"})

#: Statuses after which a machine's channel is dropped and dialled afresh.
_REDIAL = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class Dialer:
    """Stubs by machine name, built from the config's addresses."""

    def __init__(
        self, machines: Mapping[str, MachineConfig], transport: Transport | None = None
    ) -> None:
        self._machines = machines
        self._transport = transport or Transport("")
        # Continue per machine, replies left as bytes: a peer passes the steps in them
        # on undecoded (wire.encode_reply).
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def address(self, machine: str) -> str:
        entry = self._machines.get(machine)
        return entry.address if entry is not None else ""

    def call(self, machine: str) -> grpc.UnaryUnaryMultiCallable:
        """``Continue`` on ``machine``, dialling it on first use."""
        call = self._calls.get(machine)
        if call is not None:
            return call
        address = self.address(machine)
        if not address:
            raise PeerUnavailable(
                f"{machine} has no address in [machines], so no peer can call it",
                machine=machine,
                address="",
            )
        with self._lock:
            call = self._calls.get(machine)
            if call is None:
                channel = self._transport.open_channel(machine, address, CHANNEL_OPTIONS)
                self._channels[machine] = channel
                call = self._calls[machine] = channel.unary_unary(
                    _CONTINUE,
                    request_serializer=_pb2.ContinueRequest.SerializeToString,
                    response_deserializer=None,
                    # As generated stubs do: the method is registered with the channel
                    # once, not looked up by name on every call.
                    _registered_method=True,
                )
        return call

    def _forget(self, machine: str, call: grpc.UnaryUnaryMultiCallable) -> None:
        """Drop a channel that found its peer down or silent, so the next call dials afresh.

        gRPC would otherwise fail every call at once until its reconnect backoff
        ends, long after the peer is back; and a connection cut by a partition
        (no reset, just silence) would take calls into the void until TCP gives
        up, minutes later. Calls still in flight hold the old channel until they
        finish; then it is collected.
        """
        with self._lock:
            if self._calls.get(machine) is call:
                del self._calls[machine]
                del self._channels[machine]

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._calls.clear()

    def continue_flow(self, state: FlowState, machine: str, index: int) -> HandOff | None:
        """Send the flow to ``machine`` for line ``index``; wait for it to come back.

        Returns None when the flow is done, or where it must go on; merges the
        context and the remote steps into ``state``. Raises MeshError otherwise,
        PeerRefused for a reply no honest peer sends (see :func:`misrouted`).
        """
        flow = state.flow
        context = dump_context(state.context)
        request = _pb2.ContinueRequest(
            request=flow.name,
            line_index=index,
            context=context,
            flow_id=state.flow_id,
            digest=flow.digest,
            via=(*state.via, state.node.machine),
        )
        limit = self._transport.max_message_bytes
        if len(context) + _NOT_CONTEXT > limit and request.ByteSize() > limit:
            # Refused here, not as a cryptic RESOURCE_EXHAUSTED from the receiver.
            raise ContextError(
                f"{flow.name} context is {len(context):,} bytes of JSON; the call to {machine}"
                f" would be {request.ByteSize():,} bytes, over the {limit:,}-byte limit"
                " (max_message_bytes in mesh.toml)"
            )
        try:
            call = self.call(machine)
        except PeerUnavailable as exc:
            raise PeerUnavailable(
                f"{exc} (for {_where(flow, index)})",
                address=exc.address,
                **_fields(exc.machine, state, index),
            ) from None
        # A blocking call, not a future: grpcio runs a blocking call on its own
        # completion queue in this thread, while a future's result comes through the
        # channel's polling thread, a thread hand-off that cost 2.5x a whole call on
        # this 2-core machine (scripts/bench.py). The call carries the flow's deadline,
        # so everything below it ends by then even when nobody can cancel it.
        try:
            raw = call(
                request, timeout=max(state.remaining(), 0.001), metadata=tracing.outgoing(state)
            )
        except grpc.RpcError as exc:
            if exc.code() in _REDIAL:
                self._forget(machine, call)
            raise self._error(exc, state, machine, index, request) from None
        try:
            reply = _pb2.ContinueReply.FromString(raw)
        except DecodeError:
            raise self._refused(
                state, machine, index, "sent a reply that is not a mesh.v1.ContinueReply"
            ) from None
        outcome = reply.WhichOneof("outcome")
        if outcome == "failed":
            # The steps go on without this outcome: this machine will reply with its own.
            state.steps.append(steps_only(reply) if state.inbound else reply.steps)
            raise failure_to_error(
                reply.failed,
                request=flow.name,
                flow_id=state.flow_id,
                lines=tuple(line.text for line in flow.lines),
            )
        if outcome is None:
            raise self._refused(state, machine, index, "sent a reply with no outcome")
        problem = misrouted(state, index, reply)
        if problem:
            raise self._refused(state, machine, index, problem)
        if outcome == "done":
            if state.inbound:  # a peer in the chain: the reply goes up as it came
                state.steps.append(raw)
                state.done_below = True
                return None
            context_bytes = reply.done.context
        else:
            context_bytes = reply.hand_off.context
        try:
            loaded = load_context(context_bytes)
        except ValueError as exc:
            raise self._refused(
                state, machine, index, f"sent back a context that cannot be used: {exc}"
            ) from None
        state.context = loaded
        if outcome == "done":
            state.steps.append(reply.steps)  # decoded only here (wire.as_steps)
            return None
        state.steps.append(steps_only(reply) if state.inbound else reply.steps)
        return HandOff(reply.hand_off.machine, reply.hand_off.line_index)

    def _refused(self, state: FlowState, machine: str, index: int, problem: str) -> PeerRefused:
        """A reply no honest peer sends: the flow fails here, naming the peer that sent it."""
        flow = state.flow
        message = state.scrub(
            f"{machine} at {self.address(machine)} {problem} ({_where(flow, index)})"
        )
        _log.warning(
            "mesh.reply_refused",
            peer=machine,
            reason=message,
            flow_id=state.flow_id,
            request=flow.name,
            line_index=index,
        )
        return PeerRefused(message, address=self.address(machine), **_fields(machine, state, index))

    def _error(
        self,
        exc: grpc.RpcError,
        state: FlowState,
        machine: str,
        index: int,
        request: _pb2.ContinueRequest,
    ) -> MeshError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(code)
        details = state.scrub(details)
        address = self.address(machine)
        flow = state.flow
        where = _where(flow, index)
        fields = _fields(machine, state, index)
        if code == grpc.StatusCode.CANCELLED and details not in _LOCAL_CANCEL:
            # The peer ended the call itself: only a stopping peer does, for a step
            # still running when its grace ran out (peer.Server.stop). gRPC does not
            # retry CANCELLED, so no other replica ran the step a second time.
            return PeerUnavailable(
                f"{machine} ({address}) stopped while running {where}; the step may have"
                " run, so it was not retried",
                address=address,
                **fields,
            )
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return FlowTimeout(
                f"{flow.name} timed out waiting for {machine} ({address}) at line {index}"
                f" {flow.lines[index].text!r}",
                request=flow.name,
                flow_id=state.flow_id,
                machine=machine,
                line_index=index,
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = self._transport.unavailable_hint(machine, details)
            return PeerUnavailable(
                f"{machine} is unavailable at {address} (for {where}): {details}{hint}",
                address=address,
                **fields,
            )
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return AccessDenied(
                f"{machine} at {address} refused {where}: {details} ({code.name})",
                address=address,
                **fields,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            too_large = self._too_large(state, machine, index, request, details)
            if too_large is not None:
                return too_large
            return PeerRefused(
                f"{machine} at {address} is busy (for {where}): {details}",
                address=address,
                **fields,
            )
        name = code.name if code is not None else "error"
        return PeerRefused(
            f"{machine} at {address} refused {where}: {details} ({name})",
            address=address,
            **fields,
        )

    def _too_large(
        self,
        state: FlowState,
        machine: str,
        index: int,
        request: _pb2.ContinueRequest,
        details: str,
    ) -> MeshError | None:
        """RESOURCE_EXHAUSTED because a message was over a limit: say whose, and both sizes
        (None: it was not, the peer is busy).

        gRPC says ``Received message larger than max (SIZE vs. LIMIT)`` on whichever side got
        it: our call, over the receiver's limit (its limit is lower than ours), or its reply,
        over ours.
        """
        sizes = _TOO_LARGE.search(details)
        if sizes is None:
            return None
        size, limit = int(sizes.group(1)), int(sizes.group(2))
        where = _where(state.flow, index)
        address = self.address(machine)
        if size == request.ByteSize() and "CLIENT" not in details:
            return PeerRefused(
                f"{machine} at {address} refused the call for {where}: it is {size:,} bytes,"
                f" over {machine}'s {limit:,}-byte limit (max_message_bytes in its mesh.toml)",
                address=address,
                **_fields(machine, state, index),
            )
        # A step failure of the line called (a FlowError, so it is not blamed on the line
        # before, as a call too large to send is): the reply is what grew too large.
        return step_error(
            request=state.flow.name,
            flow_id=state.flow_id,
            machine=machine,
            line=state.flow.lines[index].text,
            line_index=index,
            error_type="ContextError",
            detail=f"the reply from {machine} at {address} to {state.node.machine} was"
            f" {size:,} bytes, over this machine's {limit:,}-byte limit"
            " (max_message_bytes in mesh.toml)",
        )


#: gRPC's words when a message is over a limit (either side): the size, then the limit.
_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


def _where(flow: Flow, index: int) -> str:
    return f"{flow.name} line {index} {flow.lines[index].text!r}"


def _fields(machine: str, state: FlowState, index: int) -> dict[str, Any]:
    """The keyword arguments of a PeerError about ``machine`` but its address, for this flow
    and line."""
    return {
        "machine": machine,
        "request": state.flow.name,
        "flow_id": state.flow_id,
        "line_index": index,
    }


def misrouted(state: FlowState, index: int, reply: _pb2.ContinueReply) -> str | None:
    """Why a done or hand-off ``reply`` to the call for line ``index`` is one no honest peer
    sends, in words, or None when it is what the flow file says.

    Below the call, the flow runs on machines that are not upstream of it, until the first
    line after ``index`` that this machine or one upstream (``via``) owns: the flow comes back
    exactly there, as a hand-off to that line and that machine, and it is done only if no
    such line is left. The reply's steps must run from ``index`` to the line before. So a
    peer cannot send the flow back to a line run already (line 0 again and again), past the
    end, to a line the flow file gives another machine, or say "done" with lines not run.
    Checking costs the lines between, which the chain below ran anyway; the steps are
    decoded already, and only the first and the last are read.
    """
    lines = state.flow.lines
    me = state.node.machine
    via = state.via
    back = index + 1
    while back < len(lines) and lines[back].machine != me and lines[back].machine not in via:
        back += 1
    flow = state.flow.name
    if reply.WhichOneof("outcome") == "hand_off":
        hand_off = reply.hand_off
        line, owner = hand_off.line_index, hand_off.machine
        if owner != me and owner not in via:
            return f"handed {flow} line {line} back to {_shown(owner)}, which is not upstream of it"
        if line != back:
            expected = (
                f"line {back} ({lines[back].machine}) is the next line upstream"
                if back < len(lines)
                else "no line upstream is left (the flow ends below)"
            )
            return f"handed {flow} line {line} back to {_shown(owner)}, but {expected}"
        if owner != lines[back].machine:
            return (
                f"handed {flow} line {line} back to {_shown(owner)}, but the flow file gives"
                f" it to {lines[back].machine}"
            )
    elif back < len(lines):
        return (
            f"said {flow} is done, but line {back} {lines[back].text!r} is next and runs on"
            f" {lines[back].machine}, upstream of it"
        )
    steps = reply.steps
    first = steps[0].line_index if steps else None
    last = steps[-1].line_index if steps else None
    if first != index or last != back - 1:
        ran = f"lines {first} to {last}" if steps else "no line"
        return (
            f"replied for {flow} lines {index} to {back - 1} with steps that ran {ran}"
            f" (a {'hand-off' if back < len(lines) else 'done'} to line {back})"
        )
    return None


def _shown(name: str) -> str:
    """A machine name from a reply, quoted and cut when it is not a plain short name."""
    return name if len(name) <= 60 and name.isprintable() and name else repr(name[:60])
