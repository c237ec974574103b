"""The journal of durable flows (mesh/journal.py) on its own: a real SQLite file.

And the config keys that turn it on: ``durable``, ``[journal]``, ``[requests.NAME]``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from support.meshdir import LOGIN_FLOW, MeshDir, config_error

from mesh.config import load_config
from mesh.errors import JournalError
from mesh.journal import SCHEMA_VERSION, SqliteJournal, Stay
from mesh.journals import open_journal


def stay(flow_id: str = "f1", line: int = 1, *, owner: int | None = None) -> Stay:
    now = time.time()
    return Stay(
        flow_id=flow_id,
        line=line,
        request="login",
        digest="0123456789abcdef",
        sender="client",
        origin=False,
        fingerprint=b"fp",
        payload=b"call",
        context=b'{"username": "ada"}',
        position=line,
        call=None,
        call_machine=None,
        state="running",
        outcome=None,
        error=None,
        deadline=now + 60,
        owner=os.getpid() if owner is None else owner,
        started=now,
        updated=now,
    )


@pytest.fixture
def journal(tmp_path: Path) -> SqliteJournal:
    opened = SqliteJournal(tmp_path / "data" / "server.db")
    yield opened
    opened.close()


def test_records_a_stay_from_accept_to_reply(journal: SqliteJournal) -> None:
    journal.accept(stay()).result()
    journal.progress(
        "f1",
        1,
        3,
        b'{"verified": true}',
        b"next-call",
        "store",
        [
            (1, "Received request to login as ada", "server", 1.0, 0.001),
            (2, "Testing password for ada", "server", 1.1, 0.002),
        ],
    ).result()
    got = journal.stay("f1", 1)
    assert got is not None
    assert (got.position, got.call, got.call_machine, got.state) == (
        3,
        b"next-call",
        "store",
        "running",
    )
    assert got.context == b'{"verified": true}'
    journal.finish(
        "f1",
        1,
        "done",
        b"reply",
        None,
        b'{"done": 1}',
        [
            (3, "Setting session for ada", "server", 1.2, 0.001),
        ],
    ).result()
    got = journal.stay("f1", 1)
    assert got is not None
    # The call stays recorded: a retry (mesh flows retry) resends those very bytes.
    assert (got.state, got.outcome, got.call) == ("done", b"reply", b"next-call")
    assert [s.line for s in journal.steps("f1")] == [1, 2, 3]
    assert journal.orphans() == []  # finished, and this process owns it anyway


def test_orphans_are_stays_of_dead_processes(journal: SqliteJournal) -> None:
    dead = 2**22 + 12345  # above the default pid_max of many systems; checked below
    try:
        os.kill(dead, 0)
        pytest.skip(f"pid {dead} exists here")
    except ProcessLookupError:
        pass
    journal.accept(stay("mine")).result()
    journal.accept(stay("theirs", owner=dead)).result()
    assert [s.flow_id for s in journal.orphans()] == ["theirs"]
    assert journal.claim("theirs", 1)
    assert journal.orphans() == []


def test_group_commit_many_writers(journal: SqliteJournal) -> None:
    futures = [journal.accept(stay(f"f{i}")) for i in range(500)]
    for future in futures:
        future.result()
    assert len(journal.stays()) == 500


def test_prune_forgets_finished_flows_only(journal: SqliteJournal) -> None:
    journal.accept(stay("old")).result()
    journal.finish("old", 1, "done", b"r", None, None, []).result()
    journal.accept(stay("running")).result()
    time.sleep(0.05)
    assert journal.prune(0.01) == 1
    assert [s.flow_id for s in journal.stays()] == ["running"]
    assert journal.size() > 0


def test_schema_version_row(journal: SqliteJournal) -> None:
    with sqlite3.connect(journal.where) as conn:
        row = conn.execute("SELECT value FROM mesh_meta WHERE key = 'schema_version'").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    assert row == (str(SCHEMA_VERSION),)
    assert mode == ("wal",)


def test_a_corrupt_file_is_one_line_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "a.db"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(JournalError) as info:
        open_journal(f"sqlite:///{bad}")
    assert str(info.value).startswith(f"{bad}: ")
    assert "\n" not in str(info.value)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "a.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("CREATE TABLE mesh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "INSERT INTO mesh_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(JournalError, match="newer mesh") as info:
        open_journal(f"sqlite:///{newer}")
    assert str(newer) in str(info.value)


def test_missing_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no such journal"):
        open_journal(f"sqlite:///{tmp_path / 'none.db'}", create=False)


# -- config ---------------------------------------------------------------------------


def write(mesh_dir: MeshDir, extra: str) -> Path:
    mesh_dir.flow(LOGIN_FLOW)
    return mesh_dir.write_config({"client": False, "server": "127.0.0.1:1"}, extra=extra)


def test_config_defaults(mesh_dir: MeshDir) -> None:
    config = load_config(write(mesh_dir, ""))
    assert config.durable == frozenset()
    assert config.journal.synchronous == "full"
    assert config.journal.keep == 7 * 86400
    assert config.journal_url("server") == f"sqlite:///{mesh_dir.root}/.mesh-data/server.db"


def test_config_durable_keys(mesh_dir: MeshDir) -> None:
    config = load_config(
        write(
            mesh_dir,
            """
            durable = ["login"]
            [journal]
            url = "sqlite:///journals/{machine}.sqlite"
            keep = "2d"
            synchronous = "normal"
            [requests.login]
            timeout = "2h"
            """,
        )
    )
    assert config.durable == frozenset({"login"})
    assert config.journal.keep == 2 * 86400
    assert config.journal.synchronous == "normal"
    assert config.timeout_of("login") == 7200
    assert config.timeout_of("feed") == config.timeout
    assert config.journal_url("client").endswith("/journals/client.sqlite")
    assert load_config(write(mesh_dir, "durable = true")).durable == frozenset({"login", "feed"})


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('durable = "yes"', "durable must be true, false or a list of request names"),
        (
            'durable = ["logn"]',
            "durable[0]: no request 'logn' in the flow files (did you mean 'login'?)",
        ),
        ("[journal]\nkeep = -1", "journal.keep must be a positive duration"),
        ('[journal]\nkeep = "7 weeks"', "journal.keep must be a positive duration"),
        ('[journal]\nsynchronous = "off"', 'journal.synchronous must be "full" or "normal"'),
        ('[journal]\nurl = "mysql://x"', "journal.url must be a string starting sqlite:///"),
        ('[journal]\nkeeps = "1d"', "journal: unknown key 'keeps' (did you mean 'keep'?)"),
        ('[requests.nope]\ntimeout = "1h"', "requests.nope: no request 'nope' in the flow files"),
        (
            '[requests.login]\ntimeout = "soon"',
            "requests.login.timeout must be a positive duration",
        ),
        ('[requests.login]\ntimout = "1h"', "requests.login: unknown key 'timout'"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(
    mesh_dir: MeshDir, extra: str, expected: str
) -> None:
    message = config_error(write(mesh_dir, extra))
    assert expected in message
