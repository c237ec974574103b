"""The ``login`` request: check a password on the server and open a session.

Users and sessions live in the ``accounts`` database. Passwords are stored as scrypt hashes
with a random salt per user; a demo user ``ada`` (password ``lovelace``) is created the first
time a process opens the database. Neither the password nor its hash is ever logged or put in
an exception: a wrong password and an unknown user fail alike, with "invalid credentials".
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from contextlib import closing
from typing import Any

import structlog

import mesh
from services import store

__all__ = ["SESSION_SECONDS", "accounts", "hash_password", "verify_password"]

log = structlog.get_logger()

DEMO_USER = "ada"
DEMO_PASSWORD = "lovelace"
SESSION_SECONDS = 24 * 60 * 60

_USERNAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# scrypt cost: 2**14 * 8 * 128 bytes = 16 MiB of memory and some tens of ms per hash.
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash``: the parameters travel with the hash, so they can change."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``, compared in constant time."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(_unb64(expected)),
        )
    except ValueError:  # a malformed stored hash never matches
        return False
    return hmac.compare_digest(digest, _unb64(expected))


@functools.cache
def _dummy_hash() -> str:
    """Checked when the user does not exist, so an unknown name costs as much as a wrong one."""
    return hash_password(secrets.token_urlsafe(16))


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS users ("
        " username TEXT PRIMARY KEY,"
        " password_hash TEXT NOT NULL,"
        " created_at REAL NOT NULL,"
        " last_login REAL)"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS sessions ("
        " token TEXT PRIMARY KEY,"
        " username TEXT NOT NULL REFERENCES users(username),"
        " created_at REAL NOT NULL,"
        " expires_at REAL NOT NULL)"
    )
    # Hash only when missing; INSERT OR IGNORE keeps it right when processes race.
    if conn.execute("SELECT 1 FROM users WHERE username = ?", (DEMO_USER,)).fetchone() is None:
        conn.execute(
            "INSERT OR IGNORE INTO users (username, password_hash, created_at) VALUES (?, ?, ?)",
            (DEMO_USER, hash_password(DEMO_PASSWORD), time.time()),
        )


def accounts() -> sqlite3.Connection:
    """A new connection to the ``accounts`` database (users, sessions); close it."""
    return store.connect("accounts", setup=_setup)


def _username(ctx: dict[str, Any]) -> str:
    username = ctx.get("username")
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise ValueError("username must be 1-64 letters, digits, '.', '_' or '-'")
    return username


@mesh.handler("login", "Received request to login as :username")
def receive_login(ctx: dict[str, Any]) -> None:
    _username(ctx)
    if not isinstance(ctx.get("password"), str) or not ctx["password"]:
        raise ValueError("password is required")
    log.info("next")


@mesh.handler("login", "Testing password for :username")
def test_password(ctx: dict[str, Any]) -> None:
    username = _username(ctx)
    with closing(accounts()) as conn:
        row = conn.execute(
            "SELECT password_hash FROM users WHERE username = ?", (username,)
        ).fetchone()
    stored = row["password_hash"] if row is not None else _dummy_hash()
    if not verify_password(str(ctx.get("password", "")), stored) or row is None:
        raise PermissionError("invalid credentials")
    log.info("next", verified=True)


@mesh.handler("login", "Setting session for :username")
def set_session(ctx: dict[str, Any]) -> None:
    username = _username(ctx)
    token = secrets.token_urlsafe(32)
    now = time.time()
    with closing(accounts()) as conn, conn:
        conn.execute(
            "INSERT INTO sessions (token, username, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (token, username, now, now + SESSION_SECONDS),
        )
        conn.execute("UPDATE users SET last_login = ? WHERE username = ?", (now, username))
        # The hand-off happens when this handler returns, after the commit.
        log.info("next", session=token)
