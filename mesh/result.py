"""What a finished flow gives back: its context and the timeline of its steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.masking import masked


@dataclass(frozen=True, slots=True)
class Step:
    """One line as it ran: where, when (wall clock, epoch seconds) and for how long."""

    index: int
    line: str  # rendered, secrets already masked
    machine: str
    start: float
    duration: float  # seconds
    #: Control flow: the sub-flow's request that ran it ("" for the flow's own request),
    #: the position of its element in a fan-out (None when it is no fan-out's), and
    #: whether its row was skipped by its condition (it ran nothing).
    request: str = ""
    element: int | None = None
    skipped: bool = False

    @property
    def ms(self) -> float:
        """Duration in milliseconds, as timelines print it."""
        return self.duration * 1000.0


@dataclass(frozen=True, slots=True)
class FlowResult:
    """A flow that finished. ``repr`` masks secrets, so printing one never leaks them."""

    request: str
    flow_id: str
    context: dict[str, Any]
    steps: tuple[Step, ...]
    secrets: frozenset[str] = field(default=frozenset(), repr=False)

    def masked_context(self) -> dict[str, Any]:
        """The context as it may be shown: secrets as ``***``."""
        return masked(self.context, self.secrets)

    def __repr__(self) -> str:
        return (
            f"FlowResult(request={self.request!r}, flow_id={self.flow_id!r},"
            f" context={self.masked_context()!r}, steps={len(self.steps)})"
        )
