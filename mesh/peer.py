"""The gRPC servicer of one machine, and its server's lifecycle.

A peer serves the mesh service on the node's event loop: the unary ``Continue``, for
callers outside the mesh, and ``Link`` streams, over which other peers multiplex
their calls. Both go through the same door: the guard admits a call (mesh/guard.py),
the reply record answers a resend (mesh/dedup.py), and the runtime serves it
(``mesh.runtime.serve``) as a task of its own. A flow waiting for a reply from below
is that task, suspended: it holds no thread.

No Python exception crosses the wire: a refusal is a status (unary) or a ``refused``
frame (link), a step's failure a ``Failure`` in the reply.

Callers that go away. A call's task belongs to whoever waits for it: the caller
that sent it, and any resend of it (a link that broke and was dialled again). When
the last of them goes away (a unary call cancelled, a link broken), the step keeps
going for ``deadlines.ADOPT_WINDOW`` seconds, for a resend to adopt it; then it is
stopped, its next ``"next"`` fails, and nothing further runs for it. A ``cancel``
frame stops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as _reflection
from grpc_reflection.v1alpha import reflection_pb2 as _reflection_pb2

from mesh import deadlines, frames, runtime
from mesh.config import Config
from mesh.dedup import Forgotten, Replayed, Replies, _Done, _Running
from mesh.durable import Waits, answer_flows, deadline_left, payload_of, steer
from mesh.errors import MeshError
from mesh.flowfile import Flow
from mesh.guard import Admitted, Guard, Refusal
from mesh.journal import Journal, Stay
from mesh.links import LINK_METHOD
from mesh.transport import LIMIT_KEY, Transport
from mesh.v1 import mesh_pb2 as _pb2
from mesh.versions import VersionStore
from mesh.wire import load_context

_log = structlog.get_logger("mesh")

SERVICE_NAME = "mesh.v1.Mesh"
CONTINUE_METHOD = f"/{SERVICE_NAME}/Continue"
HEALTH_SERVICE = "grpc.health.v1.Health"

#: Server reflection, under both names tools ask for (grpcurl tries v1, then v1alpha): the
#: two protos are the same messages in two packages, byte for byte, so one servicer
#: answers both.
REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)

#: Seconds a stopping server gives replies already computed to leave, once no step runs.
LAST_REPLIES = 1.0

#: Seconds a link's peer waits, after reading calls, before acknowledging them in a frame
#: of its own, when no reply has carried the acknowledgement by then.
ACK_DELAY = 0.005

_Key = tuple[str, int]


class Node(runtime.Place, Protocol):
    """What a peer needs of its node (mesh.node.Node), besides what a flow needs: a
    protocol, so that the node, which imports this module, is not imported back."""

    @property
    def config(self) -> Config: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def waiting_below(self) -> int:
        """Calls the node's flows wait on at another machine, now."""

    @property
    def journal(self) -> Journal:
        """The machine's journal of durable flows (opened on first use)."""

    @property
    def waits(self) -> Waits:
        """Why durable flows wait here for another machine."""

    def keep_versions(self) -> VersionStore:
        """Keep the config's flow files beside the journal (with earlier ones)."""

    def flow_version(self, request: str, digest: str) -> Flow | None:
        """A version of a request: the config's or a kept one."""

    def recover_origins(self, orphans: Iterable[Stay] | None = None) -> list[str]:
        """Go on with durable flows a dead process of this machine started."""


@dataclass(frozen=True, slots=True)
class Abandoned:
    """A step still running when its stopping peer's ``grace`` ran out."""

    request: str
    line_index: int
    flow_id: str

    def __str__(self) -> str:
        return f"{self.request} line {self.line_index} of flow {self.flow_id}"


