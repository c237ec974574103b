"""A process's place in the mesh: one machine of one config.

``mesh.connect()`` builds the :class:`Node` every other entry point uses: it
loads the config and the flow files, imports the services (which register
handlers), checks the handlers against the flows, and makes the structlog
processor route for this machine. ``node.start`` originates flows;
``node.serve`` / ``node.stop`` embed this machine's peer in the process.
"""

from __future__ import annotations

import contextvars
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog

from mesh import deadlines
from mesh import processors as _processors
from mesh.config import Config, find_config, load_config
from mesh.dialer import Dialer
from mesh.errors import ConfigError, MeshError
from mesh.flowfile import Flow, FlowSet
from mesh.logconfig import chain_problem, configure_logging
from mesh.peer import Abandoned, Server
from mesh.registry import Handler, Registry, default_registry, import_services
from mesh.result import FlowResult
from mesh.runtime import FlowState, activate, advance, current, finish
from mesh.transport import Transport
from mesh.wire import as_steps, check_values


class Node:
    """One machine of a mesh, in this process."""

    def __init__(
        self,
        config: Config,
        machine: str,
        registry: Registry | None = None,
        *,
        outside: bool = False,
    ) -> None:
        # ``outside``: a caller that is no machine of the mesh (``mesh call``), which
        # sends line 0 to its owner and is never handed a line back.
        if machine not in config.machines and not outside:
            known = ", ".join(config.machines) or "none"
            raise ConfigError(
                f"{config.path}: machine {machine!r} is not in [machines] (known: {known})"
            )
        self.config = config
        self.machine = machine
        self.flows: FlowSet = config.flows
        self.handlers: dict[str, tuple[Handler | None, ...]] = (registry or default_registry).table(
            config.flows
        )
        self.transport = Transport.of(config, machine)
        self.dialer = Dialer(config.machines, self.transport)
        self._server: Server | None = None

    def __repr__(self) -> str:
        return f"<mesh.Node {self.machine} of {self.config.path}>"

    # -- originating flows -------------------------------------------------

    def new_state(
        self, flow: Flow, context: Mapping[str, Any], timeout: float | None = None
    ) -> FlowState:
        """A fresh flow, originated here."""
        seconds = self.config.timeout if timeout is None else deadlines.seconds(timeout)
        return FlowState(
            self, flow, uuid.uuid4().hex, dict(context), time.monotonic() + seconds, ()
        )

    def start(self, request: str, /, *, timeout: float | None = None, **context: Any) -> FlowResult:
        """Run flow ``request`` from its line 0 until it is done; return its result.

        Keyword arguments are the initial context; ``timeout`` (seconds) is the
        whole flow's deadline, default the config's. Raises FlowError for a failed
        step, PeerUnavailable / PeerRefused for a peer, FlowTimeout at the deadline.
        """
        return self.start_with(request, context, timeout=timeout)

    def start_with(
        self, request: str, context: Mapping[str, Any], *, timeout: float | None = None
    ) -> FlowResult:
        """:meth:`start` with the context as a mapping, for keys that are not
        identifiers or clash with ``timeout`` (``mesh call`` uses it)."""
        flow = self.flows.flows.get(request)
        if flow is None:
            known = ", ".join(self.flows) or "none"
            raise ConfigError(f"no flow {request!r} in the flow files (known: {known})")
        if timeout is not None:
            timeout = deadlines.seconds(timeout)  # refused before anything runs
        check_values(context)
        state = self.new_state(flow, context, timeout)
        return contextvars.copy_context().run(self._run, state)

    def _run(self, state: FlowState) -> FlowResult:
        activate(state)
        try:
            advance(state, 0)
        finally:
            finish(state)
        return FlowResult(
            state.flow.name,
            state.flow_id,
            state.context,
            as_steps(state.steps),
            state.flow.secrets,
        )

    # -- serving -------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.config.machines[self.machine].address

    def serve(self, listen: str | None = None) -> int:
        """Start this machine's peer in the background; returns the bound port."""
        if self._server is not None:
            raise MeshError(f"{self.machine} is already serving on {self._server.listen}")
        bind = listen or self.config.machines[self.machine].listen
        if not bind:
            raise ConfigError(
                f"{self.config.path}: machine {self.machine!r} has no address, so it cannot"
                " serve; give it one in [machines]"
            )
        self._server = Server(self, bind)
        return int(self._server.port)

    def stop(self, grace: float | None = None) -> list[Abandoned]:
        """Stop serving: NOT_SERVING first, then give steps in progress ``grace`` seconds
        (default the config's). Returns the steps still running after it, abandoned: their
        callers were told this machine stopped while running them (see Server.stop)."""
        if self._server is None:
            return []
        server, self._server = self._server, None
        return server.stop(self.config.grace if grace is None else grace)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True when it stopped."""
        return True if self._server is None else bool(self._server.wait(timeout))

    def close(self) -> None:
        """Stop serving, close channels, and stop routing this process's logs."""
        self.stop(0)
        self.dialer.close()
        _processors.uninstall(self)
        state = current.get()
        if state is not None and state.node is self:  # an inline flow left unfinished here
            finish(state)
            current.set(None)


def connect(
    config: str | os.PathLike[str] | None = None,
    *,
    machine: str,
    registry: Registry | None = None,
) -> Node:
    """Join the mesh as ``machine``: load the config, import services, route logs.

    ``config`` defaults to ``$MESH_CONFIG``, else ``./mesh.toml``. When structlog
    is not configured yet, :func:`mesh.configure_logging` is applied; when it is
    configured without :data:`mesh.processor`, that is an error, because flow
    lines and ``"next"`` would silently do nothing.
    """
    cfg = load_config(find_config(config))
    import_services(cfg)
    node = Node(cfg, machine, registry)
    if not structlog.is_configured():
        configure_logging()
    else:
        problem = chain_problem()
        if problem:
            raise ConfigError(problem)
    _processors.install(node)
    return node


def current_context() -> dict[str, Any]:
    """The context of the flow active here (after it is done: its final context).

    Raises FlowViolation-free ``MeshError`` when no flow has run in this context.
    """
    state = current.get()
    if state is None:
        raise MeshError("no flow is active here: log a flow's line 0 or use node.start()")
    return state.context
