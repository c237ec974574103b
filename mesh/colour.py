"""Colour for the mesh's own output on a terminal; plain text anywhere else.

A stream gets colour when it is a terminal (and ``TERM`` is not ``dumb``), unless the user
said otherwise: ``NO_COLOR`` (any non-empty value, https://no-color.org) turns it off,
``FORCE_COLOR`` (any non-empty value but ``0``) turns it on for pipes and files too.
``NO_COLOR`` wins when both are set, as in CPython's own traceback colours. Pure: it reads
the environment and the stream, and returns strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["Palette", "enabled", "palette"]

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


def enabled(stream: IO[Any] | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether text written to ``stream`` should be coloured."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR", "") not in ("", "0"):
        return True
    if env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class Palette:
    """Styles text with ANSI codes when ``on``; returns it unchanged otherwise."""

    __slots__ = ("on",)

    def __init__(self, on: bool) -> None:
        self.on = on

    def paint(self, text: str, *styles: str) -> str:
        if not self.on or not text or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def bold(self, text: str) -> str:
        return self.paint(text, "bold")

    def red(self, text: str) -> str:
        return self.paint(text, "red")

    def green(self, text: str) -> str:
        return self.paint(text, "green")

    def yellow(self, text: str) -> str:
        return self.paint(text, "yellow")

    def dim(self, text: str) -> str:
        return self.paint(text, "dim")


def palette(stream: IO[Any] | None) -> Palette:
    """The palette for writing to ``stream``."""
    return Palette(enabled(stream))
