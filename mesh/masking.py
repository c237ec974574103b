"""Secrets: one mask, and the scrubbing of their values from whatever may be shown.

A flow file marks a value secret with ``#name``. Wherever a secret could be shown (a
rendered line, a log event, a result's ``repr``, an error message), its key shows
:data:`MASK` and its value is scrubbed from the text around it. Pure functions: the
structlog processor that applies them to log events is ``mesh.processors.mask_secrets``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "SCRUB_MIN", "masked", "scrub", "scrub_any", "secret_values"]

#: What a secret renders as. One constant, so that no place shows a secret another way.
MASK = "***"

#: Free-text scrubbing leaves shorter secrets alone: they would mangle ordinary words.
SCRUB_MIN = 4


def secret_values(context: Mapping[str, Any], secrets: frozenset[str]) -> list[str]:
    """The values of ``secrets`` in ``context`` long enough to scrub from free text."""
    values = (str(context[k]) for k in secrets if context.get(k) is not None)
    return [v for v in values if len(v) >= SCRUB_MIN]


def scrub(text: str, values: list[str]) -> str:
    """``text`` with every one of ``values`` replaced by ``***``."""
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def _scrub_deep(value: Any, values: list[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, values)
    if isinstance(value, dict):
        return {k: _scrub_deep(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_deep(v, values) for v in value]
    return value


def scrub_any(value: Any, values: list[str]) -> Any:
    """Any value a log event may carry, with ``values`` scrubbed from wherever a renderer
    would print them: inside strings, containers, and the ``repr`` of other objects.

    Returns ``value`` itself when nothing needed scrubbing, so callers can tell cheaply.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value, values)
    if isinstance(value, dict | list):
        scrubbed = _scrub_deep(value, values)
        return value if scrubbed == value else scrubbed
    if isinstance(value, tuple | set | frozenset):
        items = [scrub_any(v, values) for v in value]
        changed = any(a is not b for a, b in zip(items, value, strict=True))
        return type(value)(items) if changed else value
    shown = repr(value)  # what a renderer would print for an arbitrary object
    cleaned = scrub(shown, values)
    return value if cleaned is shown else cleaned


def masked(context: Mapping[str, Any], secrets: frozenset[str]) -> dict[str, Any]:
    """A copy of ``context`` fit to show: secret keys as ``***``, their values scrubbed
    from the text of every other value."""
    values = secret_values(context, secrets)
    return {
        k: (MASK if k in secrets else _scrub_deep(v, values) if values else v)
        for k, v in context.items()
    }
