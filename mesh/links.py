"""Links: one persistent stream to each replica of each machine this process calls.

A hop used to be a unary ``Continue`` call: about half a millisecond of CPU in Python
gRPC whatever the step did, and a thread held on every machine of the chain while
the flow waited below. Here every call to a machine travels as a frame over a
``Link`` stream that stays open, multiplexed by call id, and a call waiting for its
reply is an entry in a table, not a blocked thread.

What a unary call got from gRPC, a link does itself:

* **Deadlines.** Each call carries the seconds it may take; a timer ends it here at
  its deadline and sends ``cancel``, so the peer stops the flow (its next ``"next"``
  fails) instead of going on for nobody.
* **Replicas.** A machine's address may name several replicas (``ipv4:a,b``, or a
  ``dns:///`` name resolved here); each gets a link of its own, and a call goes to the
  link with the fewest calls in flight. A replica that said it is going away, or
  whose link broke, gets no new calls until it is dialled again (with backoff).
* **Exactly once across a broken link.** The peer acknowledges the calls it has read
  (``received``). When a link breaks, a call it never read is sent again, to any
  replica; a call it read may be running there, so it is sent again to *that*
  replica only, over a new link, where the reply record answers it without running
  it twice. If that replica cannot be reached within :data:`ADOPT_WINDOW`, the call
  fails as unavailable, saying it may have run.
* **Backpressure.** At most ``window`` calls are in flight on a link; when every link
  of a machine is full, a call is refused at once as busy, never queued without bound.

Nothing here knows about flows: :meth:`Links.call` takes a serialized request and
returns an :class:`Answer`, a value the runtime turns into the flow's next move.
Everything runs on one event loop (the node's).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import grpc

from mesh import frames
from mesh.deadlines import ADOPT_WINDOW
from mesh.versions import VERSION_MISMATCH

__all__ = ["ADOPT_WINDOW", "LINK_METHOD", "Answer", "Links"]

LINK_METHOD: Final = "/mesh.v1.Mesh/Link"

#: Backoff between dials of a replica that could not be reached: first, growth, cap.
BACKOFF: Final = (0.05, 2.0, 1.0)

#: Seconds at most between the attempts of a durable flow's call to a machine that is down.
PATIENT_BACKOFF: Final = 2.0
#: How often a machine that durable flows wait for is probed for being back.
WATCH_EVERY: Final = 0.05

#: How many times one call may find no replica reachable before it fails, like the
#: five attempts of the unary retry policy (within the call's deadline either way).
ATTEMPTS: Final = 5

#: Seconds between re-resolutions of a ``dns:///`` address.
RESOLVE_EVERY: Final = 30.0

_STATUS: Final = {code.value[0]: code for code in grpc.StatusCode}

#: Answer codes that end a call with no reply.
OK: Final = grpc.StatusCode.OK
UNAVAILABLE: Final = grpc.StatusCode.UNAVAILABLE
DEADLINE: Final = grpc.StatusCode.DEADLINE_EXCEEDED
BUSY: Final = grpc.StatusCode.RESOURCE_EXHAUSTED
FAILED_PRECONDITION: Final = grpc.StatusCode.FAILED_PRECONDITION


class Answer(NamedTuple):
    """How a call ended: a serialized ``ContinueReply``, or the status it ended with.

    ``code`` is OK with a reply; otherwise it says why there is none, in the terms of
    gRPC status codes (a refusal by the peer, or the link's own failure), with
    ``message``. ``address`` is the replica that answered or failed.
    """

    reply: bytes | memoryview
    code: grpc.StatusCode
    message: str
    address: str


class _Pending:
    """One call waiting for its answer on a link."""

    __slots__ = ("begun", "deadline", "future", "id", "link", "payload", "timer", "traceparent")

    def __init__(
        self, payload: bytes, deadline: float, traceparent: str, future: asyncio.Future[Answer]
    ) -> None:
        self.payload = payload
        self.deadline = deadline  # time.monotonic()
        self.traceparent = traceparent
        self.future = future
        self.id = 0
        self.link: _Link | None = None
        self.timer: asyncio.TimerHandle | None = None
        # The link's peer read it, so it may be running there: never send it elsewhere.
        self.begun = False

    def finish(self, answer: Answer) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.future.done():
            self.future.set_result(answer)


#: A pending call that the link's peer never read: send it again, on any replica.
_RESEND: Final = Answer(b"", grpc.StatusCode.ABORTED, "resend", "")


class _Link:
    """One ``Link`` stream to one replica, and the calls in flight on it."""

    def __init__(self, replica: _Replica, *, adopting: float = 0.0) -> None:
        self.replica = replica
        self.address = replica.address
        self.pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.received = 0  # the peer has read every call up to this id
        self.opened = False  # the peer's first frame came: it admitted the link
        self.going_away = False
        self.broken = False
        self.last_heard = time.monotonic()
        # A link dialled to resend calls the broken one's peer may be running: the
        # monotonic time until which it may (its ADOPT_WINDOW, from the first break); if
        # it cannot open by then, those calls fail instead of going to another replica.
        self.adopting = adopting
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._call: Any = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    def usable(self, window: int) -> bool:
        return not (self.broken or self.going_away) and len(self.pending) < window

    # -- sending ---------------------------------------------------------------------

    def send(self, pending: _Pending) -> None:
        call = pending.id = next(self._ids)
        pending.link = self
        self.pending[call] = pending
        timeout = max(pending.deadline - time.monotonic(), 0.0)
        self._out.put_nowait(frames.request(call, pending.payload, timeout, pending.traceparent))

    def cancel(self, pending: _Pending) -> None:
        """The caller no longer waits for ``pending``: tell the peer, forget it here."""
        if self.pending.pop(pending.id, None) is not None and not self.broken:
            self._out.put_nowait(frames.cancel(pending.id))

    def close(self) -> None:
        self._out.put_nowait(None)
        if self._call is not None:
            self._call.cancel()

    async def _frames(self) -> AsyncIterator[bytes]:
        """The link's messages: every frame queued by the time the last message has gone
        (gRPC asks for the next only then), so that under load many share one message."""
        out = self._out
        while True:
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

    # -- receiving -------------------------------------------------------------------

    async def _run(self) -> None:
        replica = self.replica
        status, details = UNAVAILABLE, "the link closed"
        try:
            if self.adopting:
                # Resending calls its peer may be running: only that peer will do, and
                # only if it is reachable soon (it keeps such a step for as long).
                await asyncio.wait_for(
                    replica.ready_again(), max(self.adopting - time.monotonic(), 0.0)
                )
            stream = replica.channel().stream_stream(
                LINK_METHOD, request_serializer=None, response_deserializer=None
            )
            call = self._call = stream(self._frames(), metadata=replica.owner.metadata)
            async for data in call:
                for frame in frames.unbatch(data):
                    self._on_frame(frame)
            status, details = await call.code(), await call.details()
        except grpc.aio.AioRpcError as exc:
            status, details = exc.code(), exc.details() or ""
        except TimeoutError:
            details = f"not reachable within {ADOPT_WINDOW:g} s"
        except asyncio.CancelledError:
            status, details = grpc.StatusCode.CANCELLED, "the link was closed here"
        except Exception as exc:  # a frame we cannot read: a broken peer, not a crash here
            status, details = grpc.StatusCode.INTERNAL, f"unreadable frame: {exc}"
            if self._call is not None:
                self._call.cancel()
        self._on_end(status, details or status.name)

    def _on_frame(self, data: memoryview) -> None:
        parts = frames.split(data)
        self.last_heard = time.monotonic()
        self.received = max(self.received, parts.received)
        if not self.opened:
            self.opened = True
            self.replica.reached()
        kind = parts.kind
        if kind == frames.REPLY:
            answered = self.pending.pop(parts.call, None)
            if answered is not None:
                answered.finish(Answer(parts.body, OK, "", self.address))
        elif kind == frames.REFUSED:
            refused = self.pending.pop(parts.call, None)
            if refused is not None:
                code, message = frames.refusal(parts.body)
                answer = Answer(
                    b"", _STATUS.get(code, grpc.StatusCode.UNKNOWN), message, self.address
                )
                if answer.code is UNAVAILABLE:
                    # Refused because the peer is stopping: it never ran it.
                    answer = _RESEND
                refused.finish(answer)
        elif kind == frames.GOING_AWAY:
            self.going_away = True

    def _on_end(self, status: grpc.StatusCode, details: str) -> None:
        self.broken = True
        replica = self.replica
        if replica.link is self:
            replica.link = None
        pending, self.pending = self.pending, {}
        if status is grpc.StatusCode.CANCELLED and replica.owner.closed:
            for p in pending.values():
                p.finish(Answer(b"", UNAVAILABLE, "the node is closing", self.address))
            return
        if not self.opened:
            replica.unreachable(details)
        refused_link = status in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNIMPLEMENTED,
        )
        begun: list[_Pending] = []
        for call, p in pending.items():
            if refused_link:
                # The peer refused the link itself (a token, a certificate): every call on it.
                p.finish(Answer(b"", status, details, self.address))
            elif p.begun or call <= self.received:
                if self.adopting and time.monotonic() >= self.adopting:
                    p.finish(
                        Answer(
                            b"",
                            UNAVAILABLE,
                            f"the link broke and the peer was not back within {ADOPT_WINDOW:g} s"
                            f" ({details}); the call may have run there, so it was not sent"
                            " to another replica",
                            self.address,
                        )
                    )
                else:
                    p.begun = True
                    begun.append(p)
            else:
                p.finish(_RESEND)
        if begun:
            # Broken again while adopting (a network that flaps): adopt again, within the
            # window of the first break.
            link = replica.adopt_link(self.adopting or time.monotonic() + ADOPT_WINDOW)
            for p in begun:
                if p.future.done():
                    continue
                link.send(p)


class _Replica:
    """One address of a machine: its channel, its current link, and its backoff."""

    def __init__(self, owner: Links, machine: str, address: str) -> None:
        self.owner = owner
        self.machine = machine
        self.address = address
        self.link: _Link | None = None
        self.retry_at = 0.0
        self._backoff = 0.0
        self.problem = ""
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self.owner.open_channel(self.machine, self.address)
        return self._channel

    def link_now(self) -> _Link:
        """The replica's link, dialled if it has none."""
        if self.link is None or self.link.broken:
            self.link = _Link(self)
        return self.link

    async def ready_again(self) -> None:
        """Wait for this replica's channel to be ready after its link broke: as soon as
        its address accepts connections again (a restarted peer), on a fresh channel, not
        when gRPC's reconnect backoff (a second or more) lets the old one try again."""
        channel = self.channel()
        ready = asyncio.ensure_future(channel.channel_ready())
        try:
            while not ready.done():
                if await _accepts(self.address):
                    if channel.get_state() is not grpc.ChannelConnectivity.READY:
                        self.renew()
                        channel = self.channel()
                        ready.cancel()
                        ready = asyncio.ensure_future(channel.channel_ready())
                    await ready
                    return
                await asyncio.wait({ready}, timeout=WATCH_EVERY)
            await ready
        finally:
            ready.cancel()

    def renew(self) -> None:
        """Drop the channel (closed in the background): the next call dials afresh."""
        old, self._channel = self._channel, None
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())

    def adopt_link(self, until: float) -> _Link:
        """A new link to resend calls this replica may be running (see _Link._run)."""
        self.link = _Link(self, adopting=until)
        return self.link

    def reached(self) -> None:
        self._backoff = 0.0
        self.problem = ""

    def unreachable(self, problem: str) -> None:
        first, growth, cap = BACKOFF
        self._backoff = min(self._backoff * growth, cap) if self._backoff else first
        self.retry_at = time.monotonic() + self._backoff
        self.problem = problem

    async def close(self) -> None:
        if self.link is not None:
            self.link.close()
        if self._channel is not None:
            await self._channel.close()


