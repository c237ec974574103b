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

__all__ = ["BorrowedLoop", "EventLoop", "LoopThread", "Running", "Workers"]

T = TypeVar("T")


class Running(asyncio.Future[T]):
    """The result of a function running on a worker thread, which nothing can stop.

    So cancelling the task that awaits it does not cancel it: the task is woken with
    ``CancelledError`` once the function has returned (asyncio marks it to be cancelled
    when its future refuses). ``asyncio.shield`` gave the same with three wake-ups of the
    loop where this takes one.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


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
        future: Running[T] = Running(loop=self._loop)
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
            if ok:  # never done before: a Running future refuses to be cancelled
                future.set_result(value)
            else:
                future.set_exception(value)

    def stop(self) -> None:
        """Let idle threads end; a thread still running a function ends after it."""
        for _ in self._threads:
            self._tasks.put(None)


class EventLoop:
    """A node's event loop and the thread that runs it: where its links, its server, its
    flows and its async handlers live. Blocking code (``node.start``, inline flows) in
    other threads hands calls to it with :meth:`call` and waits."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result in this thread."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("EventLoop.call from its own loop would wait forever")
        return self.submit(coro).result(timeout)

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, if it is the node's own."""


class LoopThread(EventLoop):
    """An event loop in a daemon thread of the node's own, for code that is not async."""

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

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


class BorrowedLoop(EventLoop):
    """The application's own running event loop, lent to a node (``mesh.connect_async``).

    An asyncio application that originates flows on a loop of the node's own pays two
    thread wake-ups a flow (its task hands the flow to the node's thread, which hands the
    result back), and on a loaded machine a wake-up waits for a core. On the
    application's loop a flow is one more task. The node never stops a loop it borrowed;
    once the application's loop has closed, the node cannot be used (``closed`` says so).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.current_thread()
