"""The journal of a machine's durable flows: what each stay of a flow here did, on disk.

A *stay* is a flow's visit to this machine: a call served (keyed by the flow id and the
line the call was for), or a flow started here (``node.start``: line 0, ``origin``). For
each durable stay the runtime records, one transaction each:

* **accept**: the call as received (its bytes, so a recovered stay can be answered to a
  resend of the very same call), the context, who sent it, its deadline (wall clock),
  before any handler runs;
* **progress**: after a step, the context after it and where the flow goes next here: a
  local line, or a call downstream (its bytes, to resend them unchanged after a crash);
* **finish**: the reply the stay gave (or, for a flow started here, its result), before it
  leaves: the exactly-once record of a durable step, which survives restarts.

Writes go through one writer thread that commits whatever is queued in one transaction
(group commit), so 32 flows in flight cost a few commits, not 32. A handler may write to
the journal's database in its step's own transaction (``mesh.step_transaction()``): its
connection is one per worker thread, and the runtime commits the handler's writes with the
step's progress record.

:class:`Journal` is the protocol the runtime uses; :class:`SqliteJournal` the one
implementation for now (SQL kept portable, connection handling in the class, so a
Postgres journal shared by a machine's replicas can be added beside it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mesh.errors import JournalError

__all__ = [
    "SCHEMA_VERSION",
    "Journal",
    "SqliteJournal",
    "Stay",
    "StepRow",
]

#: The schema this code writes; a file with a higher one is refused (a newer mesh wrote it).
SCHEMA_VERSION = 1

#: A stay's states: running (accepted, not finished), and how it finished.
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS mesh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # One row per stay of a durable flow on this machine; no index besides its key, so a
    # record writes two b-trees at most. ``steps``: the lines it ran, a JSON array a line,
    # appended by each record (its timeline, and a recovered stay's reply).
    "CREATE TABLE IF NOT EXISTS mesh_stays ("
    " flow_id TEXT NOT NULL, line INTEGER NOT NULL, request TEXT NOT NULL,"
    " digest TEXT NOT NULL, sender TEXT NOT NULL, origin INTEGER NOT NULL,"
    " fingerprint BLOB, payload BLOB, context BLOB NOT NULL, position INTEGER NOT NULL,"
    " call BLOB, call_machine TEXT, state TEXT NOT NULL, outcome BLOB, error TEXT,"
    " deadline REAL NOT NULL, owner INTEGER NOT NULL, started REAL NOT NULL,"
    " updated REAL NOT NULL, steps TEXT NOT NULL DEFAULT '', PRIMARY KEY (flow_id, line))",
)

_STAY_COLUMNS = (
    "flow_id, line, request, digest, sender, origin, fingerprint, payload, context,"
    " position, call, call_machine, state, outcome, error, deadline, owner, started, updated"
)


@dataclass(frozen=True, slots=True)
class Stay:
    """One stay of a durable flow on this machine, as the journal has it."""

    flow_id: str
    line: int
    request: str
    digest: str
    sender: str
    origin: bool
    fingerprint: bytes | None
    payload: bytes | None
    context: bytes
    position: int
    call: bytes | None
    call_machine: str | None
    state: str
    outcome: bytes | None
    error: str | None
    deadline: float
    owner: int
    started: float
    updated: float

    def last_context(self) -> bytes:
        """The context last recorded: a record of a call in flight keeps it only in the
        call's bytes (not twice)."""
        if not self.context and self.call:
            from mesh.v1 import mesh_pb2  # noqa: PLC0415 - only for a stay waiting on a call

            return mesh_pb2.ContinueRequest.FromString(self.call).context  # type: ignore[no-any-return]
        return self.context


@dataclass(frozen=True, slots=True)
class StepRow:
    """A line a stay ran (or failed), for the timeline: the log line is rendered, masked."""

    flow_id: str
    stay: int
    line: int
    machine: str
    log: str
    state: str  # done | failed
    at: float
    duration: float
    error: str | None


#: (index, rendered line, machine, start, duration): runtime.LocalStep.
LocalStep = tuple[int, str, str, float, float]

