"""Exactly-once steps: the replies a peer gave, by (flow_id, line_index), for a while.

A caller sends a call again when its reply was lost (a link that broke after the call
went out is dialled again and its calls resent; gRPC retries a unary ``Continue``), so
a peer can receive the same step twice. Running it twice
would charge a card twice; so the first call runs the step, and a duplicate

* of a step still running waits for it and gets the same reply;
* of a step already finished gets the recorded reply, without running anything.

A flow visits each line once, so (flow_id, line_index) names one step. But flow ids are
not secret (every log line carries one), so the key alone must not be enough to get a
reply: each step also records a *fingerprint* of the call that ran it (a hash of the
request's bytes and of who sent it), and only a call with the same fingerprint is a
duplicate. gRPC's own retries resend the very same bytes. Any other call for a step
this peer knows is :class:`Replayed`; so is a call that would *start* a flow (line 0)
with a flow id this peer has seen at any line: a new flow needs a new id.

The record is bounded three ways: steps are forgotten once there are more than ``size``
of them (oldest first) or once they are older than ``age`` seconds; and the replies
themselves, the bulk of the memory, are kept only up to ``max_bytes`` in all, the
oldest dropped first. A step whose reply was dropped is still known (its key and
fingerprint, a few hundred bytes): a retry of it is :class:`Forgotten`, told that the
step ran and its reply is no longer kept, instead of running it a second time. Keep
``age`` above the longest deadline a flow may have: a retry never comes later than its
deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sized
from typing import Generic, TypeVar

__all__ = ["Forgotten", "Replayed", "Replies"]

T = TypeVar("T", bound=Sized)

#: A step: (flow_id, line_index).
Key = tuple[str, int]


class Replayed(Exception):
    """The call names a step, or starts a flow, that another call ran or is running."""


class Forgotten(Exception):
    """The call repeats a step that ran here, but its reply is no longer kept."""


class _Running:
    """A step still running: each duplicate waits on a future of its own.

    The futures are made only for duplicates (rare), not for every step.
    """

    __slots__ = ("fingerprint", "reply", "waiters")

    def __init__(self, fingerprint: bytes) -> None:
        self.fingerprint = fingerprint
        self.reply: object = None
        self.waiters: list[asyncio.Future[None]] = []


class _Done:
    """A finished step: when, the call that ran it, and its reply while that is kept."""

    __slots__ = ("at", "fingerprint", "reply", "size")

    def __init__(self, at: float, fingerprint: bytes, reply: object, size: int) -> None:
        self.at = at
        self.fingerprint = fingerprint
        self.reply: object = reply  # None once dropped to stay within max_bytes
        self.size = size


class Replies(Generic[T]):
    """The record of steps run here; :meth:`once` runs each step at most once.

    It lives on the peer's event loop, which serves every call: no locks.
    """

    def __init__(
        self,
        size: int,
        age: float,
        max_bytes: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size <= 0 or age <= 0 or max_bytes <= 0:
            raise ValueError(
                f"size, age and max_bytes must be positive, not {size!r}, {age!r}, {max_bytes!r}"
            )
        self.size = size
        self.age = age
        self.max_bytes = max_bytes
        self._clock = clock
        self._running: dict[Key, _Running] = {}
        # Finished steps in the order they finished; the eviction queue.
        self._finished: OrderedDict[Key, _Done] = OrderedDict()
        # Those whose reply is still kept, in the same order; and the bytes they hold.
        self._kept: deque[_Done] = deque()
        self.bytes = 0
        # How many known steps (running or finished) each flow id has here.
        self._flows: dict[str, int] = {}
        self._oldest = math.inf  # when the first entry of _finished finished
        self.duplicates = 0  # how many calls were answered from the record

    def __len__(self) -> int:
        """Steps known: running, or finished within ``age`` (their reply kept or not)."""
        self._evict(self._clock())
        return len(self._running) + len(self._finished)

    def __contains__(self, key: Key) -> bool:
        if key in self._running:
            return True
        done = self._finished.get(key)
        return done is not None and done.at >= self._clock() - self.age

    def seen(self, flow_id: str, line: int, fingerprint: bytes, *, fresh: bool) -> bool:
        """True when the call is a duplicate of a step known here (answered by :meth:`once`
        without running anything); False when it is new. Raises :class:`Replayed` or
        :class:`Forgotten` as :meth:`once` would, so a caller can refuse before doing more."""
        return self._known((flow_id, line), fingerprint, fresh, self._clock()) is not None

    async def once(
        self,
        flow_id: str,
        line: int,
        fingerprint: bytes,
        run: Callable[[], Awaitable[T]],
        wait: float,
        *,
        fresh: bool = False,
    ) -> T | None:
        """``await run()``'s reply for step (``flow_id``, ``line``), running it only if no
        call did.

        ``fingerprint`` identifies the call (the same bytes from the same caller: a resend).
        ``fresh``: the call starts a flow, so its flow id must be new here.
        A duplicate waits at most ``wait`` seconds for a running step (its own
        deadline) and gets None if the step is still running then, or if the
        first run raised (its caller got that exception; there is no reply to
        repeat). A run that raises leaves no record, so it is not remembered.
        Raises :class:`Replayed` for a call that is not the one that ran the step (or that
        starts a flow with a known id), :class:`Forgotten` for a duplicate whose reply was
        dropped.
        """
        key = (flow_id, line)
        known = self._known(key, fingerprint, fresh, self._clock())
        if known is not None:
            self.duplicates += 1
            if type(known) is _Done:
                reply: T = known.reply  # type: ignore[assignment]
                return reply
            assert isinstance(known, _Running)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            known.waiters.append(waiter)
            try:
                await asyncio.wait((waiter,), timeout=max(wait, 0.0))
            finally:
                if not waiter.done():
                    known.waiters.remove(waiter)
            done: T | None = known.reply  # type: ignore[assignment]
            return done
        running = self.start(flow_id, line, fingerprint)
        try:
            result = await run()
        except BaseException:
            self.finish(key, running, None)
            raise
        self.finish(key, running, (result,))
        return result

    def start(self, flow_id: str, line: int, fingerprint: bytes) -> _Running:
        """Record step (``flow_id``, ``line``) as running (the caller found it new)."""
        running = self._running[flow_id, line] = _Running(fingerprint)
        self._flows[flow_id] = self._flows.get(flow_id, 0) + 1
        return running

    def lookup(
        self, flow_id: str, line: int, fingerprint: bytes, *, fresh: bool
    ) -> _Running | _Done | None:
        """The record of the step this call repeats, None for a new step; raises
        :class:`Replayed` or :class:`Forgotten` as :meth:`once` does."""
        return self._known((flow_id, line), fingerprint, fresh, self._clock())

    def _known(
        self, key: Key, fingerprint: bytes, fresh: bool, now: float
    ) -> _Running | _Done | None:
        """The record of the step this call repeats, None for a new step (lock held)."""
        if self._oldest < now - self.age:
            self._evict(now)  # too old to be a retry: forget it
        done = self._finished.get(key)
        if done is not None:
            if done.fingerprint != fingerprint:
                raise Replayed(key)
            if done.reply is None:
                raise Forgotten(key)
            return done
        running = self._running.get(key)
        if running is not None:
            if running.fingerprint != fingerprint:
                raise Replayed(key)
            return running
        if fresh and key[0] in self._flows:
            raise Replayed(key)
        return None

    def finish(self, key: Key, running: _Running, ran: tuple[T] | None) -> None:
        """Record the reply in ``ran`` (None: the run raised, nothing to repeat); wake
        the duplicates."""
        del self._running[key]
        if ran is None:
            self._forget_flow(key[0])
        else:
            reply = running.reply = ran[0]
            now = self._clock()
            finished = self._finished
            if not finished:
                self._oldest = now
            done = finished[key] = _Done(now, running.fingerprint, reply, len(reply))
            self._kept.append(done)
            self.bytes += done.size
            if self._oldest < now - self.age:
                self._evict(now)
            elif len(finished) > self.size:  # the common case once full: one step goes
                self._drop(*finished.popitem(last=False))
            while self.bytes > self.max_bytes:  # drop the oldest replies, keep their steps
                dropped = self._kept.popleft()
                if dropped.reply is not None:
                    dropped.reply = None
                    self.bytes -= dropped.size
        for waiter in running.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def forget(self, key: Key) -> None:
        """Forget a finished step (a durable flow's failed step, to be run again)."""
        done = self._finished.pop(key, None)
        if done is None:
            return
        self._forget_flow(key[0])
        if done.reply is not None:
            done.reply = None
            self.bytes -= done.size

    def _forget_flow(self, flow_id: str) -> None:
        left = self._flows[flow_id] - 1
        if left:
            self._flows[flow_id] = left
        else:
            del self._flows[flow_id]

    def _drop(self, key: Key, done: _Done) -> None:
        """Forget a finished step, the oldest (lock held)."""
        self._oldest = done.at  # at most the new oldest's: _evict finds the exact one if need be
        self._forget_flow(key[0])
        if done.reply is not None:
            done.reply = None
            self.bytes -= done.size
            kept = self._kept
            while kept and kept[0].reply is None:  # it leaves the kept queue too
                kept.popleft()

    def _evict(self, now: float) -> None:
        """Forget finished steps past ``size`` or older than ``age`` (lock held)."""
        finished = self._finished
        horizon = now - self.age
        while finished:
            key, done = finished.popitem(last=False)
            if len(finished) < self.size and done.at >= horizon:
                finished[key] = done  # it stays: back to the front
                finished.move_to_end(key, last=False)
                self._oldest = done.at
                return
            self._drop(key, done)
        self._oldest = math.inf
