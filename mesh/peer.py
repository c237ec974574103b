"""The gRPC servicer of one machine, and its server's lifecycle.

A peer serves only the lines its machine owns: anything else is refused with a
status and a message that say what is wrong, so a flow file edited on one
machine only is caught at the first hop instead of running half of each version.
No Python exception crosses the wire: refusals ``abort``, step failures travel
as a ``Failure`` in the reply.
"""

from __future__ import annotations

import contextvars
import errno
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh import deadlines, tracing
from mesh.dedup import Forgotten, Replayed, Replies
from mesh.errors import ContextError, FlowTimeout, MeshError
from mesh.health import SERVING, Health
from mesh.runtime import FINISHED, FlowState, HandOff, activate, advance, fail_step
from mesh.transport import Transport
from mesh.v1 import mesh_pb2 as _pb2
from mesh.v1 import mesh_pb2_grpc as _pb2_grpc
from mesh.wire import dump_context, encode_reply, error_to_failure, load_context

if TYPE_CHECKING:
    from mesh.node import Node

_log = structlog.get_logger("mesh")

SERVICE_NAME = "mesh.v1.Mesh"


class Peer(_pb2_grpc.MeshServicer):  # type: ignore[misc]
    """Serves ``Continue`` for one machine of a node."""

    def __init__(self, node: Node) -> None:
        self._node = node
        # Steps run here, so a retried call gets the first reply instead of a second run.
        # Kept as the bytes sent: a reply is serialized once, for the record and the wire.
        config = node.config
        self.replies: Replies[bytes] = Replies(
            config.dedup_size, config.dedup_age, config.dedup_bytes
        )
        self.calls = InFlight()
        # The inbound call of each step running here, so a retry can adopt the step.
        self._watches: dict[tuple[str, int], deadlines.Watch] = {}

    def Continue(
        self,
        request: _pb2.ContinueRequest,
        context: grpc.ServicerContext,
        fingerprint: bytes = b"",
    ) -> bytes:
        """Serve one call. ``fingerprint`` identifies it (the guard hashes the request's bytes
        and the caller's certificate names): only a call with the same one is a retry."""
        node = self._node
        me = node.machine
        # The guard (mesh/guard.py) runs before every call: the flow is known, the line in
        # range, the flow_id present and the caller entitled to this line.
        flow = node.flows.flows[request.request]
        index = request.line_index
        if request.digest != flow.digest:
            caller = request.via[-1] if request.via else "caller"
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{me} runs a different version of flow {flow.name} than {caller}",
            )
        owner = flow.lines[index].machine
        if owner != me:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{me} does not run {flow.name} line {index} {flow.lines[index].text!r};"
                f" {owner} does",
            )
        try:
            ctx = load_context(request.context)
        except ValueError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{me}: bad context: {exc}")
        remaining = context.time_remaining()
        if remaining is None:
            remaining = node.config.timeout
        state = FlowState(
            node,
            flow,
            request.flow_id,
            ctx,
            time.monotonic() + remaining - deadlines.reply_reserve(remaining),
            tuple(request.via),
            inbound=True,
        )
        return self._once(context, state, index, remaining, fingerprint)

    def _once(
        self,
        context: grpc.ServicerContext,
        state: FlowState,
        index: int,
        remaining: float,
        fingerprint: bytes,
    ) -> bytes:
        """Run the step unless this peer ran it already (a retry): then its first reply.

        A call that names a known step but is not a retry of it, or starts a flow (line 0)
        with a flow id known here, is refused ALREADY_EXISTS: flow ids are in every log line,
        so they must not open another flow's reply. A retry of a step whose reply the record
        dropped (``dedup_bytes``) is refused FAILED_PRECONDITION, and the step not run again.
        """
        flow_id = state.flow_id
        key = (flow_id, index)
        fresh = index == 0
        try:
            known = self.replies.seen(flow_id, index, fingerprint, fresh=fresh)
        except (Replayed, Forgotten) as exc:
            _refuse_repeat(context, state, index, exc)
        if not self.calls.enter(known):
            # Draining: a new step goes to another replica (gRPC retries UNAVAILABLE);
            # a retry of a step this peer ran or is running is still answered below.
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"{state.machine} is stopping")
        watches = self._watches
        mine = None
        if known:
            caller = state.via[-1] if state.via else "caller"
            _log.info("mesh.step_repeated", caller=caller, **state.fields(index))
            running = watches.get(key)
            if running is not None:
                running.adopt()
        else:
            mine = watches[key] = deadlines.watch(context, state)
        try:
            # A fresh context per call: pool threads are reused, flows must not share state.
            reply = self.replies.once(
                flow_id,
                index,
                fingerprint,
                lambda: contextvars.Context().run(_run, state, index, context),
                remaining,
                fresh=fresh,
            )
        except (Replayed, Forgotten) as exc:  # another call got in first
            _refuse_repeat(context, state, index, exc)
        finally:
            self.calls.leave()
            if mine is not None:
                mine.finished()
                if watches.get(key) is mine:
                    del watches[key]
        if reply is None:
            _abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{state.machine}: {state.flow.name} line {index} is still running"
                " from an earlier attempt",
            )
        return reply


