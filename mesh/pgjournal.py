"""The journal in PostgreSQL: shared by a machine's replicas, wherever they run.

``[journal] url = "postgresql://…"`` puts every machine's journal in that database, each
machine in a schema of its own (``mesh_<machine>``), so the replicas of one machine on
different hosts share one journal: a step one replica accepted and did not finish is
finished by another, and a resend reaching the other replica gets the recorded reply.

The records and their meaning are :class:`mesh.journal.SqliteJournal`'s, written by the
same code (one writer thread, group commit); only what differs between the two databases
is here: connections, the schema's types, an upsert, placeholders, the size, and **who
is alive**. A stay's owner in a local file is a process id, alive while the process is;
across hosts it is a random id that its process renews in ``mesh_owners`` every second
(a lease): a stay whose owner has not renewed for :data:`LEASE` seconds is an orphan,
and any replica may claim it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from mesh.errors import JournalError
from mesh.journal import _SCHEMA, _STAY_COLUMNS, RUNNING, SCHEMA_VERSION, SqliteJournal, Stay, _stay

__all__ = ["LEASE", "PostgresJournal"]

#: Seconds after its owner's last renewal when a running stay may be claimed by another.
LEASE = 5.0
#: How often a process renews its lease.
RENEW = 1.0

_TYPES = (("BLOB", "BYTEA"), ("REAL", "DOUBLE PRECISION"), ("INTEGER", "BIGINT"))


def _pg_schema() -> list[str]:
    statements = []
    for sqlite_statement in _SCHEMA:
        statement = sqlite_statement
        for sqlite_type, pg_type in _TYPES:
            statement = re.sub(rf"\b{sqlite_type}\b", pg_type, statement)
        statements.append(statement)
    statements.append(
        "CREATE TABLE IF NOT EXISTS mesh_owners (owner BIGINT PRIMARY KEY, host TEXT NOT NULL,"
        " seen DOUBLE PRECISION NOT NULL)"
    )
    return statements


def _pg(sql: str) -> str:
    """A statement of the SQLite journal's, in PostgreSQL's spelling."""
    return sql.replace("?", "%s").replace("MAX(deadline,", "GREATEST(deadline,")


class PostgresJournal(SqliteJournal):
    """A machine's journal in a PostgreSQL database shared by its replicas."""

    def __init__(self, url: str, machine: str, *, synchronous: str = "full") -> None:
        try:
            import psycopg  # noqa: PLC0415 - an optional extra, for this journal only
        except ImportError:
            raise JournalError(
                f"{_safe(url)}: a postgresql:// journal needs psycopg"
                " (pip install 'structlog-mesh[postgres]')"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self.where = f"{_safe(url)} (schema mesh_{machine})"
        self.schema = f"mesh_{re.sub(r'[^A-Za-z0-9_]', '_', machine)}"
        # "normal": a commit returns before the server's WAL reaches the disk, as SQLite's
        # synchronous=NORMAL in WAL mode (a crash of the server may lose the last commits).
        self.synchronous = "on" if synchronous == "full" else "off"
        self.owner = secrets.randbits(62)
        self.shared = True
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        writer = self._connect()
        self._check_schema(writer)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer_conn = writer
        self._closed = False
        self._renew()
        self._stop_lease = threading.Event()
        self._lease = threading.Thread(target=self._keep_lease, name="mesh-lease", daemon=True)
        self._lease.start()
        self._thread = threading.Thread(target=self._write_loop, name="mesh-journal", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<PostgresJournal {self.where}>"

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            conn.execute(f'SET search_path TO "{self.schema}"')
            conn.execute(f"SET synchronous_commit TO {self.synchronous}")
        except psycopg.Error as exc:
            raise JournalError(f"{self.where}: cannot use the journal: {_line(exc)}") from None
        with self._lock:
            self._connections.append(conn)
        return _Connection(conn)

    def _check_schema(self, conn: Any) -> None:
        psycopg = self._psycopg
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
            for statement in _pg_schema():
                conn.execute(statement)
            row = conn.execute(
                "SELECT value FROM mesh_meta WHERE key = 'schema_version'"
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO mesh_meta (key, value) VALUES ('schema_version', %s)",
                    (str(SCHEMA_VERSION),),
                )
            elif not str(row[0]).isdigit() or int(row[0]) > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise JournalError(
                    f"{self.where}: journal schema version {row[0]} was written by a newer"
                    f" mesh (this one reads up to {SCHEMA_VERSION}); upgrade the mesh"
                )
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise JournalError(f"{self.where}: cannot set up the journal: {_line(exc)}") from None

    # -- the lease ------------------------------------------------------------------------

    def _renew(self) -> None:
        self._reader().execute(
            "INSERT INTO mesh_owners (owner, host, seen) VALUES (%s, %s, %s)"
            " ON CONFLICT (owner) DO UPDATE SET seen = EXCLUDED.seen",
            (self.owner, socket.gethostname(), time.time()),
        )

    def _keep_lease(self) -> None:
        while not self._stop_lease.wait(RENEW):
            with contextlib.suppress(Exception):  # a lost server: the lease lapses, as it must
                self._renew()

    # -- writing and reading ------------------------------------------------------------

    def _apply(
        self, conn: Any, batch: Sequence[tuple[list[Any], Any]]
    ) -> tuple[list[int], JournalError | None]:
        """:meth:`SqliteJournal._apply` in PostgreSQL: every record of ``batch`` in one
        transaction; each counts 1 (an upsert: the accept always takes the stay)."""
        psycopg = self._psycopg
        try:
            conn.execute("BEGIN")
            try:
                for ops, _ in batch:
                    for sql, params in ops:
                        conn.execute(_pg(sql), params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except psycopg.Error as exc:
            return [], JournalError(f"{self.where}: journal write failed: {_line(exc)}")
        return [1] * len(batch), None

    def _submit_here(self, ops: list[Any]) -> asyncio.Future[int]:
        """A record asked for on an event loop: through the writer thread (the SQLite
        journal's loop-side commit is SQLite's own)."""
        return asyncio.wrap_future(self._submit(ops))

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(self._reader().execute(_pg(sql), params).fetchall())
        except self._psycopg.Error as exc:
            raise JournalError(f"{self.where}: cannot read the journal: {_line(exc)}") from None

    def accept(self, stay: Stay) -> Any:
        """:meth:`SqliteJournal.accept`, but the stay is taken even when known (an upsert)."""
        return self._submit(self._accept_ops(stay, replace=True))

    def progress_in(  # noqa: PLR0917 - the record's fields, in order
        self,
        conn: Any,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        steps: Sequence[Any],
    ) -> None:
        for sql, params in self._progress_ops(flow_id, line, position, context, None, None, steps):
            conn.execute(_pg(sql), params)

    def orphans(self) -> list[Stay]:
        """Running stays whose owner's lease has lapsed (on any host): to recover. One query,
        however many stays run: replicas ask every second."""
        columns = ", ".join(f"s.{c.strip()}" for c in _STAY_COLUMNS.split(","))
        rows = self._rows(
            f"SELECT {columns} FROM mesh_stays s WHERE s.state = %s AND s.owner <> %s"
            " AND NOT EXISTS (SELECT 1 FROM mesh_owners o"
            " WHERE o.owner = s.owner AND o.seen > %s) ORDER BY s.started",
            (RUNNING, self.owner, time.time() - LEASE),
        )
        return [_stay(r) for r in rows]

    # claim(): SqliteJournal's, with the row locked so two replicas never both claim it.
    _CLAIM_BEGIN = "BEGIN"
    _CLAIM_LOCK = " FOR UPDATE"

    def _claimable(self, conn: Any, owner: int) -> bool:
        """Its lease has lapsed (on any host), or it is this process, or none (0)."""
        if owner in (self.owner, 0):  # 0: reset by mesh flows retry
            return True
        row = conn.execute("SELECT seen FROM mesh_owners WHERE owner = %s", (owner,)).fetchone()
        return row is None or row[0] <= time.time() - LEASE

    def _spelled(self, sql: str) -> str:
        return _pg(sql)

    def size(self) -> int:
        rows = self._rows(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'r'",
            (self.schema,),
        )
        return int(rows[0][0])

    def close(self) -> None:
        if self._closed:
            return
        self._stop_lease.set()
        self._lease.join(5.0)
        # A clean stop gives its lease up at once: its running stays are orphans now.
        with contextlib.suppress(Exception):
            self._reader().execute("DELETE FROM mesh_owners WHERE owner = %s", (self.owner,))
        super().close()


class _Connection:
    """A psycopg connection that also takes the SQLite journal's ``BEGIN IMMEDIATE``, so the
    runtime's step_transaction can begin on either journal's connection alike. Statements
    pass as written: a handler writes PostgreSQL's own placeholders (``%s``)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        if sql == "BEGIN IMMEDIATE":
            sql = "BEGIN"
        return self._conn.execute(sql, params)

    def close(self) -> None:
        self._conn.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _safe(url: str) -> str:
    """The url without its password: it names the journal in errors and logs."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
