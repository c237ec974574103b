"""The ``When`` and ``Each`` cells of a flow file: a tiny grammar, parsed once, never eval'd.

A condition decides whether a row runs, on the flow's context where the flow is. It is
written by the person who writes the flow file, read by everyone who reads it, and
evaluated on every machine of the mesh, so it is deliberately small (no parentheses,
no arithmetic, no calls) and parsed into plain data at load time: a malformed one is a
``FlowFileError`` naming ``PATH:ROW:`` before anything runs, and evaluating it is a
few dictionary lookups.

Grammar::

    condition := clause (("and" | "or") clause)*        and binds tighter than or
    clause    := KEY | "not" KEY
               | KEY ("==" | "!=") LITERAL
               | KEY ("<" | "<=" | ">" | ">=") NUMBER
               | KEY "in" "[" LITERAL ("," LITERAL)* "]"
    LITERAL   := a JSON number | a JSON string in double quotes | true | false | null

A key that is absent is falsy and equal to nothing (so ``KEY != LITERAL`` holds).
Values compare as JSON does: ``true`` is not ``1``, ``1`` is ``1.0``.

``Each`` names a list in the context, and optionally where the results go:
``items`` (results in ``items_results``) or ``items as reserved``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Condition", "ConditionError", "Each", "parse_condition", "parse_each"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORDS = frozenset({"and", "or", "not", "in", "true", "false", "null", "as"})
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
      | (?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![A-Za-z0-9_.]))
      | (?P<op>==|!=|<=|>=|<|>)
      | (?P<punct>[\[\],])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_ORDER = {"<", "<=", ">", ">="}


class ConditionError(ValueError):
    """A ``When`` or ``Each`` cell that does not parse; the flow file adds ``PATH:ROW:``."""


#: One clause: ``(op, key, value)``; op is "truthy", "not", "==", "!=", "<", "<=", ">",
#: ">=" or "in" (value a tuple of literals).
Clause = tuple[str, str, Any]


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed ``When`` cell: ``any(all(clauses) for clauses in alternatives)``."""

    text: str
    alternatives: tuple[tuple[Clause, ...], ...]

    def holds(self, context: Mapping[str, Any]) -> bool:
        """Whether the row runs with this ``context``."""
        return any(
            all(_clause(op, key, value, context) for op, key, value in conjunction)
            for conjunction in self.alternatives
        )

    @property
    def keys(self) -> tuple[str, ...]:
        """The context keys the condition reads, in order."""
        return tuple(dict.fromkeys(c[1] for alt in self.alternatives for c in alt))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Each:
    """A parsed ``Each`` cell: the list ``key`` runs the row once per element; the runs'
    updates go, in order, into ``results``."""

    key: str
    results: str

    @property
    def text(self) -> str:
        default = f"{self.key}_results"
        return self.key if self.results == default else f"{self.key} as {self.results}"

    def __str__(self) -> str:
        return self.text


