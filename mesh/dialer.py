"""Channels to other machines, and the ``Continue`` call that hands a flow on.

One channel per machine, opened on first use and kept: a channel is expensive to
set up and cheap to share between threads. No ``grpc.RpcError`` escapes from
here: each status becomes the mesh's own error, naming the machine and address.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

from mesh.config import MachineConfig
from mesh.errors import ContextError, FlowTimeout, MeshError, PeerRefused, PeerUnavailable
from mesh.runtime import HandOff
from mesh.v1 import mesh_pb2 as _pb2
from mesh.v1 import mesh_pb2_grpc as _pb2_grpc
from mesh.wire import (
    MAX_MESSAGE_BYTES,
    MESSAGE_OPTIONS,
    dump_context,
    failure_to_error,
    load_context,
)

if TYPE_CHECKING:
    from mesh.runtime import FlowState

#: Channel options every peer and originator use.
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    *MESSAGE_OPTIONS,
    # Our own connection per channel: channels to one target otherwise share a
    # subchannel, and with it the reconnect backoff of a peer that was down.
    ("grpc.use_local_subchannel_pool", 1),
)


#: Room left in a message for everything but the context (steps, names, digest).
MAX_CONTEXT_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024


class Dialer:
    """Stubs by machine name, built from the config's addresses."""

    def __init__(self, machines: Mapping[str, MachineConfig]) -> None:
        self._machines = machines
        self._stubs: dict[str, _pb2_grpc.MeshStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def address(self, machine: str) -> str:
        entry = self._machines.get(machine)
        return entry.address if entry is not None else ""

    def stub(self, machine: str) -> _pb2_grpc.MeshStub:
        """The stub for ``machine``, dialling it on first use."""
        stub = self._stubs.get(machine)
        if stub is not None:
            return stub
        address = self.address(machine)
        if not address:
            raise PeerUnavailable(
                f"{machine} has no address in [machines], so no peer can call it",
                machine=machine,
                address="",
            )
        with self._lock:
            stub = self._stubs.get(machine)
            if stub is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[machine] = channel
                stub = self._stubs[machine] = _pb2_grpc.MeshStub(channel)
        return stub

    def _forget(self, machine: str, stub: _pb2_grpc.MeshStub) -> None:
        """Drop a channel that found its peer down, so the next call dials afresh.

        gRPC would otherwise fail every call at once until its reconnect backoff
        (up to two minutes) ends, long after the peer is back. Calls still in
        flight hold the old channel until they finish; then it is collected.
        """
        with self._lock:
            if self._stubs.get(machine) is stub:
                del self._stubs[machine]
                del self._channels[machine]

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()

    def continue_flow(self, state: FlowState, machine: str, index: int) -> HandOff | None:
        """Send the flow to ``machine`` for line ``index``; wait for it to come back.

        Returns None when the flow is done, or where it must go on; merges the
        context and the remote steps into ``state``. Raises MeshError otherwise.
        """
        flow = state.flow
        context = dump_context(state.context)
        if len(context) > MAX_CONTEXT_BYTES:
            raise ContextError(
                f"{flow.name} context is {len(context):,} bytes of JSON, over the"
                f" {MAX_CONTEXT_BYTES:,} a call to {machine} may carry"
            )
        request = _pb2.ContinueRequest(
            request=flow.name,
            line_index=index,
            context=context,
            flow_id=state.flow_id,
            digest=flow.digest,
            via=(*state.via, state.node.machine),
        )
        stub = self.stub(machine)
        try:
            reply = stub.Continue(request, timeout=max(state.remaining(), 0.001))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._forget(machine, stub)
            raise self._error(exc, state, machine, index) from None
        state.steps.append(reply.steps)  # decoded only at the originator (wire.as_steps)
        outcome = reply.WhichOneof("outcome")
        if outcome == "done":
            if state.via:  # a peer in the chain: it only passes the final context up
                state.final = reply.done.context
            else:
                state.context = load_context(reply.done.context)
            return None
        if outcome == "hand_off":
            state.context = load_context(reply.hand_off.context)
            return HandOff(reply.hand_off.machine, reply.hand_off.line_index)
        if outcome == "failed":
            raise failure_to_error(
                reply.failed,
                request=flow.name,
                flow_id=state.flow_id,
                lines=tuple(line.text for line in flow.lines),
            )
        raise PeerRefused(
            f"{machine} sent a reply with no outcome for {flow.name} line {index}",
            machine=machine,
            address=self.address(machine),
        )

    def _error(self, exc: grpc.RpcError, state: FlowState, machine: str, index: int) -> MeshError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(code)
        details = state.scrub(details)
        address = self.address(machine)
        flow = state.flow
        where = f"{flow.name} line {index} {flow.lines[index].text!r}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return FlowTimeout(
                f"{flow.name} timed out waiting for {machine} ({address}) at line {index}"
                f" {flow.lines[index].text!r}",
                request=flow.name,
                flow_id=state.flow_id,
                machine=machine,
                line_index=index,
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return PeerUnavailable(
                f"{machine} is unavailable at {address} (for {where}): {details}",
                machine=machine,
                address=address,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return PeerRefused(
                f"{machine} at {address} is busy (for {where}): {details}",
                machine=machine,
                address=address,
            )
        name = code.name if code is not None else "error"
        return PeerRefused(
            f"{machine} at {address} refused {where}: {details} ({name})",
            machine=machine,
            address=address,
        )
