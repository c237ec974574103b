"""A process's place in the mesh: one machine of one config.

``mesh.connect()`` builds the :class:`Node` every other entry point uses: it
loads the config and the flow files, imports the services (which register
handlers), checks the handlers against the flows, and makes the structlog
processor route for this machine. ``node.start`` (or ``await node.start_async``)
originates flows; ``node.serve`` / ``node.stop`` embed this machine's peer in the
process.

A node's network work happens on an event loop of its own, in a thread it starts
when it first needs it: its links to other machines (mesh/links.py), its server
(mesh/peer.py) and ``async def`` handlers. Synchronous handlers run on its worker
threads (mesh/workers.py); ``node.start`` and inline code run in the caller's
thread and wait for the loop when the flow leaves this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from mesh import control as _control  # noqa: F401 - registers itself with the runtime
from mesh import deadlines, tracing
from mesh import processors as _processors
from mesh.config import Config, find_config, load_config
from mesh.durable import Waits, deadline_left
from mesh.errors import ConfigError, FlowError, FlowNotFound, FlowTimeout, MeshError
from mesh.flowfile import Flow, FlowSet
from mesh.journal import Journal, Stay
from mesh.journals import open_journal
from mesh.links import Answer, Links
from mesh.logconfig import chain_problem, configure_logging
from mesh.peer import Abandoned, Server
from mesh.registry import Handler, Registry, default_registry, import_services
from mesh.result import FlowResult
from mesh.runtime import (
    FlowState,
    current,
    finish,
    originate,
    originate_async,
    resume_origin,
)
from mesh.transport import Transport
from mesh.v1 import mesh_pb2 as _pb2
from mesh.versions import VersionStore
from mesh.wire import as_steps, check_values, failure_to_error, load_context
from mesh.workers import BorrowedLoop, EventLoop, LoopThread, Workers

T = TypeVar("T")


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
        self._registry = registry or default_registry
        #: Earlier flow files this machine served (kept when it journals: keep_versions).
        self.versions: VersionStore | None = None
        self._kept_handlers: dict[str, tuple[Handler | None, ...]] = {}
        self.handlers: dict[str, tuple[Handler | None, ...]] = (registry or default_registry).table(
            config.flows
        )
        self.transport = Transport.of(config, machine)
        self._addresses = {name: m.address for name, m in config.machines.items()}
        self._server: Server | None = None
        self._loop: EventLoop | None = None
        self._links: Links | None = None
        self._workers: Workers | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Calls this node's flows are waiting on below, now: a peer's limit on the steps it
        # runs (max_calls) does not count a flow that waits for another machine.
        self.waiting_below = 0
        # Durable flows (mesh/journal.py): the machine's journal, opened when first needed,
        # and why durable flows wait here for another machine.
        self._journal: Journal | None = None
        self.waits = Waits()
        self._recovering: set[str] = set()
        self._closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<mesh.Node {self.machine} of {self.config.path}>"

    # -- what a flow needs of its machine (runtime.Place) ---------------------------

    @property
    def strict(self) -> bool:
        return self.config.strict

    @property
    def max_message_bytes(self) -> int:
        return self.config.max_message_bytes

    @property
    def address(self) -> str:
        """This machine's own address (where others dial it)."""
        return self._addresses.get(self.machine, "")

    def address_of(self, machine: str) -> str:
        return self._addresses.get(machine, "")

    def unavailable_hint(self, machine: str, details: str) -> str:
        return self.transport.unavailable_hint(machine, details)

    def new_state(
        self, flow: Flow, context: Mapping[str, Any], timeout: float | None = None
    ) -> FlowState:
        """A fresh flow, originated here."""
        seconds = self.config.timeout if timeout is None else deadlines.seconds(timeout)
        return FlowState(
            self,
            flow,
            uuid.uuid4().hex,
            dict(context),
            time.monotonic() + seconds,
            (),
            trace=tracing.started_here(),
        )

    def call(
        self,
        machine: str,
        payload: bytes,
        deadline: float,
        traceparent: str,
        *,
        patient: str = "",
    ) -> Answer:
        # The link's own timer answers by the deadline; the wait here is a safety net.
        wait = max(deadline - time.monotonic(), 0.0) + 10.0
        return self.run_on_loop(
            self.call_async(machine, payload, deadline, traceparent, patient=patient), wait
        )

    async def call_async(
        self,
        machine: str,
        payload: bytes,
        deadline: float,
        traceparent: str,
        *,
        patient: str = "",
    ) -> Answer:
        links = self._links
        if links is None:
            links = self._links = Links(
                self._addresses,
                self.transport.link_channel,
                self.transport.link_metadata(),
                window=self.config.link_window,
            )
        self.waiting_below += 1
        try:
            if not patient:
                return await links.call(machine, payload, deadline, traceparent)
            waits = self.waits

            def waiting(address: str, problem: str) -> None:
                waits.waiting(patient, machine, address, problem)

            try:
                return await links.call(machine, payload, deadline, traceparent, waiting=waiting)
            finally:
                waits.reached(patient)
        finally:
            self.waiting_below -= 1

    # -- durable flows ---------------------------------------------------------------

    def durable(self, request: str) -> bool:
        """Whether flows of ``request`` are journaled (``durable`` in mesh.toml)."""
        return request in self.config.durable

    @property
    def journal(self) -> Journal:
        """This machine's journal, opened (and recovered from) on first use."""
        journal = self._journal
        if journal is None:
            with self._lock:
                journal = self._journal
                if journal is None:
                    journal = self._journal = open_journal(
                        self.config.journal_url(self.machine),
                        synchronous=self.config.journal.synchronous,
                        machine=self.machine,
                    )
        return journal

    def keep_versions(self) -> VersionStore:
        """Keep this config's flow files beside the journal, with the earlier ones this
        machine served, so flows that started on an earlier file finish on it here."""
        url = self.config.journal_url(self.machine)
        folder = (
            Path(url[len("sqlite:///") :]).parent
            if url.startswith("sqlite:///")
            else self.config.root / ".mesh-data"
        )
        store = VersionStore(folder / f"{self.machine}.versions")
        store.remember(self.flows.paths)
        self.versions = store
        return store

    def flow_version(self, request: str, digest: str) -> Flow | None:
        """Version ``digest`` of ``request``: the config's, or a kept one; None if neither."""
        flow = self.flows.flows.get(request)
        if flow is not None and flow.digest == digest:
            return flow
        return self.versions.flow(request, digest) if self.versions is not None else None

    def handlers_of(self, flow: Flow) -> tuple[Handler | None, ...]:
        if self.flows.flows.get(flow.name) is flow:
            return self.handlers[flow.name]
        known = self._kept_handlers.get(flow.digest)
        if known is None:
            # A kept version: the same code's handlers, by each line's text.
            table = self._registry.table(FlowSet({flow.name: flow}, ()))
            known = self._kept_handlers[flow.digest] = table[flow.name]
        return known

    def journal_for(self, request: str) -> Journal | None:
        """The journal for a flow of ``request`` here, None when it is not durable."""
        if request not in self.config.durable:
            return None
        return self.journal

    def recover_origins(self, orphans: Iterable[Stay] | None = None) -> list[str]:
        """Go on, in the background, with the durable flows a dead process of this machine
        started and did not finish (an address-less originator calls it on connect, a
        peer when it starts; ``orphans``: the journal's, when the caller has just read
        them). Returns their flow ids."""
        if not self.config.durable:
            return []
        journal = self.journal
        resumed: list[str] = []
        for stay in journal.orphans() if orphans is None else orphans:
            if not stay.origin or stay.flow_id in self._recovering:
                continue
            if self.flow_version(stay.request, stay.digest) is None:
                continue
            if not journal.claim(stay.flow_id, stay.line):
                continue
            resumed.append(stay.flow_id)
            self._recovering.add(stay.flow_id)
            self.loop().submit(self._resume_origin(stay))
        return resumed

    async def _resume_origin(self, stay: Stay) -> None:
        flow = self.flow_version(stay.request, stay.digest)
        assert flow is not None  # recover_origins checked
        left = deadline_left(stay)
        state = FlowState(
            self, flow, stay.flow_id, load_context(stay.last_context()), time.monotonic() + left, ()
        )
        state.journal = self.journal
        state.stay = 0
        state.origin = True
        # The lines it ran here before, for its result's timeline (the machines below
        # report theirs again in the reply to the call resent).
        state.steps = list(self.journal.local_steps(stay.flow_id, 0))
        state.recorded = len(state.steps)
        pending = (stay.call_machine, stay.call) if stay.call and stay.call_machine else None
        try:
            await asyncio.get_running_loop().create_task(
                resume_origin(state, stay.position, pending), context=contextvars.Context()
            )
        finally:
            self._recovering.discard(stay.flow_id)

    def result(self, flow_id: str, /, *, timeout: float | None = None) -> FlowResult:
        """The result of durable flow ``flow_id`` started by this machine (by this process
        or another, even one that was killed), waiting up to ``timeout`` seconds (default
        the request's timeout) for it to finish. Raises the flow's error if it failed,
        FlowNotFound if this machine's journal does not know it, FlowTimeout if it is not
        done in time."""
        if not self.config.durable:
            raise FlowNotFound(f"{self.machine}: no request is durable, so no flow is journaled")
        journal = self.journal
        self.recover_origins()
        stay = journal.stay(flow_id, 0)
        if stay is None or not stay.origin:
            raise FlowNotFound(
                f"{self.machine}: no durable flow {flow_id} was started here"
                f" (journal {journal.where})"
            )
        flow = self.flows.flows.get(stay.request)
        wait = self.config.timeout_of(stay.request) if timeout is None else timeout
        end = time.monotonic() + deadlines.seconds(wait)
        while stay is not None and stay.state == "running":
            if time.monotonic() >= end:
                raise FlowTimeout(
                    f"{stay.request} flow {flow_id} is not done after {wait:g} s (still"
                    f" running, at line {stay.position})",
                    request=stay.request,
                    flow_id=flow_id,
                    machine=self.machine,
                    line_index=stay.position,
                )
            time.sleep(0.05)
            stay = journal.stay(flow_id, 0)
        assert stay is not None
        lines = tuple(line.text for line in flow.lines) if flow is not None else ()
        secrets = flow.secrets if flow is not None else frozenset()
        if stay.state == "cancelled" or stay.outcome is None:
            raise FlowError(
                f"{stay.request} flow {flow_id} was {stay.state}: {stay.error or 'no result'}",
                request=stay.request,
                flow_id=flow_id,
                machine=self.machine,
                line="",
                line_index=stay.position,
                error_type="Cancelled",
            )
        reply = _pb2.ContinueReply.FromString(stay.outcome)
        if reply.WhichOneof("outcome") == "failed":
            raise failure_to_error(reply.failed, request=stay.request, flow_id=flow_id, lines=lines)
        return FlowResult(
            stay.request,
            flow_id,
            load_context(reply.done.context),
            as_steps([reply.steps]),
            secrets,
        )

    def run_on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            loop = self.loop()
        except MeshError:
            coro.close()
            raise
        if threading.current_thread() is loop.thread:
            coro.close()
            raise MeshError(
                f"{self.machine}: blocking mesh call on the node's own event loop (an async"
                " handler logging a flow's lines itself, or calling node.start?); use"
                " await node.start_async(...) there"
            )
        return loop.call(coro, timeout)

    def run_in_worker(
        self, context: contextvars.Context, fn: Callable[..., T], *args: Any
    ) -> Awaitable[T]:
        workers = self._workers
        if workers is None:
            workers = self._workers = Workers(
                self.loop().loop, self.config.workers, f"mesh-{self.machine}"
            )
        return workers.run(context, fn, *args)

    def loop(self) -> EventLoop:
        """The node's event loop: a thread of its own, started on first use, or the
        application's loop it was connected on (:func:`connect_async`)."""
        loop = self._loop
        if loop is None:
            with self._lock:
                if self._closed:
                    raise MeshError(f"{self!r} is closed")
                loop = self._loop
                if loop is None:
                    loop = self._loop = LoopThread(f"mesh-{self.machine}-loop")
        elif loop.closed:
            raise MeshError(
                f"{self!r}: the event loop it was connected on (mesh.connect_async) has"
                " closed; connect again from the loop that uses it"
            )
        return loop

    def borrow_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run this node's links, flows and async handlers on ``loop``, the application's
        running loop, instead of a thread of the node's own (see :func:`connect_async`)."""
        with self._lock:
            if self._loop is not None:
                raise MeshError(f"{self!r} already runs on an event loop of its own")
            self._loop = BorrowedLoop(loop)

    # -- originating flows -------------------------------------------------------------

    def _state(self, request: str, context: Mapping[str, Any], timeout: float | None) -> FlowState:
        flow = self.flows.flows.get(request)
        if flow is None:
            known = ", ".join(self.flows) or "none"
            raise ConfigError(f"no flow {request!r} in the flow files (known: {known})")
        if timeout is not None:
            timeout = deadlines.seconds(timeout)  # refused before anything runs
        check_values(context)
        journal = None
        if request in self.config.durable and self.machine in self.config.machines:
            journal = self.journal
            if timeout is None:
                timeout = self.config.timeout_of(request)
        elif timeout is None and request in self.config.request_timeouts:
            timeout = self.config.timeout_of(request)
        state = self.new_state(flow, context, timeout)
        if journal is not None:
            state.journal = journal
            state.stay = 0
            state.origin = True
        return state

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
        state = self._state(request, context, timeout)
        return contextvars.copy_context().run(originate, state)

    async def start_async(
        self, request: str, /, *, timeout: float | None = None, **context: Any
    ) -> FlowResult:
        """:meth:`start` for asyncio code (FastAPI and friends): the flow runs on the node's
        event loop, and the calling task waits without holding a thread."""
        return await self.start_async_with(request, context, timeout=timeout)

    async def start_async_with(
        self, request: str, context: Mapping[str, Any], *, timeout: float | None = None
    ) -> FlowResult:
        """:meth:`start_async` with the context as a mapping (see :meth:`start_with`)."""
        state = self._state(request, context, timeout)
        loop = self.loop()
        coro = originate_async(state)
        if asyncio.get_running_loop() is loop.loop:
            return await asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        return await asyncio.wrap_future(loop.submit(coro))

    # -- serving -------------------------------------------------------------------------

    def serve(self, listen: str | None = None) -> int:
        """Start this machine's peer in the background; returns the bound port."""
        self._server = Server(self, self._bind(listen))
        return int(self._server.port)

    async def serve_async(self, listen: str | None = None) -> int:
        """:meth:`serve` from asyncio code, on the node's loop (a node of
        :func:`connect_async` serves on the application's loop); returns the bound port."""
        if asyncio.get_running_loop() is not self.loop().loop:
            return await asyncio.to_thread(self.serve, listen)
        self._server = await Server.started(self, self._bind(listen))
        return int(self._server.port)

    def _bind(self, listen: str | None) -> str:
        if self._server is not None:
            raise MeshError(f"{self.machine} is already serving on {self._server.listen}")
        bind = listen or self.config.machines[self.machine].listen
        if not bind:
            raise ConfigError(
                f"{self.config.path}: machine {self.machine!r} has no address, so it cannot"
                " serve; give it one in [machines]"
            )
        return bind

    def stop(self, grace: float | None = None) -> list[Abandoned]:
        """Stop serving: NOT_SERVING first, then give steps in progress ``grace`` seconds
        (default the config's). Returns the steps still running after it, abandoned: their
        callers were told this machine stopped while running them (see Server.stop)."""
        if self._server is None:
            return []
        server, self._server = self._server, None
        return server.stop(self.config.grace if grace is None else grace)

    async def stop_async(self, grace: float | None = None) -> list[Abandoned]:
        """:meth:`stop` from asyncio code, on the node's loop."""
        if self._server is None:
            return []
        if asyncio.get_running_loop() is not self.loop().loop:
            return await asyncio.to_thread(self.stop, grace)
        server, self._server = self._server, None
        return await server.stop_async(self.config.grace if grace is None else grace)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True when it stopped."""
        return True if self._server is None else bool(self._server.wait(timeout))

    def close(self) -> None:
        """Stop serving, close links, and stop routing this process's logs.

        On the loop of a node connected with :func:`connect_async`, the links are closed
        by a task of that loop (nothing may block it); ``await node.aclose()`` waits for
        them."""
        self.stop(0)
        with self._lock:
            self._closed = True
            loop, self._loop = self._loop, None
        if loop is not None:
            links, self._links = self._links, None
            if links is not None and not loop.closed:
                if threading.current_thread() is loop.thread:
                    # Kept: a task nothing refers to may be collected before it ends.
                    self._closing = loop.loop.create_task(links.close())
                else:
                    with contextlib.suppress(Exception):  # the loop is going away either way
                        loop.call(links.close(), 5.0)
            if self._workers is not None:
                self._workers.stop()
            loop.stop()
        self._release()

    async def aclose(self) -> None:
        """:meth:`close` for asyncio code, on the node's loop: its links are closed when
        it returns."""
        await self.stop_async(0)
        links = self._links if self._loop is not None and not self._loop.closed else None
        if links is not None and asyncio.get_running_loop() is self.loop().loop:
            self._links = None
            await links.close()
        self.close()

    def _release(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()
        _processors.uninstall(self)
        state = current.get()
        if state is not None and state.place is self:  # an inline flow left unfinished here
            finish(state)
            current.set(None)


async def _in_context(state: FlowState) -> FlowResult:
    """``originate_async(state)`` in a task of a fresh context (from another thread,
    run_coroutine_threadsafe makes the outer task in a copy of that thread's)."""
    return await asyncio.get_running_loop().create_task(
        originate_async(state), context=contextvars.Context()
    )


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
    return _connect(config, machine, registry, None)


async def connect_async(
    config: str | os.PathLike[str] | None = None,
    *,
    machine: str,
    registry: Registry | None = None,
) -> Node:
    """:func:`connect` for an asyncio application: the node runs on the calling event loop.

    Its links, the flows it starts with ``await node.start_async(...)`` and its
    ``async def`` handlers run on this loop, as tasks of the application's, instead of
    on a thread of the node's own that every flow is handed to and back from. Plain
    handlers still run on worker threads. Blocking calls (``node.start``, inline
    flows, ``node.serve``) work from other threads while the loop runs, and are refused
    on the loop itself. Close it with ``await node.aclose()`` before the loop ends; a
    node whose loop has closed refuses to be used.
    """
    return _connect(config, machine, registry, asyncio.get_running_loop())


def _connect(
    config: str | os.PathLike[str] | None,
    machine: str,
    registry: Registry | None,
    loop: asyncio.AbstractEventLoop | None,
) -> Node:
    cfg = load_config(find_config(config))
    import_services(cfg)
    node = Node(cfg, machine, registry)
    if loop is not None:
        node.borrow_loop(loop)
    if not structlog.is_configured():
        configure_logging()
    else:
        problem = chain_problem()
        if problem:
            raise ConfigError(problem)
    _processors.install(node)
    if cfg.durable and not cfg.machines[machine].address:
        # An address-less originator: the durable flows a dead process of it started go
        # on now (a peer does the same as it starts).
        node.recover_origins()
    return node


def current_context() -> dict[str, Any]:
    """The context of the flow active here (after it is done: its final context).

    Raises FlowViolation-free ``MeshError`` when no flow has run in this context.
    """
    state = current.get()
    if state is None:
        raise MeshError("no flow is active here: log a flow's line 0 or use node.start()")
    return state.context