def _same(a: Any, b: Any) -> bool:
    """JSON equality: a boolean is not a number, a number is a number whatever its type."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    return bool(a == b)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _clause(op: str, key: str, value: Any, context: Mapping[str, Any]) -> bool:
    missing = key not in context
    if op == "truthy":
        return not missing and bool(context[key])
    if op == "not":
        return missing or not context[key]
    if op == "!=":
        return missing or not _same(context[key], value)
    if missing:
        return False
    have = context[key]
    if op == "==":
        return _same(have, value)
    if op == "in":
        return any(_same(have, v) for v in value)
    if not _number(have):
        return False
    if op == "<":
        return bool(have < value)
    if op == "<=":
        return bool(have <= value)
    if op == ">":
        return bool(have > value)
    return bool(have >= value)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            rest = text[pos:].strip()
            raise ConditionError(f"cannot read {rest[:20]!r} in condition {text!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _literal(kind: str, value: str, text: str) -> Any:
    if kind == "string":
        return json.loads(value)
    if kind == "number":
        number = json.loads(value)
        if isinstance(number, float) and not math.isfinite(number):
            raise ConditionError(f"number {value} is too large in condition {text!r}")
        return number
    if kind == "word" and value in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[value]
    raise ConditionError(
        f'expected a literal (a number, a "string", true, false or null), found {value!r}'
        f" in condition {text!r}"
    )


def _key(kind: str, value: str, text: str) -> str:
    if kind != "word" or value in _WORDS:
        raise ConditionError(f"expected a context key, found {value!r} in condition {text!r}")
    return value


def parse_condition(text: str) -> Condition:
    """Parse a ``When`` cell (see the module docstring); ConditionError if it is malformed."""
    tokens = _tokens(text)
    if not tokens:
        raise ConditionError("the condition is empty")
    alternatives: list[tuple[Clause, ...]] = []
    current: list[Clause] = []
    i = 0

    def take() -> tuple[str, str]:
        nonlocal i
        if i >= len(tokens):
            raise ConditionError(f"condition {text!r} ends too early")
        token = tokens[i]
        i += 1
        return token

    while True:
        kind, value = take()
        if kind == "word" and value == "not":
            current.append(("not", _key(*take(), text), None))
        else:
            key = _key(kind, value, text)
            following = tokens[i] if i < len(tokens) else None
            if following is None or (following[0] == "word" and following[1] in ("and", "or")):
                current.append(("truthy", key, None))
            elif following[0] == "op":
                i += 1
                op = following[1]
                lit_kind, lit = take()
                literal = _literal(lit_kind, lit, text)
                if op in _ORDER and not _number(literal):
                    raise ConditionError(
                        f"{key} {op} needs a number, not {lit!r}, in condition {text!r}"
                    )
                current.append((op, key, literal))
            elif following == ("word", "in"):
                i += 1
                if take() != ("punct", "["):
                    raise ConditionError(f"{key} in needs a list [...] in condition {text!r}")
                values: list[Any] = []
                while True:
                    values.append(_literal(*take(), text))
                    sep = take()
                    if sep == ("punct", "]"):
                        break
                    if sep != ("punct", ","):
                        raise ConditionError(
                            f"expected , or ] in the list of {key}, found {sep[1]!r},"
                            f" in condition {text!r}"
                        )
                current.append(("in", key, tuple(values)))
            else:
                raise ConditionError(
                    f"expected and, or, an operator or the end after {key}, found"
                    f" {following[1]!r}, in condition {text!r}"
                )
        if i >= len(tokens):
            break
        kind, value = take()
        if kind == "word" and value == "and":
            continue
        if kind == "word" and value == "or":
            alternatives.append(tuple(current))
            current = []
            continue
        raise ConditionError(f"expected and or or, found {value!r}, in condition {text!r}")
    alternatives.append(tuple(current))
    return Condition(_canonical(tokens), tuple(alternatives))


def _canonical(tokens: list[tuple[str, str]]) -> str:
    """The condition as the mesh shows it and hashes it (the digest): its tokens as written,
    one space apart, none inside brackets or before a comma; a string literal unchanged."""
    out = ""
    for kind, value in tokens:
        if out and not (out.endswith("[") or (kind == "punct" and value in ",]")):
            out += " "
        out += value
    return out


def parse_each(text: str) -> Each:
    """Parse an ``Each`` cell: ``KEY`` or ``KEY as NAME``; ConditionError if malformed."""
    words = text.split()
    if len(words) == 1 and _KEY.fullmatch(words[0]) and words[0] not in _WORDS:
        return Each(words[0], f"{words[0]}_results")
    if (
        len(words) == 3
        and words[1] == "as"
        and all(_KEY.fullmatch(w) and w not in _WORDS for w in (words[0], words[2]))
    ):
        if words[2] in ("item", "index"):
            raise ConditionError(f"Each {text!r}: {words[2]} is the element's own key")
        return Each(words[0], words[2])
    raise ConditionError(
        f"Each {text!r} is not KEY or KEY as NAME (KEY naming a list in the context)"
    )