class _Serving:
    """A step being served here: its task, and the callers waiting for its reply."""

    __slots__ = (
        "abandoned",
        "callers",
        "done",
        "durable",
        "expiry",
        "key",
        "reply",
        "request",
        "running",
        "state",
        "task",
        "waiters",
    )

    def __init__(self, key: _Key, request: Any, running: _Running) -> None:
        self.key = key
        self.request = request
        self.running = running
        self.callers = 0
        self.expiry: asyncio.TimerHandle | None = None
        # What the callers get, once done: the task's reply, or a failure if the peer
        # abandons the step; None when it was stopped with nobody waiting (there is none).
        self.done = False
        self.reply: bytes | None = None
        # Told at once when it is done (a link's frame out, a unary call's future): not
        # through a future's callbacks, each a turn of the event loop on every hop.
        self.waiters: list[Callable[[bytes | None], None]] = []
        self.state: runtime.FlowState | None = None  # the flow, once its task began
        self.task: asyncio.Task[None] | None = None
        self.abandoned = False
        # A durable flow's stay: its journal has it, so it goes on when its caller goes
        # away (the caller sends the call again, as often as it takes), and a stopping
        # peer leaves it to the next start rather than failing it.
        self.durable = False

    def began(self, state: runtime.FlowState) -> None:
        self.state = state

    def join(self) -> None:
        self.callers += 1
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def wait(self) -> asyncio.Future[bytes | None]:
        """A future of the reply, for a caller that awaits it (unary Continue)."""
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if self.done:
            future.set_result(self.reply)
        else:

            def settle(reply: bytes | None) -> None:
                if not future.done():
                    future.set_result(reply)

            self.waiters.append(settle)
        return future

    def finish(self, reply: bytes | None) -> None:
        self.done = True
        self.reply = reply
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter(reply)

    def stop(self, why: str) -> None:
        """Nobody waits for this step any more: its flow stops here (runtime.stop)."""
        if self.state is not None:
            runtime.stop(self.state, why)
        assert self.task is not None
        self.task.cancel(why)


