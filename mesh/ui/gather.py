"""What ``mesh ui`` asks the mesh: each peer's health, and its durable flows.

The only I/O of the ui besides serving HTTP. Health is the gRPC health service each
peer serves, asked with the config's own transport (TLS, token), as ``mesh health``
does; flows come from :mod:`mesh.tools.flows`, the same guarded inspection RPCs as
``mesh flows``, so the page can never see more than that command. Answers are kept
for :data:`FRESH` seconds: many open pages polling once a second ask each peer once.
Blocking calls; the web app runs them on worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh import analysis
from mesh.config import Config
from mesh.errors import MeshError
from mesh.peer import SERVICE_NAME
from mesh.registry import default_registry, import_services
from mesh.tools import flows
from mesh.transport import Transport
from mesh.ui import model

__all__ = ["FRESH", "Gather"]

#: Seconds an answer is reused before the peers are asked again.
FRESH = 0.5
#: Seconds a health probe waits for a peer's answer.
PROBE_TIMEOUT = 1.0

T = TypeVar("T")


class Gather:
    """Asks the peers of ``config``; one per ``mesh ui`` process, shared by its requests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mesh-ui")
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._check: tuple[analysis.Check | None, str] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _fresh(self, key: str, make: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < FRESH:
            value: T = hit[1]
            return value
        value = make()
        with self._lock:
            now = time.monotonic()
            self._cache[key] = (now, value)
            # Pages of flows long closed: forget their answers.
            for stale in [k for k, (at, _) in self._cache.items() if now - at > 60 * FRESH]:
                del self._cache[stale]
        return value

    def forget(self) -> None:
        """Ask again next time (after cancelling or retrying a flow)."""
        with self._lock:
            self._cache.clear()

    # -- health --------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        """Each dialled address of every machine with a peer: SERVING, NOT_SERVING, …"""
        return self._fresh("health", self._ask_health)

    def _ask_health(self) -> dict[str, str]:
        rows = model.machine_rows(self.config, {}, {})
        targets = [(row.machine, row.dial) for row in rows if row.dial]
        answers = self._pool.map(lambda t: (t[1], self._probe(*t)), targets)
        return dict(answers)

    def _probe(self, machine: str, address: str) -> str:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                options = [
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ]
                # As `mesh health` asks: with the machine's own transport (TLS, token).
                transport = Transport.of(self.config, machine)
                channel = transport.open_channel(machine, address, options)
                self._channels[address] = channel
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        try:
            reply = stub.Check(request, timeout=PROBE_TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                return "unreachable"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "no answer"
            return f"error: {code.name.lower() if code else 'unknown'}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # -- the flow file -------------------------------------------------------------------

    def check(self) -> tuple[analysis.Check | None, str]:
        """What ``mesh check`` finds (its services imported once), or why it could not run."""
        with self._lock:
            if self._check is not None:
                return self._check
        try:
            import_services(self.config)
            found: tuple[analysis.Check | None, str] = (
                analysis.check(self.config, default_registry),
                "",
            )
        except MeshError as exc:
            found = (None, str(exc))
        with self._lock:
            self._check = found
        return found

    # -- durable flows -------------------------------------------------------------------

    def flows(self) -> tuple[list[Any], list[str]]:
        """Every durable flow on every peer, and the peers that did not answer."""
        return self._fresh("flows", lambda: self._named(flows.list_flows))

    def flows_at(self) -> dict[str, int]:
        """Flows running or waiting per ``machine@address``."""
        found, _ = self._fresh("flows_at", lambda: self._named(flows.machine_flows))
        return dict(found)

    def flow(self, flow_id: str) -> tuple[Any, list[str]]:
        """One flow in full (``FlowNotFound`` when no peer holds it)."""
        return self._fresh(f"flow:{flow_id}", lambda: self._named(flows.show_flow, flow_id))

    def cancel(self, flow_id: str) -> Any:
        try:
            return flows.cancel_flow(self.config, flow_id)
        finally:
            self.forget()

    def retry(self, flow_id: str) -> Any:
        try:
            return flows.retry_flow(self.config, flow_id)
        finally:
            self.forget()

    def _named(self, call: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
        """``call(config, *args)`` and the peers it says it could not reach."""
        value = call(self.config, *args)
        return value, [str(p) for p in getattr(value, "unreachable", None) or ()]
