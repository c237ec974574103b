"""A flow's deadline across hops, and stopping the work of a call that is gone.

Each hop passes on the time that remains (gRPC carries it as the call's
deadline), minus a small reserve for its own reply to travel back: so when a
step deep in the chain overruns, the hop that called it times out first and
its reply, a ``FlowTimeout`` naming the machine and line that held the flow,
still reaches the originator before the originator's own deadline.

When the call that brought a flow here ends before the flow is done here (its
deadline passed, its caller was killed or cancelled it), nobody waits for the
result: :func:`expire` moves the flow's deadline into the past, so a handler that
is still running cannot go on to call further peers: its ``"next"`` fails fast.
A call already in progress further down is not cancelled from here (the dialer
makes blocking calls, which cost a third of a future's; see dialer.py): it ends
by its own deadline, the flow's, which gRPC cancels it at.

A call can also end because its connection broke, and then gRPC retries it: the
retry finds the step still running (dedup.py) and waits for its reply. So a
step whose caller vanished with time left keeps going for :data:`ADOPT_WINDOW`
seconds; a retry arriving by then adopts it, and it runs to its normal end.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol


class FlowState(Protocol):
    """What this module needs of a flow (mesh.runtime.FlowState): its deadline.

    A protocol, not an import, so that config (which reads timeouts with
    :func:`seconds`) does not import the runtime.
    """

    deadline: float

    def remaining(self) -> float: ...


__all__ = ["MAX_SECONDS", "Watch", "expire", "reply_reserve", "seconds", "watch"]

#: The longest the mesh waits for anything (a flow's timeout, grace): one year. gRPC
#: carries no more: a deadline past about 2**63 ns since the epoch overflows and fails
#: the call at once, and the wire's ``grpc-timeout`` stops near three years.
MAX_SECONDS = 365 * 24 * 3600.0

#: At most this many seconds of a hop's time are kept for its reply.
MAX_RESERVE = 0.1

#: Seconds a step whose caller went away waits for a retry to adopt it (gRPC's first
#: retry comes within 0.05 s of a lost connection; its backoff grows to 1 s).
ADOPT_WINDOW = 1.0


def seconds(value: object, name: str = "timeout") -> float:
    """``value`` as a number of seconds to wait: positive and finite, capped at
    :data:`MAX_SECONDS` (so a generous deadline of days never overflows gRPC's).

    Raises ValueError, one line naming ``name`` and the value, for anything else:
    zero, negatives, NaN, infinities, booleans (``True`` is not one second), strings.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return min(float(value), MAX_SECONDS)


def reply_reserve(remaining: float) -> float:
    """Seconds of ``remaining`` a peer keeps for sending its reply back."""
    return min(MAX_RESERVE, max(remaining, 0.0) / 10)


def expire(state: FlowState) -> None:
    """The caller went away before the deadline: nobody waits for this flow here any more.

    Its deadline moves to a monotonic time long past (exactly 0.0, which the peer's
    log reports as "caller gone"), so its next ``"next"`` fails fast.
    """
    state.deadline = 0.0


class Watch:
    """gRPC's callback for the end of one inbound call."""

    __slots__ = ("adopted", "done", "state")

    def __init__(self, state: FlowState) -> None:
        self.state = state
        self.done = False
        self.adopted = False

    def finished(self) -> None:
        """The reply is ready: the call's end is no longer news for the flow."""
        self.done = True

    def adopt(self) -> None:
        """A retry of this call waits for the step's reply: let the step finish."""
        self.adopted = True

    def __call__(self) -> None:
        if self.done:
            return
        left = self.state.remaining()
        if left <= 0:
            return  # the deadline has passed: the flow's own checks stop it
        timer = threading.Timer(min(ADOPT_WINDOW, left), self._orphaned)
        timer.daemon = True
        timer.start()

    def _orphaned(self) -> None:
        if not self.done and not self.adopted:
            expire(self.state)


def watch(context: Any, state: FlowState) -> Watch:
    """Expire ``state`` if the call ``context`` ends before :meth:`Watch.finished`."""
    w = Watch(state)
    if not context.add_callback(w):  # the call has already ended
        expire(state)
    return w
