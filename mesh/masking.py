"""Secrets: one mask, and the scrubbing of their values from whatever may be shown.

A flow file marks a value secret with ``#name``. Wherever a secret could be shown (a
rendered line, a log event, a result's ``repr``, an error message), its key shows
:data:`MASK` and its value is scrubbed from the text around it. Pure functions: the
structlog processor that applies them to log events is ``mesh.processors.mask_secrets``.

A value reaches a log line or a message in more than one form, and every form is
scrubbed: its ``str``; its ``repr`` (``{x!r}``, a ``KeyError``'s message, a container
printed), where a backslash or a quote comes out escaped; its JSON (``json.dumps`` in a
handler), escaped likewise; each of these escaped once more (the repr of a repr, JSON
of a repr); as a dict key as well as a value; and a number by its text, so ``pin:=482913``
logged under another key or inside a list shows ``***`` as the same value as a string
would. The forms of a flow's secrets are worked out once per set of values
(:func:`secret_values` keeps them), so the structlog processor, which runs for every
event of a flow with secrets, pays for a few substring searches per field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "MASK",
    "SCRUB_MIN",
    "Forms",
    "masked",
    "scrub",
    "scrub_any",
    "scrub_fields",
    "secret_values",
]

#: What a secret renders as. One constant, so that no place shows a secret another way.
MASK = "***"

#: Free-text scrubbing leaves shorter secrets alone: they would mangle ordinary words.
SCRUB_MIN = 4

#: Every character the text of an int or a float may hold (``-1.5e+20``, ``inf``, ``nan``):
#: only a form made of these can be inside a number's text.
_NUMBER_CHARS = frozenset("0123456789.+-einfa")


@dataclass(frozen=True, slots=True)
class Forms:
    """The texts a flow's secret values take when shown: what :func:`scrub` removes."""

    texts: tuple[str, ...] = ()  # longest first, so no form is cut by a shorter one inside it
    numeric: bool = False  # some form could be in a number's text: numbers must be looked at

    def __bool__(self) -> bool:
        return bool(self.texts)


NO_FORMS = Forms()


def _escaped(text: str) -> tuple[str, ...]:
    """``text`` as ``str``, ``repr``, ``ascii`` and JSON (ASCII or not) write it, unquoted."""
    return (
        text,
        repr(text)[1:-1],
        ascii(text)[1:-1],
        json.dumps(text)[1:-1],
        json.dumps(text, ensure_ascii=False)[1:-1],
    )


@lru_cache(maxsize=256)
def _forms(values: tuple[str, ...]) -> Forms:
    found = {twice for value in values for once in _escaped(value) for twice in _escaped(once)}
    texts = tuple(sorted((t for t in found if len(t) >= SCRUB_MIN), key=len, reverse=True))
    return Forms(texts, any(_NUMBER_CHARS.issuperset(t) for t in texts))


def _texts(value: Any) -> Iterator[str]:
    """The text of a secret value; of each string, number and key inside a container."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bool):
        yield str(value)
    elif isinstance(value, int | float):
        yield repr(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _texts(item)
    elif value is not None:
        yield str(value)


def secret_values(context: Mapping[str, Any], secrets: frozenset[str]) -> Forms:
    """The forms of the values of ``secrets`` in ``context`` to scrub from what is shown
    (values of :data:`SCRUB_MIN` characters or more)."""
    values: list[str] = []
    for key in secrets:
        value = context.get(key)
        if type(value) is str:  # the common case, without a generator
            values.append(value)
        elif value is not None:
            values.extend(_texts(value))
    return _forms(tuple(values)) if values else NO_FORMS


def scrub(text: str, values: Forms) -> str:
    """``text`` with every form of ``values`` replaced by ``***``."""
    for value in values.texts:
        if value in text:
            text = text.replace(value, MASK)
    return text


def _number(value: int | float, values: Forms) -> Any:
    """A number whose text holds a secret, as that text scrubbed; else the number itself."""
    if not values.numeric:
        return value
    shown = repr(value)
    cleaned = scrub(shown, values)
    return value if cleaned is shown else cleaned


def _key(key: Any, values: Forms) -> Any:
    if isinstance(key, str):
        return scrub(key, values)
    if isinstance(key, int | float) and not isinstance(key, bool):
        return _number(key, values)
    return key


def _scrub_deep(value: Any, values: Forms) -> Any:
    """``value`` with ``values`` scrubbed, dicts and lists copied all the way down."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            _put(out, _key(k, values), _scrub_deep(v, values))
        return out
    if isinstance(value, list):
        return [_scrub_deep(v, values) for v in value]
    return scrub_any(value, values)


def _put(out: MutableMapping[Any, Any], key: Any, value: Any) -> None:
    """``out[key] = value``, where two keys scrubbed alike (``***``) keep both values."""
    if key in out:
        n = 2
        while f"{key} ({n})" in out:
            n += 1
        key = f"{key} ({n})"
    out[key] = value


def scrub_any(value: Any, values: Forms) -> Any:
    """Any value a log event may carry, with ``values`` scrubbed from wherever a renderer
    would print them: inside strings, numbers, containers (keys too), and the ``repr`` of
    other objects.

    Returns ``value`` itself when nothing needed scrubbing, so callers can tell cheaply.
    """
    kind = type(value)
    if kind is str:  # the common cases first: this runs for every field of every event
        return scrub(value, values)
    if kind is int or kind is float:
        return _number(value, values) if values.numeric else value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return scrub(value, values)
    if isinstance(value, int | float):
        return _number(value, values)
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


def scrub_fields(event: MutableMapping[str, Any], values: Forms) -> None:
    """Scrub ``values`` from every field of a log event in place: its values, and its keys
    (``log.info("x", **{token: user})`` makes a secret a key)."""
    renamed: list[tuple[str, str]] = []
    for key, value in event.items():
        # Containers and objects too: a renderer prints what is inside them.
        scrubbed = scrub_any(value, values)
        if scrubbed is not value:
            event[key] = scrubbed
        for form in values.texts:
            if form in key:
                renamed.append((key, scrub(key, values)))
                break
    for old, new in renamed:
        _put(event, new, event.pop(old))


def masked(context: Mapping[str, Any], secrets: frozenset[str]) -> dict[str, Any]:
    """A copy of ``context`` fit to show: secret keys as ``***``, their values scrubbed
    from every other value and key, as text or number."""
    values = secret_values(context, secrets)
    out: dict[str, Any] = {}
    for k, v in context.items():
        if k in secrets:
            out[k] = MASK
        elif values:
            _put(out, scrub(k, values), _scrub_deep(v, values))
        else:
            out[k] = v
    return out