Op = tuple[str, Sequence[Any]]


class Journal(Protocol):
    """What the runtime and the inspection tools need of a journal."""

    where: str
    #: Who this process is in the journal's ``owner`` column (a stay it accepted is its).
    owner: int
    #: Whether other processes, maybe on other hosts, use this journal while it runs: then
    #: a peer looks for orphans as it serves, not only when it starts.
    shared: bool

    def accept(self, stay: Stay) -> concurrent.futures.Future[int]: ...

    def progress(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        call: bytes | None,
        call_machine: str | None,
        steps: Sequence[LocalStep],
        *,
        first: Stay | None = None,
    ) -> concurrent.futures.Future[int]: ...

    def finish(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        state: str,
        outcome: bytes | None,
        error: str | None,
        context: bytes | None,
        steps: Sequence[LocalStep],
        failed: StepRow | None = None,
        *,
        first: Stay | None = None,
    ) -> concurrent.futures.Future[int]: ...

    def accept_async(self, stay: Stay) -> asyncio.Future[int]: ...

    def progress_async(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        call: bytes | None,
        call_machine: str | None,
        steps: Sequence[LocalStep],
        *,
        first: Stay | None = None,
    ) -> asyncio.Future[int]: ...

    def finish_async(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        state: str,
        outcome: bytes | None,
        error: str | None,
        context: bytes | None,
        steps: Sequence[LocalStep],
        failed: StepRow | None = None,
        *,
        first: Stay | None = None,
    ) -> asyncio.Future[int]: ...

    def progress_in(  # noqa: PLR0917 - the record's fields, in order
        self,
        conn: Any,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        steps: Sequence[LocalStep],
    ) -> None: ...

    def step_connection(self) -> Any: ...

    def stay(self, flow_id: str, line: int) -> Stay | None: ...

    def stays(
        self,
        *,
        flow_id: str | None = None,
        states: Iterable[str] = (),
        since: float | None = None,
    ) -> list[Stay]: ...

    def steps(self, flow_id: str) -> list[StepRow]: ...

    def orphans(self) -> list[Stay]: ...

    def local_steps(self, flow_id: str, stay: int) -> list[LocalStep]: ...

    def claim(self, flow_id: str, line: int) -> bool: ...

    def set_state(self, flow_id: str, line: int, state: str, error: str | None = None) -> None: ...

    def reset(self, flow_id: str, line: int) -> bool: ...

    def prune(self, keep: float) -> int: ...

    def size(self) -> int: ...

    def close(self) -> None: ...


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (the owner of a stay in a local file)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Stop:
    """Tells the writer thread to end."""


