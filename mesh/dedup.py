"""Exactly-once steps: the replies a peer gave, by (flow_id, line_index), for a while.

gRPC retries a ``Continue`` whose reply was lost (the connection broke after the
request went out), so a peer can receive the same step twice. Running it twice
would charge a card twice; so the first call runs the step, and a duplicate

* of a step still running waits for it and gets the same reply;
* of a step already finished gets the recorded reply, without running anything.

A flow visits each line once, so (flow_id, line_index) names one step. The record
is bounded: finished entries are dropped once there are more than ``size`` of them
(oldest first) or once they are older than ``age`` seconds. Keep ``age`` above the
longest deadline a flow may have: a retry never comes later than its deadline.
Replies are kept as they were returned; the peer returns serialized bytes, a
fraction of a message object's size, and the very bytes it sends.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["Replies"]

T = TypeVar("T")


class _Running:
    """A step still running: each duplicate waits on an event of its own, then reads ``reply``.

    The events are made only for duplicates (rare): a ``threading.Event`` per step
    cost every hop a Condition and its locks.
    """

    __slots__ = ("reply", "waiters")

    def __init__(self) -> None:
        self.reply: Any = None
        self.waiters: list[threading.Event] = []


class Replies(Generic[T]):
    """The record of steps run here; :meth:`once` runs each key at most once."""

    def __init__(
        self,
        size: int,
        age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size <= 0 or age <= 0:
            raise ValueError(f"size and age must be positive, not {size!r} and {age!r}")
        self.size = size
        self.age = age
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[Hashable, _Running] = {}
        # Finished steps in the order they finished: (when, reply); the eviction queue.
        self._finished: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._oldest = math.inf  # when the first entry of _finished finished
        self.duplicates = 0  # how many calls were answered from the record

    def __len__(self) -> int:
        with self._lock:
            self._evict(self._clock())
            return len(self._running) + len(self._finished)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._running:
                return True
            finished = self._finished.get(key)
            return finished is not None and finished[0] >= self._clock() - self.age

    def once(self, key: Hashable, run: Callable[[], T], wait: float) -> T | None:
        """``run()``'s reply for ``key``, running it only if no call for ``key`` did.

        A duplicate waits at most ``wait`` seconds for a running step (its own
        deadline) and gets None if the step is still running then, or if the
        first run raised (its caller got that exception; there is no reply to
        repeat). A run that raises leaves no record, so it is not remembered.
        """
        waiter = None
        with self._lock:
            finished = self._finished.get(key)
            if finished is not None and finished[0] < self._clock() - self.age:
                self._evict(self._clock())  # too old to be a retry: forget it, run again
                finished = None
            running = self._running.get(key) if finished is None else None
            if finished is not None or running is not None:
                self.duplicates += 1
                if running is not None:
                    waiter = threading.Event()
                    running.waiters.append(waiter)
            else:
                running = self._running[key] = _Running()
        if finished is not None:
            return finished[1]
        assert running is not None
        if waiter is not None:
            waiter.wait(max(wait, 0.0))
            done: T | None = running.reply
            return done
        try:
            reply = run()
        except BaseException:
            self._finish(key, running, None)
            raise
        self._finish(key, running, (reply,))
        return reply

    def _finish(self, key: Hashable, running: _Running, ran: tuple[T] | None) -> None:
        """Record the reply in ``ran`` (None: the run raised, nothing to repeat); wake
        the duplicates."""
        with self._lock:
            del self._running[key]
            if ran is not None:
                reply = running.reply = ran[0]
                now = self._clock()
                finished = self._finished
                if not finished:
                    self._oldest = now
                finished[key] = (now, reply)
                if len(finished) > self.size or self._oldest < now - self.age:
                    self._evict(now)
            waiters = running.waiters
        for waiter in waiters:
            waiter.set()

    def _evict(self, now: float) -> None:
        """Drop finished entries past ``size`` or older than ``age`` (lock held)."""
        finished = self._finished
        horizon = now - self.age
        while finished:
            key, (at, _) = next(iter(finished.items()))
            if len(finished) <= self.size and at >= horizon:
                self._oldest = at
                return
            del finished[key]
        self._oldest = math.inf
