"""grpc.health.v1 for a peer: ``Check``, ``List`` and ``Watch``, with a stop that cannot hang.

Peers serve health so that callers' ``round_robin`` skips a replica that is down
or draining (``healthCheckConfig`` in dialer.py: every channel to a peer keeps a
``Watch`` open). grpcio-health-checking's own servicer sends each status change
while holding its lock, and each send waits for gRPC's polling thread; that
thread, when a watcher goes away at the same moment, runs the servicer's close
callback, which waits for the same lock. The two wait for each other for good,
and a peer stopping while callers disconnect never exits (grpc/grpc, the health
servicer's lock order). Here a status change is recorded under a lock and sent
after it is released; a second lock, which the polling thread never takes, keeps
every watcher's updates in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

#: gRPC's callback for a streaming reply: a message to send (None ends the stream);
#: it returns once gRPC has sent it, False when the call has ended.
Send = Callable[[Any], object]


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Statuses by service name; ``""`` is the server as a whole."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the statuses and watchers; never held while sending
        self._sending = threading.Lock()  # one status change at a time, so watchers see order
        self._status: dict[str, int] = {}
        self._watchers: dict[str, set[Send]] = {}
        self._stopping = False

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            statuses = dict(self._status)
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )

    def Watch(
        self, request: Any, context: grpc.ServicerContext, send_response_callback: Send
    ) -> None:
        """Send the status now and on every change, without holding a worker thread."""
        service = request.service
        send = send_response_callback
        with self._sending:
            with self._lock:
                status = self._status.get(service, SERVICE_UNKNOWN)
                self._watchers.setdefault(service, set()).add(send)
            send(health_pb2.HealthCheckResponse(status=status))
        # Runs on gRPC's polling thread when the call ends: it takes the short lock only.
        if not context.add_callback(partial(self._unwatch, service, send)):
            self._unwatch(service, send)

    def _unwatch(self, service: str, send: Send) -> None:
        with self._lock:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(send)

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers (ignored once stopping)."""
        with self._sending:
            with self._lock:
                if self._stopping:
                    return
                self._status[service] = status
                watchers = list(self._watchers.get(service, ()))
            _tell(watchers, status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good: watchers stop sending this server calls."""
        with self._sending:
            with self._lock:
                if self._stopping:
                    return
                self._stopping = True
                watchers: list[Send] = []
                for service in self._status:
                    self._status[service] = NOT_SERVING
                    watchers += self._watchers.get(service, ())
            _tell(watchers, NOT_SERVING)


def _tell(watchers: list[Send], status: int) -> None:
    for send in watchers:
        send(health_pb2.HealthCheckResponse(status=status))


# gRPC calls a method with this attribute with a callback to send its replies through,
# on a worker thread that is free again as soon as the method returns.
setattr(Health.Watch, "experimental_non_blocking", True)  # noqa: B010 - a function attribute
