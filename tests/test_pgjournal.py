"""A journal in PostgreSQL, shared by a machine's replicas: a real server (Debian's
``postgresql``, started by tests/support/postgres.py), real peers, real ``kill -9``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.meshdir import MeshDir
from support.peers import Peers
from support.postgres import Postgres, missing, postgres_server

from mesh.errors import JournalError
from mesh.journal import RUNNING, Stay
from mesh.journals import open_journal

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


def _stay(flow_id: str, owner: int) -> Stay:
    now = time.time()
    return Stay(
        flow_id, 1, "order", "d" * 16, "client", False, b"fp", b"payload", b"{}", 1, None,
        None, RUNNING, None, None, now + 60, owner, now, now,
    )  # fmt: skip


def test_records_survive_the_process_and_each_machine_has_its_own(pg: Postgres) -> None:
    """What one process wrote, the next reads; two machines in one database do not mix."""
    stock = open_journal(pg.url, machine="stock")
    stock.accept(_stay("f1", stock.owner)).result(10)
    stock.finish("f1", 1, "done", b"reply", None, b'{"a":1}', [(1, "Reserving", "stock", 1.0, 0.1)])
    stock.finish("f1", 1, "done", b"reply", None, None, []).result(10)
    stock.close()
    again = open_journal(pg.url, machine="stock")
    other = open_journal(pg.url, machine="web")
    try:
        stay = again.stay("f1", 1)
        assert stay is not None and stay.state == "done" and stay.outcome == b"reply"
        assert stay.context == b'{"a":1}'
        assert [s.log for s in again.steps("f1")] == ["Reserving"]
        assert other.stay("f1", 1) is None
        assert again.size() > 0
    finally:
        again.close()
        other.close()


def test_a_stay_is_claimed_only_after_its_owner_lease_lapses(pg: Postgres) -> None:
    """Replica A holds a running stay; B may not take it while A renews its lease, and may
    once A is gone (a clean close gives the lease up at once; a kill lets it lapse)."""
    a = open_journal(pg.url, machine="lease")
    b = open_journal(pg.url, machine="lease")
    try:
        a.accept(_stay("f2", a.owner)).result(10)
        time.sleep(1.5)  # A's lease is renewed meanwhile
        assert b.orphans() == []
        assert not b.claim("f2", 1)
        a.close()
        assert [s.flow_id for s in b.orphans()] == ["f2"]
        assert b.claim("f2", 1)
        claimed = b.stay("f2", 1)
        assert claimed is not None and claimed.owner == b.owner
    finally:
        a.close()
        b.close()


def test_a_bad_url_or_a_newer_schema_is_one_line(pg: Postgres) -> None:
    with pytest.raises(JournalError) as bad:
        open_journal("postgresql://mesh:secret@127.0.0.1:1/none", machine="x")
    assert "\n" not in str(bad.value) and "secret" not in str(bad.value)
    assert "cannot use the journal" in str(bad.value)
    open_journal(pg.url, machine="newer").close()
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("UPDATE mesh_newer.mesh_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="schema version 99 was written by a newer mesh"):
        open_journal(pg.url, machine="newer")


ORDER_FLOW = (
    "Request\tLog\tMachine\n"
    "order\tOrder placed for :item\tclient\n"
    "order\tReserving :item\tstock\n"
    "order\tOrder done for :item\tclient\n"
)

#: The replica started with HOLD set stops in its step (until killed); the other runs it.
#: The ledger row is written in the step's transaction, so it commits with the step.
STOCK_SERVICE = """
import os
import pathlib

import structlog

import mesh

log = structlog.get_logger()
HERE = pathlib.Path(__file__).parent


@mesh.handler("order", "Reserving :item")
def reserve(ctx):
    if os.environ.get("HOLD"):
        (HERE / f"held-{ctx['item']}").write_text(str(os.getpid()))
        import time
        time.sleep(120)
    with mesh.step_transaction() as conn:
        step = mesh.step_id()
        conn.execute(
            "INSERT INTO public.ledger VALUES (%s, %s, %s)", (step.flow_id, step.line, os.getpid())
        )
    log.info("next", reserved_by=os.getpid())
"""


@pytest.mark.slow
def test_replicas_share_the_journal_one_killed_mid_step(
    pg: Postgres, mesh_dir: MeshDir, peers: Peers, connect: Any
) -> None:
    """Two replicas of stock share one Postgres journal; kill -9 the one holding steps: the
    other takes them over once its lease lapses and finishes every flow; each step is in
    the ledger (written in the step's transaction) exactly once."""
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.ledger (flow_id TEXT, line INT, pid INT)")
    mesh_dir.flow(ORDER_FLOW)
    mesh_dir.service(STOCK_SERVICE)
    mesh_dir.write_config(
        {"client": False, "stock": 2},
        extra=f'durable = true\ntimeout = 60\n[journal]\nurl = "{pg.url}"\n',
    )
    holder = peers.start(mesh_dir, "stock", replica=1, env={"HOLD": "1"})
    other = peers.start(mesh_dir, "stock", replica=2)
    node = connect(mesh_dir.config, "client")
    results: dict[str, Any] = {}

    def order(item: str) -> None:
        try:
            results[item] = node.start("order", item=item)
        except BaseException as exc:
            results[item] = exc

    items = [f"item{i}" for i in range(12)]
    threads = [threading.Thread(target=order, args=(item,), daemon=True) for item in items]
    for thread in threads:
        thread.start()
    end = time.monotonic() + 30
    while not list(mesh_dir.root.glob("held-*")) and time.monotonic() < end:
        time.sleep(0.05)
    held = sorted(p.name.removeprefix("held-") for p in mesh_dir.root.glob("held-*"))
    assert held, "no step reached the holding replica"
    time.sleep(0.5)
    holder.kill()
    for thread in threads:
        thread.join(60)
    failed = {k: v for k, v in results.items() if isinstance(v, BaseException)}
    assert not failed, failed
    assert sorted(results) == sorted(items)
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute("SELECT flow_id, line, pid FROM public.ledger").fetchall()
    flow_ids = [results[item].flow_id for item in items]
    for flow_id in flow_ids:
        assert [r[:2] for r in rows].count((flow_id, 1)) == 1, (flow_id, rows)
    # The held steps ran on the other replica, after it took them over.
    for item in held:
        assert results[item].context["reserved_by"] == other.pid
    assert any(e.get("event") == "mesh.flow_recovered" for e in other.events())
    assert os.path.exists(mesh_dir.root)  # nothing of the SQLite default was needed
    assert not (mesh_dir.root / ".mesh-data").exists() or not list(
        Path(mesh_dir.root / ".mesh-data").glob("stock*.db")
    )
