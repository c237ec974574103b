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
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, NoReturn

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.errors import MeshError
from mesh.runtime import FINISHED, FlowState, HandOff, activate, advance
from mesh.v1 import mesh_pb2 as _pb2
from mesh.v1 import mesh_pb2_grpc as _pb2_grpc
from mesh.wire import MESSAGE_OPTIONS, add_steps, dump_context, error_to_failure, load_context

if TYPE_CHECKING:
    from mesh.node import Node

_log = structlog.get_logger("mesh")

SERVICE_NAME = "mesh.v1.Mesh"


class Peer(_pb2_grpc.MeshServicer):  # type: ignore[misc]
    """Serves ``Continue`` for one machine of a node."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def Continue(
        self, request: _pb2.ContinueRequest, context: grpc.ServicerContext
    ) -> _pb2.ContinueReply:
        node = self._node
        me = node.machine
        flow = node.flows.flows.get(request.request)
        if flow is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"{me} has no flow {request.request!r}")
        index = request.line_index
        if index >= len(flow.lines):
            _abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"{me}: flow {flow.name} has {len(flow.lines)} lines, no line {index}",
            )
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
        if not request.flow_id:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{me}: the call has no flow_id")
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
            time.monotonic() + remaining,
            tuple(request.via),
        )
        # A fresh context per call: pool threads are reused, flows must not share state.
        return contextvars.Context().run(_run, state, index)


def _run(state: FlowState, index: int) -> _pb2.ContinueReply:
    activate(state, index)
    try:
        outcome = advance(state, index)
    except MeshError as exc:
        return add_steps(_pb2.ContinueReply(failed=error_to_failure(exc)), state.steps)
    except Exception as exc:  # a bug of ours: say so rather than hang the chain
        _log.exception("mesh.internal_error", **state.fields(index))
        failure = _pb2.Failure(
            kind=_pb2.Failure.STEP,
            machine=state.machine,
            line_index=max(state.current, index),
            error_type=type(exc).__name__,
            message=state.scrub(f"internal error on {state.machine}: {exc}"),
        )
        return add_steps(_pb2.ContinueReply(failed=failure), state.steps)
    if outcome is FINISHED:
        final = state.final if state.final is not None else dump_context(state.context)
        return add_steps(_pb2.ContinueReply(done={"context": final}), state.steps)
    assert isinstance(outcome, HandOff)
    hand_off = {
        "machine": outcome.machine,
        "line_index": outcome.index,
        "context": dump_context(state.context),
    }
    # Sub-messages as dicts: upb builds them faster than from message objects.
    return add_steps(_pb2.ContinueReply(hand_off=hand_off), state.steps)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    _log.warning("mesh.refused", code=code.name, reason=message)
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


class Server:
    """A running gRPC server for one machine: the mesh service and health."""

    def __init__(self, node: Node, listen: str) -> None:
        workers = node.config.workers
        self.listen = listen
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"mesh-{node.machine}"
            ),
            # A flow holds a worker on every machine of its call chain while it
            # waits; queueing calls beyond the pool could deadlock flows that cross
            # machines in opposite orders, so refuse them at once instead.
            maximum_concurrent_rpcs=workers,
            # Without this, two peers started on one port share it silently.
            options=[("grpc.so_reuseport", 0), *MESSAGE_OPTIONS],
        )
        _pb2_grpc.add_MeshServicer_to_server(Peer(node), self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        problem = _bind_problem(listen)
        if problem:
            raise MeshError(f"{node.machine} cannot listen on {listen}: {problem}")
        try:
            port = self._server.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if not port:
            raise MeshError(f"{node.machine} cannot listen on {listen}: address in use")
        self.port = port
        self._server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        self.health.set("", serving)
        self.health.set(SERVICE_NAME, serving)

    def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in progress finish."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

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


def wait_serving(address: str, timeout: float, give_up: Callable[[], bool] = lambda: False) -> bool:
    """Poll a peer's health service until it reports SERVING (True).

    False when ``timeout`` seconds pass or ``give_up()`` says so first (the
    peer's process died, the user pressed Ctrl-C): the caller knows why.
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
    with grpc.insecure_channel(address, options=options) as channel:
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
