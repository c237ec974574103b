"""Where a node's code runs: its event loop thread, and the threads for synchronous handlers.

A peer serves every call on one asyncio event loop: frames in, frames out, a flow
waiting for a reply from below is an entry in a table, not a thread. Handlers are
plain functions by default, and they may block (a database, an HTTP call), so they
run on a bounded set of threads instead of on the loop.

Handing a step to a thread and its result back is the costliest part of a hop in
Python: ``loop.run_in_executor`` wakes the loop once per result, through its self-pipe,
and cost about 0.25 ms of CPU a step on this project's 2-core machine (a 4-hop chain
of gRPC streams went from 1.8x to 1.35x the throughput of nested unary calls). So
:class:`Workers` hands results back in batches: a result that finds the loop already
due to collect results adds itself to the batch and wakes nobody.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "Workers"]

T = TypeVar("T")


class Workers:
    """A fixed set of threads running functions for an event loop, results in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, name: str = "mesh") -> None:
        self._loop = loop
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._due = False  # the loop will collect results: no need to wake it
        self._size = size
        self._name = name
        self._threads: list[threading.Thread] = []
        self.busy = 0  # functions submitted and not yet finished

    def run(self, context: contextvars.Context, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run ``fn(*args)`` on a worker thread, in ``context`` (which nothing else may be
        running in meanwhile: the awaiting task's own, say); await its result (its
        exception, raised again here)."""
        future: asyncio.Future[T] = self._loop.create_future()
        if len(self._threads) < self._size and self.busy >= len(self._threads):
            self._start_thread()
        self.busy += 1
        self._tasks.put((future, context, fn, args))
        return future

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        get = self._tasks.get
        done = self._done
        while True:
            item = get()
            if item is None:
                return
            future, context, fn, args = item
            try:
                result: tuple[asyncio.Future[Any], bool, Any] = (
                    future,
                    True,
                    context.run(fn, *args),
                )
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                result = (future, False, exc)
            done.append(result)
            with self._lock:
                if self._due:
                    continue
                self._due = True
            try:
                self._loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    def _collect(self) -> None:
        with self._lock:
            self._due = False
        done = self._done
        while done:
            future, ok, value = done.popleft()
            self.busy -= 1
            if future.done():  # its task was cancelled meanwhile
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def stop(self) -> None:
        """Let idle threads end; a thread still running a function ends after it."""
        for _ in self._threads:
            self._tasks.put(None)


class LoopThread:
    """An asyncio event loop in a daemon thread of its own, for code that is not async.

    A node's links, its server and its async handlers live on this loop; ``node.start``
    and inline flows, which block their caller's thread, hand calls to it with
    :meth:`call` and wait.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        # Whatever is left (links closing, a server's tasks) gets one pass to finish.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result in this thread."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("LoopThread.call from its own loop would wait forever")
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
