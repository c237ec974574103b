"""A flow's deadline across hops: the seconds each hop passes on, and the limits on them.

Each hop passes on the time that remains (a link frame carries it with each call,
unary ``Continue`` as the gRPC deadline), minus a small reserve for its own reply to
travel back: so when a step deep in the chain overruns, the hop that called it
times out first and its reply, a ``FlowTimeout`` naming the machine and line that
held the flow, still reaches the originator before the originator's own deadline.

When the call that brought a flow to a peer ends before the flow is done there (its
caller gave up, or went away), nobody waits for the result: the peer stops the flow
(mesh/peer.py), so a handler still running cannot go on to call further peers. A
call can also end because its connection broke; the caller then sends it again
(mesh/links.py), and the reply record lets the resend adopt the running step
(mesh/dedup.py). So a step whose caller vanished with time left keeps going for
:data:`ADOPT_WINDOW` seconds first.

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math

__all__ = ["ADOPT_WINDOW", "MAX_RESERVE", "MAX_SECONDS", "reply_reserve", "seconds"]

#: The longest the mesh waits for anything (a flow's timeout, grace): one year. gRPC
#: carries no more: a deadline past about 2**63 ns since the epoch overflows and fails
#: the call at once, and the wire's ``grpc-timeout`` stops near three years.
MAX_SECONDS = 365 * 24 * 3600.0

#: At most this many seconds of a hop's time are kept for its reply.
MAX_RESERVE = 0.1

#: Seconds a step whose caller went away waits for a resend to adopt it, and a caller
#: whose link broke tries to reach that same peer again (a broken link is dialled again
#: at once; a unary caller's gRPC retries within 0.05 s to 1 s). A loaded machine can
#: take over a second to accept a connection again: 1 s here lost flows that a peer
#: still held (seen on 2 busy cores), so the window is a few seconds.
ADOPT_WINDOW = 3.0


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


def local_deadline(now: float, timeout: float) -> float:
    """The deadline a peer gives a flow that arrived with ``timeout`` seconds left at
    ``now`` (``time.monotonic()``): the caller's, less the reserve for the reply."""
    timeout = min(max(timeout, 0.0), MAX_SECONDS)
    return now + timeout - reply_reserve(timeout)