class Peer:
    """Serves the mesh service for one machine of a node, on the node's event loop."""

    def __init__(self, node: Node, guard: Guard) -> None:
        self._node = node
        self.guard = guard
        config = node.config
        # Steps run here, so a resend gets the first reply instead of a second run.
        # Kept as the bytes sent: a reply is serialized once, for the record and the wire.
        self.replies: Replies[bytes] = Replies(
            config.dedup_size, config.dedup_age, config.dedup_bytes
        )
        self.serving: dict[_Key, _Serving] = {}
        self.links: set[_Inbound] = set()
        self.draining = False
        self._idle: asyncio.Event | None = None
        self._max_calls = config.max_calls
        self._durable = config.durable
        self._pruner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._shared: bool | None = None  # whether other live processes share the journal

    # -- the door, for both kinds of call ---------------------------------------------

    def begin(self, admitted: Admitted, timeout: float, traceparent: str) -> bytes | _Serving:
        """Start serving an admitted call, or join the step it repeats: the recorded reply
        (bytes), or the step being served (the caller :meth:`_Serving.join` s it).
        Raises :class:`Refusal` for a call the record refuses, or a peer stopping or busy."""
        request = admitted.request
        key = (request.flow_id, request.line_index)
        try:
            known = self.replies.lookup(
                request.flow_id, request.line_index, admitted.fingerprint, fresh=not key[1]
            )
        except (Replayed, Forgotten) as exc:
            raise _repeat_refusal(self._node.machine, request, exc) from None
        journal = None
        if known is None and request.request in self._durable:
            journal = self._node.journal
            # A stay a previous process of this machine ran: with a journal of this process
            # alone, the stay's accept record finds it (runtime.serve), and no read is paid
            # per call; one shared with other live processes (replicas) is asked first.
            if self._shared is None:
                self._shared = journal.shared or bool(
                    self._node.config.machines[self._node.machine].replicas
                )
            if self._shared:
                recorded = self._journaled_reply(journal, admitted)
                if recorded is not None:
                    return recorded
                resumed = self.serving.get(key)
                if resumed is not None:  # a dead replica's stay, resumed here just now
                    return resumed
        if known is not None:
            _repeated(self._node.machine, request)
            if type(known) is _Done:
                return known.reply  # type: ignore[return-value]
            return self.serving[key]
        me = self._node.machine
        if self.draining:
            # A new step goes to another replica (the caller sends it again there); a
            # resend of a step this peer ran or is running was answered above.
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"{me} is stopping")
        busy = len(self.serving) - self._node.waiting_below
        if busy >= self._max_calls:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{me} is running {busy:,} steps, its limit (max_calls in mesh.toml)",
            )
        running = self.replies.start(request.flow_id, request.line_index, admitted.fingerprint)
        deadline = deadlines.local_deadline(time.monotonic(), timeout)
        serving = self.serving[key] = _Serving(key, request, running)
        journaled = None
        if journal is not None:
            serving.durable = True
            journaled = runtime.Journaled(journal, admitted.fingerprint, bytes(admitted.raw))
        coro = runtime.serve(
            self._node,
            request,
            admitted.context,
            deadline,
            traceparent=traceparent,
            started=serving.began,
            journaled=journaled,
            flow=admitted.flow,
        )
        # A fresh context per call: nothing of one flow may leak into another.
        serving.task = asyncio.get_running_loop().create_task(
            self._serve(serving, coro), context=contextvars.Context()
        )
        return serving

    def _journaled_reply(self, journal: Any, admitted: Admitted) -> bytes | None:
        """The reply a durable stay gave before this process (it is in the journal, not in
        the record in memory): the very call that ran it gets it again, nothing runs; any
        other call naming it is refused as the record would."""
        request = admitted.request
        stay = journal.stay(request.flow_id, request.line_index)
        if stay is None:
            return None
        if stay.state == "running":
            # Not in this process's record: another process of this machine accepted it.
            # Dead (its lease lapsed): resume it here and answer this resend with it. Alive
            # or not yet known dead: refuse for now; the durable caller sends it again.
            if stay.fingerprint != admitted.fingerprint:
                raise _repeat_refusal(self._node.machine, request, Replayed(request.flow_id))
            if self._resume(journal, stay) is not None:
                return None  # serving now: begin() joins it
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"{self._node.machine}: {request.request} line {request.line_index} of flow"
                f" {request.flow_id} is running in another process of this machine",
            )
        if stay.fingerprint != admitted.fingerprint:
            raise _repeat_refusal(self._node.machine, request, Replayed(request.flow_id))
        _repeated(self._node.machine, request, journaled=True)
        if stay.outcome is None:
            return runtime.stopped_reply(self._node, request, f"the flow was {stay.state}")
        return stay.outcome  # type: ignore[no-any-return]

    def recover(self, orphans: Iterable[Stay] | None = None) -> int:
        """Go on with the durable stays a dead process of this machine accepted and did not
        finish, before this peer serves: each as if its call had just come (a resend of it
        joins it); a step whose outcome is recorded is not run again. How many."""
        node = self._node
        if not node.config.durable:
            return 0
        journal = node.journal
        count = 0
        for stay in journal.orphans() if orphans is None else orphans:
            if self._resume(journal, stay) is not None:
                count += 1
        return count

    def _resume(self, journal: Any, stay: Any) -> _Serving | None:
        """Claim one orphaned stay and serve it from its last record; None when it is not
        this peer's to resume (another process claimed it first, or it runs here)."""
        node = self._node
        if stay.origin or stay.payload is None:
            return None
        flow = node.flow_version(stay.request, stay.digest)
        if flow is None:
            return None
        key = (stay.flow_id, stay.line)
        if key in self.serving or not journal.claim(stay.flow_id, stay.line):
            return None
        request = payload_of(stay)
        steps = journal.local_steps(stay.flow_id, stay.line)
        running = self.replies.start(stay.flow_id, stay.line, stay.fingerprint or b"")
        serving = self.serving[key] = _Serving(key, request, running)
        serving.durable = True
        left = deadline_left(stay)
        deadline = deadlines.local_deadline(time.monotonic(), max(left, 0.0))
        journaled = runtime.Journaled(journal, stay.fingerprint or b"", stay.payload, stay, steps)
        coro = runtime.serve(
            node,
            request,
            load_context(stay.last_context()),
            deadline,
            started=serving.began,
            journaled=journaled,
            flow=flow,
        )
        serving.task = asyncio.get_running_loop().create_task(
            self._serve(serving, coro), context=contextvars.Context()
        )
        _log.info(
            "mesh.flow_recovered",
            flow_id=stay.flow_id,
            request=stay.request,
            line_index=stay.position,
            machine=node.machine,
            resend=stay.call_machine or "",
        )
        return serving

    def watch_orphans(self) -> None:
        """For a journal other processes share while this one runs (replicas on other hosts,
        one Postgres journal): take over, every second or so, what a replica that died
        accepted, once its lease has lapsed; not only at start."""
        node = self._node
        journal = node.journal

        async def every_second() -> None:
            loop = asyncio.get_running_loop()
            while True:
                await asyncio.sleep(1.0)
                try:
                    # The journal is asked off the loop: flows keep moving meanwhile.
                    orphans = await loop.run_in_executor(None, journal.orphans)
                    if orphans:
                        self.recover(orphans)
                        node.recover_origins(orphans)
                except MeshError as exc:
                    _log.warning("mesh.recover_failed", error=str(exc), machine=node.machine)

        self._watcher = asyncio.get_running_loop().create_task(every_second())

    def prune_soon(self) -> None:
        """Forget finished durable flows older than ``[journal] keep``, now and every hour,
        off the event loop; log the journal's size each time."""
        node = self._node

        def prune() -> None:
            journal = node.journal
            try:
                pruned = journal.prune(node.config.journal.keep)
            except MeshError as exc:
                _log.warning("mesh.journal_prune_failed", error=str(exc), machine=node.machine)
                return
            _log.info(
                "mesh.journal",
                machine=node.machine,
                journal=journal.where,
                bytes=journal.size(),
                pruned=pruned,
            )

        async def every_hour() -> None:
            loop = asyncio.get_running_loop()
            while True:
                await loop.run_in_executor(None, prune)
                await asyncio.sleep(3600)

        self._pruner = asyncio.get_running_loop().create_task(every_hour())

    async def _serve(self, serving: _Serving, coro: Coroutine[Any, Any, bytes]) -> None:
        """Run a step's task, then record its reply and give it to its callers at once; a
        step stopped for nobody leaves no reply (a resend would run it afresh)."""
        reply = None
        try:
            # Bytes of its own: a reply passed up from below is a view of the message it
            # came in, which the record must not keep alive (nor count short).
            reply = self.guard.bounded(serving.request, bytes(await coro))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # serve() answers every failure: a bug of ours
            _log.error("mesh.internal_error", error=repr(exc), exc_info=exc)
        finally:
            del self.serving[serving.key]
            if self._idle is not None and not self.serving:
                self._idle.set()
            if not serving.abandoned:  # else answered, and recorded, when it was abandoned
                self.replies.finish(
                    serving.key, serving.running, None if reply is None else (reply,)
                )
                serving.finish(reply)

    def leave(self, serving: _Serving, *, cancel: str = "") -> None:
        """A caller of ``serving`` stops waiting (``cancel``: it said so, with this reason)."""
        serving.callers -= 1
        if serving.callers > 0 or serving.done:
            return
        if cancel:
            serving.stop(cancel)
        elif serving.durable:
            return  # the caller will send it again; the journal keeps its reply meanwhile
        elif serving.expiry is None:
            serving.expiry = asyncio.get_running_loop().call_later(
                deadlines.ADOPT_WINDOW, self._orphaned, serving
            )

    def _orphaned(self, serving: _Serving) -> None:
        serving.expiry = None
        if serving.callers == 0 and not serving.done:
            serving.stop("caller gone")

    # -- unary Continue ---------------------------------------------------------------

    async def Continue(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        guard = self.guard
        try:
            guard.authenticate(context.invocation_metadata())
            admitted = guard.admit(raw, guard.certified(context))
            remaining = context.time_remaining()
            traceparent = _metadata(context, "traceparent")
            began = self.begin(
                admitted,
                self._node.config.timeout if remaining is None else remaining,
                traceparent,
            )
        except Refusal as refusal:
            guard.log(refusal, context.peer())
            await context.abort(refusal.code, refusal.message)
            raise AssertionError("unreachable: abort raises") from None
        if isinstance(began, bytes):
            return began
        serving = began
        serving.join()
        try:
            reply = await serving.wait()
        finally:
            self.leave(serving)  # also when this call was cancelled: its caller went away
        if reply is not None:
            return reply
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{self._node.machine}: {serving.request.request} line"
            f" {serving.request.line_index} was stopped: its caller gave up on it",
        )
        raise AssertionError("unreachable: abort raises")

    # -- durable flows: inspection and steering (mesh flows) ----------------------------

    async def Flows(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The stays of durable flows this machine's journal holds (behind the token)."""
        node = self._node
        request = _pb2.FlowsRequest.FromString(raw)
        if not node.config.durable:
            return _pb2.FlowsReply(machine=node.machine).SerializeToString()  # type: ignore[no-any-return]
        reply = answer_flows(node.journal, node.machine, node.flows, request, node.waits.as_map())
        return reply.SerializeToString()  # type: ignore[no-any-return]

    async def Steer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Cancel a durable flow's stays here, or run its failed ones again."""
        node = self._node
        request = _pb2.SteerRequest.FromString(raw)
        if request.action not in ("cancel", "retry"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"action must be cancel or retry, not {request.action!r}",
            )
        if not node.config.durable:
            return _pb2.SteerReply(changed=0).SerializeToString()  # type: ignore[no-any-return]
        journal = node.journal
        flow_id = request.flow_id
        if request.action == "retry":
            for stay in journal.stays(flow_id=flow_id):
                if stay.state in ("failed", "cancelled"):
                    self.replies.forget((stay.flow_id, stay.line))
        changed = steer(journal, request.action, flow_id)
        if request.action == "cancel":
            for key, serving in list(self.serving.items()):
                if key[0] == flow_id and not serving.done:
                    serving.abandoned = True
                    reply = runtime.stopped_reply(
                        node, serving.request, "cancelled by mesh flows cancel"
                    )
                    self.replies.finish(serving.key, serving.running, (reply,))
                    serving.finish(reply)
                    serving.stop("cancelled by mesh flows cancel")
        else:
            self.recover()
            node.recover_origins()
        _log.info("mesh.flow_steered", action=request.action, flow_id=flow_id, stays=changed)
        return _pb2.SteerReply(changed=changed).SerializeToString()  # type: ignore[no-any-return]

    # -- Link -------------------------------------------------------------------------

    async def Link(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        guard = self.guard
        metadata = context.invocation_metadata()
        try:
            guard.authenticate(metadata)
        except Refusal as refusal:
            guard.log(refusal, context.peer())
            await context.abort(refusal.code, refusal.message)
        limit = guard.limit
        theirs = _metadata(context, LIMIT_KEY)
        if theirs.isdigit():
            limit = min(limit, int(theirs))
        await context.send_initial_metadata(((LIMIT_KEY, str(guard.limit)),))
        link = _Inbound(self, context.peer(), guard.certified(context), limit)
        self.links.add(link)
        reader = asyncio.get_running_loop().create_task(link.read(requests))
        try:
            yield frames.batch([frames.ack(0)])  # the link is admitted
            if self.draining:
                link.going_away("stopping")
            out = link.out
            while True:
                # Every frame ready by now, in one message (see mesh/links.py).
                frame = await out.get()
                if frame is None:
                    return
                ready = [frame]
                while not out.empty():
                    more = out.get_nowait()
                    if more is None:
                        yield frames.batch(ready)
                        return
                    ready.append(more)
                yield frames.batch(ready)
        finally:
            reader.cancel()
            self.links.discard(link)
            link.closed()

    # -- stopping ---------------------------------------------------------------------

    async def drain(self, grace: float) -> list[Abandoned]:
        """Admit no new step; tell every link; give steps in progress ``grace`` seconds.

        A step still running then is abandoned, not handed on: its callers get a failure
        saying this machine stopped while running it (which no caller sends anywhere
        else), and its reply record says so to a resend. Returns the steps abandoned.
        """
        self.draining = True
        for link in list(self.links):
            link.going_away("stopping")
        if self.serving:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        abandoned: list[Abandoned] = []
        for serving in list(self.serving.values()):
            request = serving.request
            if serving.durable:
                # Journaled: the next start of this machine goes on with it, and its caller
                # sends the call again until then. Not failed, not answered.
                _log.info(
                    "mesh.flow_left",
                    flow_id=request.flow_id,
                    request=request.request,
                    line_index=request.line_index,
                    machine=self._node.machine,
                    reason="a durable flow: the next start of this machine goes on with it",
                )
                serving.abandoned = True
                continue
            step = Abandoned(request.request, request.line_index, request.flow_id)
            abandoned.append(step)
            _log.warning(
                "mesh.step_abandoned",
                flow_id=step.flow_id,
                request=step.request,
                line_index=step.line_index,
                machine=self._node.machine,
                reason=f"still running {grace:g} s after the stop began (grace); its caller"
                " was told it may have run, and it was not handed to another replica",
            )
            reply = runtime.stopped_reply(self._node, request, "grace ran out")
            serving.abandoned = True
            self.replies.finish(serving.key, serving.running, (reply,))
            serving.finish(reply)
            serving.stop("the peer stopped")
        if abandoned:
            await asyncio.sleep(0)  # their callers are answered
        for link in list(self.links):
            link.end()
        return abandoned


class _Inbound:
    """One link served here: its calls by id, and the frames to send back."""

    def __init__(self, peer: Peer, who: str, certified: frozenset[str] | None, limit: int) -> None:
        self._peer = peer
        self.who = who
        self._certified = certified
        self._limit = limit  # the largest reply the caller takes
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.calls: dict[int, _Serving] = {}
        self.received = 0  # every call up to this id has been read (and admitted or refused)
        self._acked = 0  # what the last frame sent told the caller
        self._ack: asyncio.TimerHandle | None = None
        self._eof = False
        self._ended = False

    async def read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for data in requests:
                try:
                    batch = [frames.split(frame) for frame in frames.unbatch(data)]
                except ValueError as exc:
                    self._peer.guard.log(
                        Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable frames: {exc}"),
                        self.who,
                    )
                    continue
                for parts in batch:
                    if parts.kind == frames.REQUEST:
                        self._request(parts)
                    elif parts.kind == frames.CANCEL:
                        serving = self.calls.pop(parts.call, None)
                        if serving is not None:
                            self._peer.leave(serving, cancel="cancelled by its caller")
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream broke: closed() releases its calls
            return
        self._eof = True  # the caller sends nothing more: answer what it sent, then end
        if not self.calls:
            self.end()

    def _request(self, parts: frames.Parts) -> None:
        call = parts.call
        self.received = max(self.received, call)
        peer = self._peer
        try:
            admitted = peer.guard.admit(parts.body, self._certified)
            began = peer.begin(admitted, parts.timeout, parts.traceparent)
        except Refusal as refusal:
            peer.guard.log(refusal, self.who)
            self._send(frames.refused(call, refusal.code.value[0], refusal.message, self.received))
            return
        if isinstance(began, bytes):
            self._send(frames.reply(call, self._fit(admitted, began), self.received))
            return
        began.join()
        self.calls[call] = began
        began.waiters.append(partial(self._answered, call, began))
        if self._ack is None:
            self._ack = asyncio.get_running_loop().call_later(ACK_DELAY, self._acknowledge)

    def _answered(self, call: int, serving: _Serving, reply: bytes | None) -> None:
        if self.calls.pop(call, None) is None:
            return  # cancelled by the caller, or the link is gone
        serving.callers -= 1
        if reply is None:
            self._send(
                frames.refused(
                    call,
                    grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
                    f"{serving.request.request} line {serving.request.line_index} was stopped"
                    " on this peer: its caller gave up on it",
                    self.received,
                )
            )
        else:
            reply = self._peer.guard.bounded(serving.request, reply, self._limit)
            self._send(frames.reply(call, reply, self.received))
        if self._eof and not self.calls:
            self.end()

    def _fit(self, admitted: Admitted, reply: bytes) -> bytes:
        return self._peer.guard.bounded(admitted.request, reply, self._limit)

    def _send(self, frame: bytes) -> None:
        if not self._ended:
            self._acked = self.received
            self.out.put_nowait(frame)
            if self._ack is not None:  # this frame carries the acknowledgement
                self._ack.cancel()
                self._ack = None

    def _acknowledge(self) -> None:
        self._ack = None
        if self.received > self._acked:
            self._send(frames.ack(self.received))

    def going_away(self, reason: str) -> None:
        self._send(frames.going_away(reason, self.received))

    def end(self) -> None:
        """Close the stream from this side, after the frames queued so far."""
        if not self._ended:
            self._ended = True
            self.out.put_nowait(None)

    def closed(self) -> None:
        """The stream is over: its calls lose this caller (a resend may adopt them)."""
        self._ended = True
        if self._ack is not None:
            self._ack.cancel()
        calls, self.calls = self.calls, {}
        for serving in calls.values():
            self._peer.leave(serving)


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def _repeated(machine: str, request: Any, **more: Any) -> None:
    """A call for a step that ran or runs here already: answered, not run again."""
    _log.info(
        "mesh.step_repeated",
        caller=request.via[-1] if request.via else "caller",
        flow_id=request.flow_id,
        request=request.request,
        line_index=request.line_index,
        machine=machine,
        **more,
    )


def _repeat_refusal(machine: str, request: Any, exc: Replayed | Forgotten) -> Refusal:
    """Refuse a call the record says is not a new step: say why, and nothing of the step."""
    flow_id = _cut(request.flow_id)
    fields = {
        "flow_id": request.flow_id,
        "request": request.request,
        "line_index": request.line_index,
    }
    if isinstance(exc, Replayed):
        return Refusal(
            grpc.StatusCode.ALREADY_EXISTS,
            f"{machine}: flow id {flow_id} is in use here by another call; a new flow needs a"
            " new flow id, and a retry must repeat its call exactly",
            caller=request.via[-1] if request.via else "",
            **fields,
        )
    return Refusal(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{machine}: {request.request} line {request.line_index} of flow {flow_id} ran here"
        " already, and its reply is no longer kept (dedup_bytes, dedup_size in mesh.toml),"
        " so it is not run again",
        **fields,
    )


def _cut(text: str, shown: int = 60) -> str:
    return text if len(text) <= shown and text.isprintable() else repr(text[:shown]) + "…"


class Server:
    """A running gRPC server for one machine, on its node's event loop: the mesh service,
    health, and server reflection (so grpcurl and similar tools find the mesh service).
    Built and stopped from any thread; everything it does happens on the loop."""

    def __init__(self, node: Node, listen: str, *, start: bool = True) -> None:
        self.listen = listen
        self.machine = node.machine
        self._node = node
        problem = _bind_problem(listen)
        if problem:
            raise MeshError(f"{node.machine} cannot listen on {listen}: {problem}")
        self.port = 0
        if start:
            self.port = node.run_on_loop(self._start())

    @classmethod
    async def started(cls, node: Node, listen: str) -> Server:
        """A server started from a task of the node's own loop (``node.serve_async``)."""
        server = cls(node, listen, start=False)
        server.port = await server._start()
        return server

    async def _start(self) -> int:
        node = self._node
        transport = node.transport  # TLS, the token and the limits: mesh/transport.py
        self._server = grpc.aio.server(options=transport.server_options())
        self.peer = Peer(node, transport.guard(node.flows))
        handlers = {
            "Continue": grpc.unary_unary_rpc_method_handler(
                self.peer.Continue, request_deserializer=None, response_serializer=None
            ),
            "Link": grpc.stream_stream_rpc_method_handler(
                self.peer.Link, request_deserializer=None, response_serializer=None
            ),
            "Flows": grpc.unary_unary_rpc_method_handler(
                self.peer.Flows, request_deserializer=None, response_serializer=None
            ),
            "Steer": grpc.unary_unary_rpc_method_handler(
                self.peer.Steer, request_deserializer=None, response_serializer=None
            ),
        }
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME, self.peer.guard.method_handlers(handlers)
                ),
            )
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._server.add_generic_rpc_handlers(_reflection_handlers(self.peer.guard))
        port = transport.add_port(self._server, self.listen)
        if not port:
            raise MeshError(f"{node.machine} cannot listen on {self.listen}: address in use")
        if node.config.durable:
            # Flows that started on an earlier flow file finish on it here (a rolling deploy).
            self.peer.guard.versions = node.keep_versions()
            # Before serving: a resend of a stay it had accepted finds it running again.
            self.peer.recover()
            node.recover_origins()
            self.peer.prune_soon()
            if node.journal.shared:
                self.peer.watch_orphans()
        await self._server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self, grace: float) -> list[Abandoned]:
        """Stop: NOT_SERVING, refuse new steps, give steps in progress ``grace`` seconds.

        Callers stop picking this peer (its links say it is going away; a unary caller gets
        UNAVAILABLE, which gRPC retries on another replica: the step never ran here). A
        step still running when ``grace`` is over is abandoned (see :meth:`Peer.drain`).
        Returns the steps abandoned, each logged as ``mesh.step_abandoned``; a synchronous
        handler among them may still be running in this process (Python cannot stop a
        thread): ``mesh peer`` exits anyway.
        """
        return self._node.run_on_loop(self.stop_async(grace))

    async def stop_async(self, grace: float) -> list[Abandoned]:
        """:meth:`stop`, awaited on the node's loop (``node.stop_async``)."""
        await self.health.enter_graceful_shutdown()
        abandoned = await self.peer.drain(grace)
        # Replies computed by now still leave; nothing else runs, so this is quick.
        await self._server.stop(LAST_REPLIES)
        return abandoned

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._node.run_on_loop(self._server.wait_for_termination(timeout)))


def _reflection_handlers(guard: Guard) -> tuple[grpc.GenericRpcHandler, ...]:
    """gRPC server reflection (grpcurl, Postman, grpcui): it lists the mesh service, health
    and itself, and describes their messages from the descriptors the generated code
    registered. Behind the token when one is configured, like the mesh service: the
    health service stays open to probes, but what the mesh serves is for its callers."""
    servicer = _reflection.aio.ReflectionServicer(
        (SERVICE_NAME, HEALTH_SERVICE, *REFLECTION_SERVICES)
    )
    method = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=_reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=_reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    checked = guard.behind_token(method)
    return tuple(
        grpc.method_handlers_generic_handler(name, checked) for name in REFLECTION_SERVICES
    )


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


__all__ = [
    "CONTINUE_METHOD",
    "LINK_METHOD",
    "REFLECTION_SERVICES",
    "Abandoned",
    "Peer",
    "Server",
    "wait_serving",
]