class _Machine:
    """The replicas of one machine, resolved from its address."""

    def __init__(self, owner: Links, name: str, address: str) -> None:
        self.owner = owner
        self.name = name
        self.address = address
        self.replicas: list[_Replica] = []
        self._resolved_at = -RESOLVE_EVERY
        # Where the rotation among equally loaded replicas starts: anywhere, so that many
        # short-lived callers (each `mesh call` a process) do not all pick the first.
        self._turn = itertools.count(random.randrange(1 << 16))
        # Durable flows waiting for this machine to come back, and what watches for it.
        self._waiters = 0
        self._back: asyncio.Event | None = None
        self._watch: asyncio.Task[None] | None = None

    def down(self) -> bool:
        """No replica has a working link (else a refusal came from a live peer: wait the
        backoff out, rather than probe a machine that is up)."""
        return all(r.link is None or r.link.broken for r in self.replicas)

    async def back(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a replica of this machine to accept
        connections again: a durable flow waiting for it sends its call as soon as it is
        back (a restarted peer has recovered its flows by then), not at its next backoff.
        One task per machine watches, every :data:`WATCH_EVERY` seconds, while flows wait."""
        if self._back is None or self._back.is_set():
            self._back = asyncio.Event()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watching(self._back))
        self._waiters += 1
        try:
            await asyncio.wait_for(asyncio.shield(self._back.wait()), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1

    async def _watching(self, back: asyncio.Event) -> None:
        while not self.owner.closed:
            for replica in self.replicas:
                if await _accepts(replica.address):
                    replica.retry_at = 0.0  # dial it at once, on a fresh channel
                    if replica.link is None or replica.link.broken:
                        replica.renew()
                    back.set()
                    return
            await asyncio.sleep(WATCH_EVERY)
            if self._waiters == 0:
                return

    def stale(self) -> bool:
        """Whether the replicas are to be (re)resolved before the next call."""
        return not self.replicas or (
            self.address.startswith("dns:")
            and time.monotonic() - self._resolved_at >= RESOLVE_EVERY
        )

    async def resolve(self) -> None:
        self._resolved_at = time.monotonic()
        addresses = await _replica_addresses(self.address)
        known = {r.address: r for r in self.replicas}
        self.replicas = [known.get(a) or _Replica(self.owner, self.name, a) for a in addresses]
        for gone in set(known) - set(addresses):
            await known[gone].close()

    def pick(self, window: int) -> _Link | float | None:
        """The link for a new call: the usable one with the fewest calls in flight. None
        when every link is full (busy); else the monotonic time to try again at."""
        best: _Link | None = None
        full = False
        now = time.monotonic()
        start = next(self._turn) % max(len(self.replicas), 1)
        retry = float("inf")
        for replica in self.replicas[start:] + self.replicas[:start]:
            link = replica.link
            if link is None or link.broken:
                if now < replica.retry_at:
                    retry = min(retry, replica.retry_at)
                    continue
                link = replica.link_now()
            if link.going_away:
                continue
            if len(link.pending) >= window:
                full = True
                continue
            if best is None or len(link.pending) < len(best.pending):
                best = link
        if best is not None:
            return best
        if full:
            return None
        return retry if retry != float("inf") else now + BACKOFF[0]

    def problem(self) -> str:
        problems = [f"{r.address}: {r.problem}" for r in self.replicas if r.problem]
        if problems:
            return "; ".join(problems)
        return "every replica is stopping" if self.replicas else "no replica resolved"


class Links:
    """Every link of one node, to every machine it calls; lives on the node's event loop.

    ``open_channel(machine, address)`` makes a ``grpc.aio`` channel (credentials and
    options: mesh/transport.py); ``metadata`` is sent when a link opens (the token).
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        open_channel: Callable[[str, str], grpc.aio.Channel],
        metadata: Sequence[tuple[str, str]] = (),
        *,
        window: int = 10_000,
    ) -> None:
        self._addresses = addresses
        self.open_channel = open_channel
        self.metadata = tuple(metadata)
        self.window = window
        self._machines: dict[str, _Machine] = {}
        self.closed = False

    def address(self, machine: str) -> str:
        return self._addresses.get(machine, "")

    async def call(
        self,
        machine: str,
        payload: bytes,
        deadline: float,
        traceparent: str = "",
        *,
        waiting: Callable[[str, str], None] | None = None,
    ) -> Answer:
        """Send a serialized ``ContinueRequest`` to ``machine``; its answer, by ``deadline``
        (``time.monotonic()``). Cancelling the awaiting task cancels the call there too.

        ``waiting``: the call is a durable flow's, whose machines journal what they ran, so
        sending it again is safe anywhere and any number of times: while ``machine`` cannot
        be reached (down, restarting, or it went away while running the call), it is sent
        again with backoff (up to :data:`PATIENT_BACKOFF` seconds apart) until it is
        answered or its deadline passes, and ``waiting(address, problem)`` is told each
        time (None when it is answered)."""
        if waiting is None:
            return await self._call(machine, payload, deadline, traceparent)
        pause = BACKOFF[0]
        while True:
            answer = await self._call(machine, payload, deadline, traceparent, patient=True)
            if self.closed or not (
                answer.code is UNAVAILABLE
                or (answer.code is FAILED_PRECONDITION and VERSION_MISMATCH in answer.message)
            ):
                return answer
            left = deadline - time.monotonic()
            if left <= pause:
                return answer
            waiting(answer.address or self.address(machine), answer.message)
            target = self._machines.get(machine)
            if target is not None and answer.code is UNAVAILABLE and target.down():
                await target.back(pause)
            else:
                await asyncio.sleep(pause)
            pause = min(pause * 2, PATIENT_BACKOFF)

    async def _call(
        self,
        machine: str,
        payload: bytes,
        deadline: float,
        traceparent: str = "",
        *,
        patient: bool = False,
    ) -> Answer:
        target = self._machines.get(machine)
        if target is None:
            address = self.address(machine)
            if not address:
                return Answer(b"", UNAVAILABLE, f"{machine} has no address", "")
            target = self._machines[machine] = _Machine(self, machine, address)
        loop = asyncio.get_running_loop()
        attempts = 0
        while True:
            if self.closed:
                return Answer(b"", UNAVAILABLE, "the node is closing", target.address)
            if target.stale():
                try:
                    await target.resolve()
                except OSError as exc:
                    return Answer(b"", UNAVAILABLE, f"cannot resolve {target.address}: {exc}", "")
            link = target.pick(self.window)
            if link is None:
                return Answer(
                    b"",
                    BUSY,
                    f"{self.window:,} calls in flight on every link to {machine}"
                    " (link_window in mesh.toml)",
                    target.address,
                )
            if isinstance(link, float):
                attempts += 1
                wait = link - time.monotonic()
                if (attempts > ATTEMPTS and not patient) or time.monotonic() + max(
                    wait, 0
                ) >= deadline:
                    return Answer(b"", UNAVAILABLE, target.problem(), target.address)
                if patient:  # a durable flow's call: go as soon as a replica is back
                    await target.back(max(wait, 0.0))
                else:
                    await asyncio.sleep(max(wait, 0.0))
                continue
            pending = _Pending(payload, deadline, traceparent, loop.create_future())
            pending.timer = loop.call_at(
                loop.time() + (deadline - time.monotonic()), self._expire, pending
            )
            link.send(pending)
            try:
                answer = await pending.future
            except asyncio.CancelledError:
                if pending.link is not None:
                    pending.link.cancel(pending)
                if pending.timer is not None:
                    pending.timer.cancel()
                raise
            if answer is _RESEND:
                attempts += 1
                if attempts > ATTEMPTS or time.monotonic() >= deadline:
                    return Answer(b"", UNAVAILABLE, target.problem(), target.address)
                continue
            return answer

    def _expire(self, pending: _Pending) -> None:
        """A call's deadline passed here: the peer is told, the caller answered."""
        pending.timer = None
        link = pending.link
        address = link.address if link is not None else ""
        if link is not None:
            link.cancel(pending)
            if time.monotonic() - link.last_heard > ADOPT_WINDOW and not link.broken:
                # Nothing heard on this link for a while: a silent partition, maybe. The
                # next call dials afresh rather than writing into the void.
                link.close()
        pending.finish(Answer(b"", DEADLINE, "the deadline passed", address))

    async def close(self) -> None:
        self.closed = True
        for machine in self._machines.values():
            for replica in machine.replicas:
                await replica.close()
        self._machines.clear()


