"""SQLite for the example services: one database file per name, in one data folder.

The folder is ``$MESH_DATA_DIR`` if set, else ``.mesh-data/`` next to the config: the folder
of ``$MESH_CONFIG`` when that is set, else the folder holding this ``services`` package (mesh
imports services from the config's folder, so that is where the config is).

Handlers run on many threads at once, so open one connection per call and close it::

    with closing(store.connect("accounts", setup=create_tables)) as conn:
        with conn:  # one transaction: committed on success, rolled back on an exception
            conn.execute("INSERT ...")

Databases use WAL mode, so several processes (every machine of the mesh) can share a file.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["connect", "data_dir"]

Setup = Callable[[sqlite3.Connection], None]

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PROJECT = Path(__file__).resolve().parent.parent
_BUSY_SECONDS = 10.0

_lock = threading.Lock()
_ready: set[tuple[Path, Setup | None]] = set()


def data_dir() -> Path:
    """Where the databases live (not created here)."""
    explicit = os.environ.get("MESH_DATA_DIR")
    if explicit:
        return Path(explicit).resolve()
    config = os.environ.get("MESH_CONFIG")
    if config:
        return Path(config).resolve().parent / ".mesh-data"
    return _PROJECT / ".mesh-data"


def connect(name: str, setup: Setup | None = None) -> sqlite3.Connection:
    """Open database ``name`` (``<data dir>/<name>.sqlite3``), creating folder and file.

    ``setup`` (create tables, seed rows) runs the first time this process opens the file with
    it, before any thread gets a connection; it must be idempotent (``CREATE TABLE IF NOT
    EXISTS``, ``INSERT OR IGNORE``), since every process runs it once. Rows come back as
    :class:`sqlite3.Row`. The caller closes the connection.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"database name {name!r}: use letters, digits, '_' and '-'")
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.sqlite3"
    conn = sqlite3.connect(path, timeout=_BUSY_SECONDS)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, and faster
        key = (path, setup)
        if key not in _ready:
            with _lock:
                if key not in _ready:
                    conn.execute("PRAGMA journal_mode = WAL")  # stored in the file: once is enough
                    if setup is not None:
                        with conn:
                            setup(conn)
                    _ready.add(key)
    except BaseException:
        conn.close()
        raise
    return conn
