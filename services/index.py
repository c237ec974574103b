"""The ``index`` request: check the session, list questions, and send a sign-in email.

The server reads sessions (written by :mod:`services.login`) and questions; the
emailservice does not really send mail: it records the message in its ``email``
database's ``outbox`` table, which is what a mail worker would drain.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from typing import Any

import structlog

import mesh
from services import store
from services.login import accounts

__all__ = ["outbox"]

log = structlog.get_logger()

_SEED_QUESTIONS = [
    (1, "How does a flow find the next machine?"),
    (2, "What happens when a step raises?"),
    (3, "Can a secret ever reach the logs?"),
]


def _questions_setup(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS questions (id INTEGER PRIMARY KEY, title TEXT NOT NULL)"
    )
    conn.executemany("INSERT OR IGNORE INTO questions (id, title) VALUES (?, ?)", _SEED_QUESTIONS)


def _outbox_setup(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS outbox ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " recipient TEXT NOT NULL,"
        " subject TEXT NOT NULL,"
        " body TEXT NOT NULL,"
        " created_at REAL NOT NULL)"
    )


def outbox() -> sqlite3.Connection:
    """A new connection to the ``email`` database (its ``outbox`` table); close it."""
    return store.connect("email", setup=_outbox_setup)


@mesh.handler("index", "Checking if signed in")
def check_signed_in(ctx: dict[str, Any]) -> None:
    token = ctx.get("session")
    owner: str | None = None
    if isinstance(token, str) and token:
        with closing(accounts()) as conn:
            row = conn.execute(
                "SELECT username FROM sessions WHERE token = ? AND expires_at > ?",
                (token, time.time()),
            ).fetchone()
        owner = None if row is None else str(row["username"])
    given = ctx.get("username")
    if owner is not None and given is None:  # the session says who is signing in
        log.info("next", signed_in=True, username=owner)
    else:  # a session signs in only its own user
        log.info("next", signed_in=owner is not None and given == owner)


@mesh.handler("index", "Generating list of questions")
def generate_questions(ctx: dict[str, Any]) -> None:
    if isinstance(ctx.get("questions"), list):  # given by the caller: keep them
        log.info("next")
        return
    with closing(store.connect("content", setup=_questions_setup)) as conn:
        rows = conn.execute("SELECT id, title FROM questions ORDER BY id").fetchall()
    log.info("next", questions=[dict(row) for row in rows])


@mesh.handler("index", "Sending sign in email")
def send_sign_in_email(ctx: dict[str, Any]) -> None:
    recipient = str(ctx.get("username", "guest"))
    questions = ctx.get("questions") or []
    count = len(questions) if isinstance(questions, list) else 0
    noun = "question" if count == 1 else "questions"
    if ctx.get("signed_in"):
        subject = f"{count} new {noun} for you"
        body = f"Hi {recipient},\n\nThere are {count} {noun} waiting for you.\n"
    else:
        subject = "Sign in to see today's questions"
        body = f"Hi {recipient},\n\nSign in to see the {count} {noun} waiting for you.\n"
    with closing(outbox()) as conn, conn:
        cursor = conn.execute(
            "INSERT INTO outbox (recipient, subject, body, created_at) VALUES (?, ?, ?, ?)",
            (recipient, subject, body, time.time()),
        )
        log.info("next", email_id=cursor.lastrowid)