async def _accepts(target: str) -> bool:
    """Whether a replica's ``ipv4:``/``ipv6:`` target accepts a TCP connection now."""
    lowered = target.lower()
    if not lowered.startswith(("ipv4:", "ipv6:")):
        return False  # a target we cannot probe: the waiter's backoff decides
    host, _, port = target[5:].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), WATCH_EVERY * 5
        )
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    return True


async def _replica_addresses(address: str) -> list[str]:
    """The gRPC target of each replica of ``address``: an ``ipv4:``/``ipv6:`` list is
    split, a ``dns:///`` name resolved to one address per IP, anything else is one."""
    lowered = address.lower()
    for scheme in ("ipv4:", "ipv6:"):
        if lowered.startswith(scheme) and not address[len(scheme) :].startswith("//"):
            parts = [p for p in address[len(scheme) :].split(",") if p]
            return [f"{scheme}{p}" for p in parts]
    if lowered.startswith("dns:"):
        rest = address[4:]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # dns://authority/host:port
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )
        seen: dict[str, None] = {}
        for family, _, _, _, sockaddr in infos:
            ip = sockaddr[0]
            seen[f"ipv6:[{ip}]:{port}" if family == socket.AF_INET6 else f"ipv4:{ip}:{port}"] = None
        if not seen:
            raise OSError(f"{host} resolves to no address")
        return list(seen)
    return [address]
