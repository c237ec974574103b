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
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Replies"]

T = TypeVar("T")


class _Entry(Generic[T]):
    """One step: running until ``done`` is set, then holding its reply."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: T | None = None


class Replies(Generic[T]):
    """The record of steps run here; :meth:`once` runs each key at most once."""

    def __init__(self, size: int, age: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size <= 0 or age <= 0:
            raise ValueError(f"size and age must be positive, not {size!r} and {age!r}")
        self.size = size
        self.age = age
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry[T]] = {}
        # Finished keys in the order they finished, with the time: the eviction queue.
        self._finished: OrderedDict[Hashable, float] = OrderedDict()
        self.duplicates = 0  # how many calls were answered from the record

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def once(self, key: Hashable, run: Callable[[], T], wait: float) -> T | None:
        """``run()``'s reply for ``key``, running it only if no call for ``key`` did.

        A duplicate waits at most ``wait`` seconds for a running step (its own
        deadline) and gets None if the step is still running then, or if the
        first run raised (its caller got that exception; there is no reply to
        repeat). A run that raises leaves no record, so it is not remembered.
        """
        with self._lock:
            self._evict(self._clock())
            entry = self._entries.get(key)
            first = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry()
            else:
                self.duplicates += 1
        if not first:
            entry.done.wait(max(wait, 0.0))
            return entry.reply
        try:
            reply = run()
        except BaseException:
            with self._lock:
                self._entries.pop(key, None)
            entry.done.set()
            raise
        entry.reply = reply
        with self._lock:
            now = self._clock()
            self._finished[key] = now
            self._evict(now)
        entry.done.set()
        return reply

    def _evict(self, now: float) -> None:
        """Drop finished entries past ``size`` or older than ``age`` (lock held)."""
        finished = self._finished
        horizon = now - self.age
        while finished:
            key, at = next(iter(finished.items()))
            if len(finished) <= self.size and at >= horizon:
                break
            del finished[key]
            self._entries.pop(key, None)
