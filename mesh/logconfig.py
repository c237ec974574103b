"""A sensible structlog chain for processes that run flows."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

import structlog

from mesh.processors import EventDict, mask_secrets, processor

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _MinLevel:
    """Drop events below a level *after* the mesh processor has seen them.

    A filtering bound logger would drop ``log.debug("next")`` before any
    processor runs, and the flow would stall; this keeps the hand-off working
    at every level while still keeping the output quiet.
    """

    __slots__ = ("_min",)

    def __init__(self, level: int) -> None:
        self._min = level

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        if _LEVELS.get(method_name, 20) < self._min:
            raise structlog.DropEvent
        return event_dict


def configure_logging(
    *,
    json: bool = False,
    level: str | int = "info",
    file: IO[str] | str | os.PathLike[str] | None = None,
) -> None:
    """Install the mesh processor first, then context variables, masking, a renderer.

    ``json=True`` writes one JSON object a line (for files and log shippers);
    otherwise a console format. Output goes to ``file`` (default stdout): an open
    text file, or a path, opened here for append in UTF-8 (an OSError naming it
    if it cannot be) and kept open for the life of the process.
    """
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
        min_level = _LEVELS[level.lower()]
    else:
        min_level = int(level)
    out: Any = sys.stdout if file is None else _writable(file)
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        processors=[
            processor,
            _MinLevel(min_level),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        # One write per line (PrintLogger writes the newline apart: peers sharing a
        # terminal would interleave mid-line).
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


#: Log files opened from a path, by absolute path: configuring the same path again
#: reuses its file, and none is closed under a logger that may still write to it.
_opened: dict[str, IO[str]] = {}


def _writable(file: IO[str] | str | os.PathLike[str]) -> IO[str]:
    if not isinstance(file, str | os.PathLike):
        return file
    path = os.path.abspath(os.fspath(file))
    opened = _opened.get(path)
    if opened is None or opened.closed:
        opened = _opened[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
    return opened


def chain_problem() -> str | None:
    """What is wrong with structlog's configured chain for routing flows, if anything."""
    procs = list(structlog.get_config().get("processors", []))
    at = next((i for i, p in enumerate(procs) if p is processor), None)
    if at is None:
        return (
            'structlog is configured without mesh.processor, so flow lines and "next"'
            " would do nothing: put mesh.processor first in processors=[...], or call"
            " mesh.configure_logging()"
        )
    if structlog.contextvars.merge_contextvars in procs[:at]:
        return (
            "mesh.processor comes after merge_contextvars in structlog's processors, so"
            ' "next" would copy context variables (flow_id, ...) into the flow context:'
            " put mesh.processor first"
        )
    return None