def _refuse_repeat(
    context: grpc.ServicerContext, state: FlowState, index: int, exc: Replayed | Forgotten
) -> NoReturn:
    """Refuse a call the record says is not a new step: say why, and nothing of the step."""
    me, flow_id = state.machine, _cut(state.flow_id)
    if isinstance(exc, Replayed):
        _abort(
            context,
            grpc.StatusCode.ALREADY_EXISTS,
            f"{me}: flow id {flow_id} is in use here by another call; a new flow needs a new"
            " flow id, and a retry must repeat its call exactly",
            flow_id=state.flow_id,
            request=state.flow.name,
            line_index=index,
            caller=state.via[-1] if state.via else "",
        )
    _abort(
        context,
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{me}: {state.flow.name} line {index} of flow {flow_id} ran here already, and its reply"
        " is no longer kept (dedup_bytes, dedup_size in mesh.toml), so it is not run again",
        flow_id=state.flow_id,
        request=state.flow.name,
        line_index=index,
    )


def _cut(text: str, shown: int = 60) -> str:
    return text if len(text) <= shown and text.isprintable() else repr(text[:shown]) + "…"


class InFlight:
    """Counts the calls being served, so a stopping peer knows when they are done.

    A plain lock, not a Condition: every call enters and leaves, and a Condition's
    Python-level locking cost each hop more than the count is worth.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._idle = threading.Event()  # set once draining and no call is left
        self.draining = False

    def enter(self, known: bool) -> bool:
        """Count a call in; False when draining and the step is not one run here."""
        with self._lock:
            if self.draining and not known:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
            if self.draining and not self._count:
                self._idle.set()

    def drain(self, timeout: float | None) -> bool:
        """Refuse new steps from now on; wait for calls in progress (True: all done)."""
        with self._lock:
            self.draining = True
            if not self._count:
                self._idle.set()
        return self._idle.wait(timeout)


def _run(state: FlowState, index: int, call: grpc.ServicerContext) -> bytes:
    tracing.adopt(state, call)
    activate(state, index)
    try:
        outcome = advance(state, index)
    except MeshError as exc:
        if isinstance(exc, FlowTimeout) and exc.machine == state.machine:
            # The flow stops here: say so where it happened, not only at the originator.
            # deadlines.expire sets the deadline to exactly 0.0: the caller went away.
            cause = "caller gone" if state.deadline == 0.0 else "deadline passed"
            _log.warning(
                "mesh.flow_expired", cause=cause, reason=str(exc), **state.fields(exc.line_index)
            )
        failure = error_to_failure(exc, machine=state.machine, line_index=max(state.current, index))
        return encode_reply(_pb2.ContinueReply(failed=failure), state.steps)
    except BaseException as exc:  # a bug of ours: say so rather than hang the chain
        _log.exception("mesh.internal_error", **state.fields(index))
        failure = _pb2.Failure(
            kind=_pb2.Failure.STEP,
            machine=state.machine,
            line_index=max(state.current, index),
            error_type=type(exc).__name__,
            message=state.scrub(f"internal error on {state.machine}: {exc}"),
        )
        return encode_reply(_pb2.ContinueReply(failed=failure), state.steps)
    if outcome is FINISHED and state.done_below:
        return encode_reply(None, state.steps)  # the reply from below says so, context included
    try:
        context = dump_context(state.context)
    except ContextError as exc:
        # A handler put a value JSON cannot carry straight into the dict, behind "next"'s
        # back: fail the last line run here, naming the key, rather than the whole call.
        return encode_reply(_unsendable(state, index, exc), state.steps)
    if outcome is FINISHED:
        return encode_reply(_pb2.ContinueReply(done={"context": context}), state.steps)
    assert isinstance(outcome, HandOff)
    hand_off = {"machine": outcome.machine, "line_index": outcome.index, "context": context}
    # Sub-messages as dicts: upb builds them faster than from message objects.
    return encode_reply(_pb2.ContinueReply(hand_off=hand_off), state.steps)


def _unsendable(state: FlowState, index: int, exc: ContextError) -> _pb2.ContinueReply:
    """The reply for a flow whose context cannot travel on: its last step here failed."""
    ran = [s for s in state.steps if type(s) is tuple]
    line = ran[-1][0] if ran else index
    error = fail_step(state, line, exc)
    _log.error("mesh.step_failed", error=str(error), **state.fields(line))
    return _pb2.ContinueReply(failed=error_to_failure(error))


def _abort(
    context: grpc.ServicerContext, code: grpc.StatusCode, message: str, **fields: Any
) -> NoReturn:
    _log.warning("mesh.refused", code=code.name, reason=message, **fields)
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


#: Seconds a stopping server gives replies already computed to leave, once no step
#: runs: cut off, gRPC would report them UNAVAILABLE and retry a finished step elsewhere.
LAST_REPLIES = 1.0

#: Seconds the health service gets to tell watchers NOT_SERVING before stopping goes on.
HEALTH_BOUND = 2.0


@dataclass(frozen=True, slots=True)
class Abandoned:
    """A step still running when its stopping peer's ``grace`` ran out."""

    request: str
    line_index: int
    flow_id: str

    def __str__(self) -> str:
        return f"{self.request} line {self.line_index} of flow {self.flow_id}"


