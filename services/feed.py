"""The ``feed`` request: the server reads the latest feed items from the ``content`` database."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import Any

import structlog

import mesh
from services import store

__all__ = ["content"]

log = structlog.get_logger()

MAX_ITEMS = 50
DEFAULT_ITEMS = 10

_SEED_ITEMS = [
    (1, "Notes on the Analytical Engine", "ada", 42),
    (2, "Structured logs as a call graph", "grace", 17),
    (3, "Why every flow needs a timeline", "alan", 8),
]


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS items ("
        " id INTEGER PRIMARY KEY,"
        " title TEXT NOT NULL,"
        " author TEXT NOT NULL,"
        " score INTEGER NOT NULL DEFAULT 0)"
    )
    # Fixed ids: seeding twice, or from two processes at once, adds nothing.
    conn.executemany(
        "INSERT OR IGNORE INTO items (id, title, author, score) VALUES (?, ?, ?, ?)", _SEED_ITEMS
    )


def content() -> sqlite3.Connection:
    """A new connection to the ``content`` database; close it."""
    return store.connect("content", setup=_setup)


def _limit(ctx: dict[str, Any]) -> int:
    raw = ctx.get("limit", DEFAULT_ITEMS)
    try:
        limit = int(raw)  # "limit=5" from the command line arrives as a string
    except (TypeError, ValueError):
        raise ValueError(f"limit must be an integer, not {raw!r}") from None
    if not 1 <= limit <= MAX_ITEMS:
        raise ValueError(f"limit must be between 1 and {MAX_ITEMS}, not {limit}")
    return limit


@mesh.handler("feed", "Retrieving feed information")
def retrieve_feed(ctx: dict[str, Any]) -> None:
    with closing(content()) as conn:
        rows = conn.execute(
            "SELECT id, title, author, score FROM items ORDER BY id DESC LIMIT ?", (_limit(ctx),)
        ).fetchall()
    log.info("next", items=[dict(row) for row in rows])
