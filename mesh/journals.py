"""Which journal a ``[journal] url`` names: a SQLite file (mesh/journal.py) or a schema in
a PostgreSQL database shared by a machine's replicas (mesh/pgjournal.py).

Apart from both, so that neither journal module imports the other's.
"""

from __future__ import annotations

from pathlib import Path

from mesh.errors import JournalError
from mesh.journal import Journal, SqliteJournal
from mesh.pgjournal import PostgresJournal

__all__ = ["open_journal"]


def open_journal(
    url: str, *, synchronous: str = "full", create: bool = True, machine: str = ""
) -> Journal:
    """The journal at ``url`` (``sqlite:///ABSOLUTE/PATH``, or ``postgresql://…`` where
    ``machine``'s journal is a schema of its own); JournalError when it cannot be used.
    ``create``: make the file (and its folder) when missing."""
    if url.startswith("sqlite:///"):
        return SqliteJournal(Path(url[len("sqlite:///") :]), synchronous=synchronous, create=create)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresJournal(url, machine or "mesh", synchronous=synchronous)
    raise JournalError(f"{url}: a journal url starts sqlite:/// or postgresql://")