class Server:
    """A running gRPC server for one machine: the mesh service and health."""

    def __init__(self, node: Node, listen: str) -> None:
        workers = node.config.workers
        transport = node.transport  # TLS, the token and the access list: mesh/transport.py
        self.listen = listen
        self.machine = node.machine
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"mesh-{node.machine}"
            ),
            # A flow holds a worker on every machine of its call chain while it
            # waits; queueing calls beyond the pool could deadlock flows that cross
            # machines in opposite orders, so refuse them at once instead.
            maximum_concurrent_rpcs=workers,
            # Without this, two peers started on one port share it silently.
            options=[("grpc.so_reuseport", 0), *transport.server_options()],
        )
        self.peer = Peer(node)
        # Every Continue call in this server, so a stop can end the ones still running
        # when grace is over with a status no caller retries (see stop()).
        self._running: dict[grpc.ServicerContext, _pb2.ContinueRequest] = {}
        self._running_lock = threading.Lock()
        self._abandoning = False
        # Replies leave Peer.Continue serialized already (response_serializer=None).
        handlers = transport.guard(node.flows).method_handlers(
            {
                "Continue": grpc.unary_unary_rpc_method_handler(
                    self._continue, request_deserializer=_pb2.ContinueRequest.FromString
                )
            }
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        self._server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self.health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        problem = _bind_problem(listen)
        if problem:
            raise MeshError(f"{node.machine} cannot listen on {listen}: {problem}")
        port = transport.add_port(self._server, listen)
        if not port:
            raise MeshError(f"{node.machine} cannot listen on {listen}: address in use")
        self.port = port
        self._server.start()
        self.health.set("", SERVING)
        self.health.set(SERVICE_NAME, SERVING)

    def _continue(
        self,
        request: _pb2.ContinueRequest,
        context: grpc.ServicerContext,
        fingerprint: bytes = b"",
    ) -> bytes:
        """Peer.Continue, with the call on record while it runs."""
        running = self._running
        with self._running_lock:
            if self._abandoning:
                self._refuse_late(request, context)
            running[context] = request
        try:
            return self.peer.Continue(request, context, fingerprint)
        finally:
            del running[context]

    def _refuse_late(self, request: _pb2.ContinueRequest, context: grpc.ServicerContext) -> None:
        """A call arriving while the steps past grace are being abandoned."""
        if (request.flow_id, request.line_index) in self.peer.replies:
            # A retry of a step this peer ran or is running: CANCELLED, which no caller
            # retries, so no other replica runs it a second time.
            _abort(
                context,
                grpc.StatusCode.CANCELLED,
                f"{self.machine} stopped while running {request.request} line"
                f" {request.line_index}; the step may have run, so it was not retried",
            )
        _abort(context, grpc.StatusCode.UNAVAILABLE, f"{self.machine} is stopping")

    def stop(self, grace: float) -> list[Abandoned]:
        """Stop: NOT_SERVING, refuse new steps, give steps in progress ``grace`` seconds.

        Clients that watch health (the dialer does) stop picking this peer; one
        that picked it already gets UNAVAILABLE, which gRPC retries on another
        replica (the step never ran here). A step still running when ``grace`` is
        over is abandoned, not handed on: its call ends CANCELLED, which gRPC does
        not retry, so no other replica runs it too, and the caller hears that this
        machine stopped while running it (dialer.py). Returns the steps abandoned,
        each logged as ``mesh.step_abandoned``; their handlers may still be running
        in this process (Python cannot stop a thread): ``mesh peer`` exits anyway.
        """
        began = time.monotonic()
        # Bounded: a watcher that never reads its stream must not keep a peer from stopping.
        telling = threading.Thread(
            target=self.health.enter_graceful_shutdown, name="mesh-health-stop", daemon=True
        )
        telling.start()
        telling.join(min(HEALTH_BOUND, grace))
        left = max(grace - (time.monotonic() - began), 0.0)
        abandoned = [] if self.peer.calls.drain(left) else self._abandon(grace)
        # Replies computed by now still leave; nothing else runs, so this is quick.
        self._server.stop(LAST_REPLIES).wait(LAST_REPLIES + 1.0)
        return abandoned

    def _abandon(self, grace: float) -> list[Abandoned]:
        with self._running_lock:
            self._abandoning = True
            calls = list(self._running.items())
        steps: dict[tuple[str, int], Abandoned] = {}
        for context, request in calls:
            context.cancel()  # CANCELLED: not in the retry policy's retryable codes
            key = (request.flow_id, request.line_index)
            steps.setdefault(key, Abandoned(request.request, request.line_index, request.flow_id))
        for step in steps.values():
            _log.warning(
                "mesh.step_abandoned",
                flow_id=step.flow_id,
                request=step.request,
                line_index=step.line_index,
                machine=self.machine,
                reason=f"still running {grace:g} s after the stop began (grace); its caller"
                " was told it may have run, and it was not handed to another replica",
            )
        return list(steps.values())

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._server.wait_for_termination(timeout))


def _bind_problem(listen: str) -> str | None:
    """Why ``host:port`` cannot be bound, in words (gRPC's own message is vaguer)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        try:
            sock.bind((host or "0.0.0.0", int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address in use"
            return exc.strerror or str(exc)
    return None


def wait_serving(
    address: str,
    timeout: float,
    give_up: Callable[[], bool] = lambda: False,
    transport: Transport | None = None,
) -> bool:
    """Poll a peer's health service until it reports SERVING (True).

    False when ``timeout`` seconds pass or ``give_up()`` says so first (the
    peer's process died, the user pressed Ctrl-C): the caller knows why.
    A peer serving TLS is probed with ``transport``, the peer's own (``Transport.of``).
    """
    # A peer still starting refuses connections; gRPC's default reconnect
    # backoff (one second, growing) would then hide its readiness for a while.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    deadline = time.monotonic() + timeout
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    if transport is None:
        transport = Transport("")
    with transport.open_channel(transport.machine, address, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not give_up():
            try:
                reply = stub.Check(request, timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    return False