class SqliteJournal:
    """A journal in one SQLite file, in WAL mode; every write through one writer thread."""

    def __init__(self, path: Path, *, synchronous: str = "full", create: bool = True) -> None:
        self.path = path
        self.where = str(path)
        self.owner = os.getpid()
        self.shared = False
        self.synchronous = "FULL" if synchronous == "full" else "NORMAL"
        if not path.exists():
            if not create:
                raise JournalError(f"{path}: no such journal")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JournalError(f"{path}: cannot make its folder: {exc.strerror}") from None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        writer = self._connect()
        self._check_schema(writer)
        self._queue: queue.SimpleQueue[tuple[list[Op], concurrent.futures.Future[int]] | _Stop]
        self._queue = queue.SimpleQueue()
        self._writer_conn = writer
        self._closed = False
        self._here: list[tuple[list[Op], asyncio.Future[int]]] | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._write_loop, name="mesh-journal", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<SqliteJournal {self.where}>"

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.where, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.where}: not a usable journal: {exc}") from None
        with self._lock:
            self._connections.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def step_connection(self) -> sqlite3.Connection:
        """This thread's connection, for a handler's writes in its step's transaction."""
        return self._reader()

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        try:
            tables = {
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if "mesh_meta" in tables:
                row = conn.execute(
                    "SELECT value FROM mesh_meta WHERE key = 'schema_version'"
                ).fetchone()
                version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
                if version is None:
                    raise JournalError(f"{self.where}: journal has no schema version row")
                if version > SCHEMA_VERSION:
                    raise JournalError(
                        f"{self.where}: journal schema version {version} was written by a newer"
                        f" mesh (this one reads up to {SCHEMA_VERSION}); upgrade the mesh"
                    )
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO mesh_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise JournalError(f"{self.where}: journal is corrupt ({check and check[0]})")
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.where}: journal is corrupt or not SQLite: {exc}") from None

    # -- the writer ---------------------------------------------------------------------

    def _submit(self, ops: list[Op]) -> concurrent.futures.Future[int]:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(JournalError(f"{self.where}: journal is closed"))
            return future
        self._queue.put((ops, future))
        return future

    def _write_loop(self) -> None:
        conn = self._writer_conn
        q = self._queue
        while True:
            item = q.get()
            batch: list[tuple[list[Op], concurrent.futures.Future[int]]] = []
            stop = False
            while True:
                if isinstance(item, _Stop):
                    stop = True
                else:
                    batch.append(item)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(conn, batch)
            if stop:
                return

    def _apply(
        self, conn: sqlite3.Connection, batch: Sequence[tuple[list[Op], Any]]
    ) -> tuple[list[int], JournalError | None]:
        """Every record of ``batch`` in one transaction: the rows each changed, or the
        error that rolled them all back."""
        counts: list[int] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for ops, _ in batch:
                    before = conn.total_changes
                    for sql, params in ops:
                        conn.execute(sql, params)
                    counts.append(conn.total_changes - before)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            return counts, JournalError(f"{self.where}: journal write failed: {exc}")
        return counts, None

    def _commit(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[list[Op], concurrent.futures.Future[int]]],
    ) -> None:
        counts, error = self._apply(conn, batch)
        later: dict[asyncio.AbstractEventLoop, list[tuple[Any, int]]] = {}
        for (_, future), count in zip(batch, counts or [0] * len(batch), strict=False):
            if isinstance(future, asyncio.Future):
                # Told on its own loop, once per batch: one wake-up, not one a record.
                later.setdefault(future.get_loop(), []).append((future, count))
            elif error is None:
                future.set_result(count)
            else:
                future.set_exception(error)
        for loop, settled in later.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, settled, error)

    # -- records ------------------------------------------------------------------------

    def accept(self, stay: Stay) -> concurrent.futures.Future[int]:
        """Record a stay as accepted (running), before any handler of it runs. The future's
        result is 1, or 0 when the journal knew the stay already (it is not replaced).
        (Every record's future gives the rows it changed.)"""
        return self._submit(self._accept_ops(stay))

    def _first(self, stay: Stay | None) -> list[Op]:
        """The accept record of ``stay`` to commit with the record that follows it (a stay
        whose first lines ran no handler: its accept need not be committed alone)."""
        return [] if stay is None else self._accept_ops(stay)

    def _accept_ops(self, stay: Stay, *, replace: bool = False) -> list[Op]:
        values = (
            stay.flow_id,
            stay.line,
            stay.request,
            stay.digest,
            stay.sender,
            int(stay.origin),
            stay.fingerprint,
            stay.payload,
            stay.context,
            stay.position,
            stay.call,
            stay.call_machine,
            stay.state,
            stay.outcome,
            stay.error,
            stay.deadline,
            stay.owner,
            stay.started,
            stay.updated,
        )
        marks = ", ".join("?" * len(values))
        # A stay known already (a resend of a call a previous process ran) is not replaced:
        # the commit's result says 0 rows, and the caller reads what the journal has.
        # ``replace``: it is (a journal shared by replicas, whose accept takes the stay).
        conflict = "DO NOTHING"
        if replace:
            columns = [c.strip() for c in _STAY_COLUMNS.split(",")]
            conflict = "DO UPDATE SET " + ", ".join(
                f"{c} = EXCLUDED.{c}" for c in columns if c not in ("flow_id", "line")
            )
        return [
            (
                f"INSERT INTO mesh_stays ({_STAY_COLUMNS}) VALUES ({marks})"
                f" ON CONFLICT (flow_id, line) {conflict}",
                values,
            )
        ]

    def _progress_ops(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        call: bytes | None,
        call_machine: str | None,
        steps: Sequence[LocalStep],
    ) -> list[Op]:
        return [
            (
                "UPDATE mesh_stays SET position = ?, context = ?, call = ?, call_machine = ?,"
                " updated = ?, steps = steps || ? WHERE flow_id = ? AND line = ?",
                (
                    position,
                    context,
                    call,
                    call_machine,
                    time.time(),
                    _step_lines(steps),
                    flow_id,
                    line,
                ),
            )
        ]

    def progress(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        call: bytes | None,
        call_machine: str | None,
        steps: Sequence[LocalStep],
        *,
        first: Stay | None = None,
    ) -> concurrent.futures.Future[int]:
        """Record where a stay goes on (``position``, or the ``call`` downstream) and the
        context it goes on with, and the lines it ran since the last record."""
        return self._submit(
            self._first(first)
            + self._progress_ops(flow_id, line, position, context, call, call_machine, steps)
        )

    def progress_in(  # noqa: PLR0917 - the record's fields, in order
        self,
        conn: sqlite3.Connection,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        steps: Sequence[LocalStep],
    ) -> None:
        """:meth:`progress` in ``conn``'s open transaction (a handler's step_transaction)."""
        for sql, params in self._progress_ops(flow_id, line, position, context, None, None, steps):
            conn.execute(sql, params)

    def finish(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        state: str,
        outcome: bytes | None,
        error: str | None,
        context: bytes | None,
        steps: Sequence[LocalStep],
        failed: StepRow | None = None,
        *,
        first: Stay | None = None,
    ) -> concurrent.futures.Future[int]:
        """Record how a stay ended: its reply (or the flow's result, where it started). Its
        last call stays recorded: ``mesh flows retry`` resends those very bytes."""
        return self._submit(
            self._first(first)
            + self._finish_ops(flow_id, line, state, outcome, error, context, steps, failed)
        )

    def _finish_ops(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        state: str,
        outcome: bytes | None,
        error: str | None,
        context: bytes | None,
        steps: Sequence[LocalStep],
        failed: StepRow | None = None,
    ) -> list[Op]:
        lines = _step_lines(steps)
        if failed is not None:
            lines += _step_line(
                failed.line, failed.machine, failed.log, "failed", failed.at, 0.0, error
            )
        return [
            (
                "UPDATE mesh_stays SET state = ?, outcome = ?, error = ?,"
                " context = COALESCE(?, context), updated = ?,"
                " steps = steps || ? WHERE flow_id = ? AND line = ?",
                (state, outcome, error, context, time.time(), lines, flow_id, line),
            )
        ]

    # -- the same records, committed on the event loop that asks (a peer's) ----------------
    #
    # A record asked for on the node's event loop is committed on it, with every record
    # asked for in the same turn of the loop, in one transaction (group commit without a
    # thread: a writer thread handing each commit back waited for the GIL behind the busy
    # loop, milliseconds a record). The loop blocks for the commit itself.

    def accept_async(self, stay: Stay) -> asyncio.Future[int]:
        return self._submit_here(self._accept_ops(stay))

    def progress_async(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        position: int,
        context: bytes,
        call: bytes | None,
        call_machine: str | None,
        steps: Sequence[LocalStep],
        *,
        first: Stay | None = None,
    ) -> asyncio.Future[int]:
        return self._submit_here(
            self._first(first)
            + self._progress_ops(flow_id, line, position, context, call, call_machine, steps)
        )

    def finish_async(  # noqa: PLR0917 - the record's fields, in order
        self,
        flow_id: str,
        line: int,
        state: str,
        outcome: bytes | None,
        error: str | None,
        context: bytes | None,
        steps: Sequence[LocalStep],
        failed: StepRow | None = None,
        *,
        first: Stay | None = None,
    ) -> asyncio.Future[int]:
        return self._submit_here(
            self._first(first)
            + self._finish_ops(flow_id, line, state, outcome, error, context, steps, failed)
        )

    def _submit_here(self, ops: list[Op]) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if self._closed:
            future.set_exception(JournalError(f"{self.where}: journal is closed"))
            return future
        if self.synchronous == "FULL":
            # An fsync a commit: on the writer thread, so the loop goes on meanwhile.
            self._queue.put((ops, future))  # type: ignore[arg-type]
            return future
        pending = self._here
        if pending is None:
            pending = self._here = []
            loop.call_soon(self._flush_here)
        pending.append((ops, future))
        return future

    def _flush_here(self) -> None:
        batch, self._here = self._here or [], None
        conn = self._loop_conn
        if conn is None:
            conn = self._loop_conn = self._connect()
        counts, error = self._apply(conn, batch)
        for (_, future), count in zip(batch, counts or [0] * len(batch), strict=False):
            if future.done():
                continue
            if error is None:
                future.set_result(count)
            else:
                future.set_exception(error)

    # -- reading ------------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.where}: cannot read the journal: {exc}") from None

    def stay(self, flow_id: str, line: int) -> Stay | None:
        rows = self._rows(
            f"SELECT {_STAY_COLUMNS} FROM mesh_stays WHERE flow_id = ? AND line = ?",
            (flow_id, line),
        )
        return _stay(rows[0]) if rows else None

    def stays(
        self,
        *,
        flow_id: str | None = None,
        states: Iterable[str] = (),
        since: float | None = None,
    ) -> list[Stay]:
        where: list[str] = []
        params: list[Any] = []
        if flow_id is not None:
            where.append("flow_id = ?")
            params.append(flow_id)
        wanted = list(states)
        if wanted:
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if since is not None:
            where.append("updated >= ?")
            params.append(since)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._rows(
            f"SELECT {_STAY_COLUMNS} FROM mesh_stays{clause} ORDER BY started", params
        )
        return [_stay(r) for r in rows]

    def steps(self, flow_id: str) -> list[StepRow]:
        """Every line the stays of ``flow_id`` here ran (or failed at), in time order."""
        out: list[StepRow] = []
        for stay, text in self._rows(
            "SELECT line, steps FROM mesh_stays WHERE flow_id = ?", (flow_id,)
        ):
            for row in (text or "").splitlines():
                line, machine, log, state, at, duration, error = json.loads(row)
                out.append(StepRow(flow_id, stay, line, machine, log, state, at, duration, error))
        out.sort(key=lambda r: (r.at, r.line))
        return out

    def local_steps(self, flow_id: str, stay: int) -> list[LocalStep]:
        """The lines a stay ran, as the runtime keeps them (for a recovered stay's reply)."""
        return [
            (r.line, r.log, r.machine, r.at, r.duration)
            for r in self.steps(flow_id)
            if r.stay == stay and r.state == "done"
        ]

    def orphans(self) -> list[Stay]:
        """Running stays whose process is gone: to recover."""
        return [s for s in self.stays(states=(RUNNING,)) if not _alive(s.owner)]

    #: How :meth:`claim` begins its transaction, and locks the row it reads: SQLite's
    #: write lock is the database's; PostgreSQL locks the row (``FOR UPDATE``).
    _CLAIM_BEGIN = "BEGIN IMMEDIATE"
    _CLAIM_LOCK = ""

    def claim(self, flow_id: str, line: int) -> bool:
        """Make this process the owner of a running stay whose owner is gone; False when
        another live process has it (it claimed it first)."""
        conn = self._reader()
        conn.execute(self._CLAIM_BEGIN)
        try:
            row = conn.execute(
                self._spelled(
                    "SELECT owner, state FROM mesh_stays WHERE flow_id = ? AND line = ?"
                    + self._CLAIM_LOCK
                ),
                (flow_id, line),
            ).fetchone()
            if row is None or row[1] != RUNNING or not self._claimable(conn, int(row[0])):
                conn.execute("ROLLBACK")
                return False
            conn.execute(
                self._spelled("UPDATE mesh_stays SET owner = ? WHERE flow_id = ? AND line = ?"),
                (self.owner, flow_id, line),
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        return True

    def _claimable(self, conn: Any, owner: int) -> bool:
        """Whether a running stay of ``owner`` may be taken over: its process is gone."""
        return owner == self.owner or not _alive(owner)

    def _spelled(self, sql: str) -> str:
        """A statement in this database's spelling (SQLite's own here)."""
        return sql

    def set_state(self, flow_id: str, line: int, state: str, error: str | None = None) -> None:
        """Mark a stay (cancelled, say), at once: an operator's steering, not a flow's step."""
        self._submit(
            [
                (
                    "UPDATE mesh_stays SET state = ?, error = COALESCE(?, error), updated = ?"
                    " WHERE flow_id = ? AND line = ?",
                    (state, error, time.time(), flow_id, line),
                )
            ]
        ).result()

    def reset(self, flow_id: str, line: int) -> bool:
        """A failed stay runs again from its last progress record (``mesh flows retry``):
        running again, owned by nobody (so this or the next process recovers it)."""
        stay = self.stay(flow_id, line)
        if stay is None or stay.state not in (FAILED, CANCELLED):
            return False
        kept = "".join(
            _step_line(r.line, r.machine, r.log, r.state, r.at, r.duration, r.error)
            for r in self.steps(flow_id)
            if r.stay == line and r.state != "failed"
        )
        self._submit(
            [
                (
                    "UPDATE mesh_stays SET state = 'running', outcome = NULL, error = NULL,"
                    " owner = 0, deadline = MAX(deadline, ?), updated = ?, steps = ?"
                    " WHERE flow_id = ? AND line = ?",
                    (time.time() + 30.0, time.time(), kept, flow_id, line),
                )
            ]
        ).result()
        return True

    def prune(self, keep: float) -> int:
        """Forget finished stays last updated more than ``keep`` seconds ago; how many."""
        horizon = time.time() - keep
        old = self._rows(
            "SELECT flow_id, line FROM mesh_stays WHERE state != 'running' AND updated < ?",
            (horizon,),
        )
        if not old:
            return 0
        ops: list[Op] = []
        for flow_id, line in old:
            ops.append(("DELETE FROM mesh_stays WHERE flow_id = ? AND line = ?", (flow_id, line)))
        self._submit(ops).result()
        return len(old)

    def size(self) -> int:
        """Bytes the journal takes on disk (the file and its write-ahead log)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.where + suffix)
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Stop())
        self._thread.join(10.0)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


def _settle(settled: list[tuple[Any, int]], error: BaseException | None) -> None:
    for future, count in settled:
        if future.done():
            continue
        if error is None:
            future.set_result(count)
        else:
            future.set_exception(error)


def _step_line(  # noqa: PLR0917 - a step's fields, in order
    line: int,
    machine: str,
    log: str,
    state: str,
    at: float,
    duration: float,
    error: str | None,
) -> str:
    return json.dumps([line, machine, log, state, at, duration, error], ensure_ascii=False) + "\n"


def _step_lines(steps: Sequence[LocalStep]) -> str:
    return "".join(_step_line(s[0], s[2], s[1], "done", s[3], s[4], None) for s in steps)


def _stay(row: Sequence[Any]) -> Stay:
    (
        flow_id,
        line,
        request,
        digest,
        sender,
        origin,
        fingerprint,
        payload,
        context,
        position,
        call,
        call_machine,
        state,
        outcome,
        error,
        deadline,
        owner,
        started,
        updated,
    ) = row
    return Stay(
        flow_id,
        int(line),
        request,
        digest,
        sender,
        bool(origin),
        None if fingerprint is None else bytes(fingerprint),
        None if payload is None else bytes(payload),
        bytes(context),
        int(position),
        None if call is None else bytes(call),
        call_machine,
        state,
        None if outcome is None else bytes(outcome),
        error,
        float(deadline),
        int(owner),
        float(started),
        float(updated),
    )
