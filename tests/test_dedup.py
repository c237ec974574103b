"""Exactly-once steps: the reply record itself, and a reply lost for real between two peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support.meshdir import LOGIN_FLOW, LOGIN_SERVICE, MeshDir, password_of
from support.peers import Peers

from mesh.dedup import Forgotten, Replayed, Replies


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


FP = b"call-1"  # the fingerprint of "the" call; a retry sends the same


def once(  # noqa: PLR0917 - the arguments of Replies.once
    replies: Replies[Any],
    flow_id: str,
    line: int,
    fingerprint: bytes,
    run: Callable[[], Any],
    wait: float,
    *,
    fresh: bool = False,
) -> Any:
    """``Replies.once`` from synchronous test code: ``run`` is a plain function."""

    async def step() -> Any:
        return run()

    return asyncio.run(replies.once(flow_id, line, fingerprint, step, wait, fresh=fresh))


def test_finished_step_answers_from_the_record() -> None:
    """A second call for a finished step gets the first reply; the step is not run again."""
    replies: Replies[str] = Replies(10, 60)
    runs: list[int] = []

    def run() -> str:
        runs.append(1)
        return f"reply {len(runs)}"

    assert once(replies, "f1", 2, FP, run, 1) == "reply 1"
    assert once(replies, "f1", 2, FP, run, 1) == "reply 1"
    assert once(replies, "f1", 3, FP, run, 1) == "reply 2"
    assert len(runs) == 2
    assert replies.duplicates == 1


def test_duplicate_of_a_running_step_waits_for_it() -> None:
    """A duplicate arriving while the step runs waits and gets the same reply."""
    replies: Replies[str] = Replies(10, 60)
    runs: list[int] = []

    async def both() -> tuple[str | None, str | None]:
        release = asyncio.Event()

        async def slow() -> str:
            runs.append(1)
            await release.wait()
            return "the one reply"

        first = asyncio.ensure_future(replies.once("k", 1, FP, slow, 10))
        await asyncio.sleep(0)  # the first call is running now
        second = asyncio.ensure_future(replies.once("k", 1, FP, slow, 10))
        await asyncio.sleep(0)
        release.set()
        return await first, await second

    assert asyncio.run(both()) == ("the one reply", "the one reply")
    assert runs == [1]


def test_duplicate_gives_up_at_its_own_deadline() -> None:
    """A duplicate whose wait ends before the first run does gets None, not a second run."""
    replies: Replies[str] = Replies(10, 60)

    async def both() -> tuple[str | None, str | None]:
        release = asyncio.Event()

        async def slow() -> str:
            await release.wait()
            return "done"

        async def second_run() -> str:
            return "second run"

        first = asyncio.ensure_future(replies.once("k", 1, FP, slow, 10))
        await asyncio.sleep(0)
        assert ("k", 1) in replies
        second = await replies.once("k", 1, FP, second_run, 0.05)
        release.set()
        return await first, second

    assert asyncio.run(both()) == ("done", None)


def test_record_is_bounded_by_size() -> None:
    """Past ``size`` finished entries the oldest is forgotten (and would run again)."""
    replies: Replies[str] = Replies(3, 60)
    for n in range(5):
        once(replies, f"f{n}", 1, FP, lambda n=n: str(n), 1)
    assert len(replies) == 3
    assert ("f0", 1) not in replies and ("f1", 1) not in replies
    assert once(replies, "f4", 1, FP, lambda: "again", 1) == "4"
    assert once(replies, "f0", 1, FP, lambda: "again", 1) == "again"


def test_record_is_bounded_by_age() -> None:
    """A finished entry older than ``age`` seconds is forgotten."""
    clock = Clock()
    replies: Replies[str] = Replies(100, 5, clock=clock)
    once(replies, "old", 1, FP, lambda: "first", 1)
    clock.now += 4
    once(replies, "young", 1, FP, lambda: "first", 1)
    assert once(replies, "old", 1, FP, lambda: "again", 1) == "first"
    clock.now += 2  # "old" is 6 s old now, "young" 2 s
    assert once(replies, "young", 1, FP, lambda: "again", 1) == "first"
    assert ("old", 1) not in replies
    assert once(replies, "old", 1, FP, lambda: "again", 1) == "again"


def test_a_step_that_raises_is_not_recorded() -> None:
    """A run that raises leaves no entry: its caller got the exception."""
    replies: Replies[str] = Replies(10, 60)

    def boom() -> str:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        once(replies, "k", 0, FP, boom, 1, fresh=True)
    assert ("k", 0) not in replies
    assert once(replies, "k", 0, FP, lambda: "ran", 1, fresh=True) == "ran"


def test_size_age_and_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Replies(0, 60)
    with pytest.raises(ValueError, match="positive"):
        Replies(10, 60, 0)


def test_another_call_for_a_known_step_is_replayed() -> None:
    """Only the very call that ran a step (same fingerprint) gets its reply; another call
    naming the step, finished or running, is Replayed and runs nothing."""
    replies: Replies[str] = Replies(10, 60)
    once(replies, "f1", 0, FP, lambda: "ada's reply", 1, fresh=True)
    with pytest.raises(Replayed):
        once(replies, "f1", 0, b"mallory", lambda: "ran", 1, fresh=True)
    with pytest.raises(Replayed):
        replies.seen("f1", 0, b"mallory", fresh=True)

    async def running_step() -> str | None:
        release = asyncio.Event()

        async def slow() -> str:
            await release.wait()
            return "r"

        async def ran() -> str:
            return "ran"

        running = asyncio.ensure_future(replies.once("f2", 3, FP, slow, 10))
        await asyncio.sleep(0)
        assert ("f2", 3) in replies
        with pytest.raises(Replayed):
            await replies.once("f2", 3, b"mallory", ran, 1)
        release.set()
        return await running

    assert asyncio.run(running_step()) == "r"
    assert replies.duplicates == 0


def test_a_known_flow_id_cannot_start_a_flow() -> None:
    """A call that starts a flow (fresh) with an id known at any line is Replayed; a later
    line of a known flow (the flow coming back to this peer) is not."""
    replies: Replies[str] = Replies(10, 60)
    once(replies, "f1", 1, FP, lambda: "line 1", 1)
    with pytest.raises(Replayed):
        once(replies, "f1", 0, FP, lambda: "ran", 1, fresh=True)
    assert once(replies, "f1", 3, b"another call", lambda: "line 3", 1) == "line 3"
    assert once(replies, "f2", 0, FP, lambda: "new flow", 1, fresh=True) == "new flow"


def test_replies_are_bounded_by_bytes_and_a_retry_of_a_dropped_one_is_forgotten() -> None:
    """Past ``max_bytes`` of replies the oldest replies are dropped, their steps kept: a retry
    of such a step is Forgotten (told it ran), never run a second time."""
    replies: Replies[bytes] = Replies(100, 60, max_bytes=2500)
    for n in range(5):
        once(replies, f"f{n}", 1, FP, lambda: b"x" * 1000, 1)
    assert replies.bytes == 2000
    assert len(replies) == 5
    for n in range(3):
        with pytest.raises(Forgotten):
            once(replies, f"f{n}", 1, FP, lambda: b"second run", 1)
        with pytest.raises(Replayed):  # and another call still gets nothing
            once(replies, f"f{n}", 1, b"mallory", lambda: b"second run", 1)
    assert once(replies, "f4", 1, FP, lambda: b"second run", 1) == b"x" * 1000
    once(replies, "big", 1, FP, lambda: b"y" * 5000, 1)  # larger than the bound by itself
    assert replies.bytes == 0
    with pytest.raises(Forgotten):
        once(replies, "big", 1, FP, lambda: b"second run", 1)


def test_forgotten_steps_are_bounded_by_size_and_age() -> None:
    """What is kept of a step whose reply was dropped goes at ``size`` or ``age`` like any
    step; the byte count stays exact through every kind of eviction."""
    clock = Clock()
    replies: Replies[bytes] = Replies(3, 5, max_bytes=1500, clock=clock)
    for n in range(3):
        once(replies, f"f{n}", 1, FP, lambda: b"x" * 1000, 1)
    assert (replies.bytes, len(replies)) == (1000, 3)
    once(replies, "f3", 1, FP, lambda: b"x" * 10, 1)  # f0 goes by size
    assert (replies.bytes, len(replies)) == (1010, 3)
    assert ("f0", 1) not in replies
    clock.now += 6
    assert (len(replies), replies.bytes) == (0, 0)
    assert once(replies, "f1", 1, FP, lambda: b"ran again", 1) == b"ran again"


# -- a reply lost for real -------------------------------------------------------------

RELAY_FLOW = (
    "Request\tLog\tMachine\n"
    "charge\tCharging :n\tclient\n"
    "charge\tForwarding charge :n\tserver\n"
    "charge\tTaking payment :n\tbank\n"
    "charge\tCharged :n\tclient\n"
)

BANK_SERVICE = """
import os
import socket
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("charge", "Taking payment :n")
def take_payment(ctx):
    if "tell_port" in ctx:  # let the test know the step has begun
        socket.create_connection(("127.0.0.1", ctx["tell_port"])).close()
        time.sleep(4.0)  # longer than deadlines.ADOPT_WINDOW
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"{ctx['n']} {os.getpid()}\\n")
    log.info("next", paid=True)
"""


@pytest.fixture
def bank_mesh(mesh_dir: MeshDir, reply_dropper) -> tuple[MeshDir, Any]:
    """client → server → bank, where peers dial bank through a ReplyDropper proxy."""
    mesh_dir.flow(RELAY_FLOW)
    mesh_dir.service(BANK_SERVICE)
    mesh_dir.write_config({"client": False, "server": True, "bank": True})
    mesh_dir.fix_ports("bank")  # the proxy in front of bank is made before bank starts
    bank_listen = mesh_dir.addresses["bank"]
    host, port = bank_listen.rsplit(":", 1)
    proxy = reply_dropper((host, int(port)), marker=b"charge", drops=0)
    # Peers dial bank through the proxy; bank binds behind it.
    text = mesh_dir.config.read_text(encoding="utf-8").replace(
        f'bank = "{bank_listen}"',
        f'bank = {{ address = "{proxy.address}", listen = "{bank_listen}" }}',
    )
    mesh_dir.config.write_text(text, encoding="utf-8")
    return mesh_dir, proxy


def test_lost_reply_is_retried_and_the_step_runs_once(
    bank_mesh: tuple[MeshDir, Any], peers: Peers, connect, tmp_path: Path
) -> None:
    """server → bank through a proxy that cuts the connection after bank has replied:
    gRPC retries, bank answers from its record, the handler ran exactly once."""
    mesh_dir, proxy = bank_mesh
    server = peers.start(mesh_dir, "server")
    bank = peers.start(mesh_dir, "bank")
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"
    node.start("charge", n=0, ledger=str(ledger), timeout=20)  # warm: connections made
    proxy.drops = 1  # the next reply is lost

    result = node.start("charge", n=1, ledger=str(ledger), timeout=20)

    assert result.context["paid"] is True
    assert proxy.dropped == 1
    assert proxy.connections >= 2  # the retry came on a new connection
    assert ledger.read_text(encoding="utf-8").splitlines().count(f"1 {bank.pid}") == 1
    assert [line.split()[0] for line in ledger.read_text().splitlines()] == ["0", "1"]
    repeated = [e for e in bank.events() if e.get("event") == "mesh.step_repeated"]
    assert [(e["flow_id"], e["line_index"]) for e in repeated] == [(result.flow_id, 2)]
    assert server.alive()


def test_connection_lost_mid_step_the_retry_adopts_the_step(
    bank_mesh: tuple[MeshDir, Any], peers: Peers, connect, tmp_path: Path
) -> None:
    """The connection to bank breaks while its step runs: the retry waits for that step
    instead of running it again or failing it, and the flow succeeds."""
    mesh_dir, proxy = bank_mesh
    peers.start(mesh_dir, "server")
    bank = peers.start(mesh_dir, "bank")
    node = connect(mesh_dir.config, "client")
    ledger = tmp_path / "ledger.txt"
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        flow = pool.submit(
            node.start, "charge", n=1, ledger=str(ledger), tell_port=port, timeout=20
        )
        listener.accept()[0].close()  # bank's step has begun
        proxy.cut_all()
        result = flow.result(timeout=30)

    assert result.context["paid"] is True
    assert ledger.read_text(encoding="utf-8").splitlines() == [f"1 {bank.pid}"]
    repeated = [e for e in bank.events() if e.get("event") == "mesh.step_repeated"]
    assert [(e["flow_id"], e["line_index"]) for e in repeated] == [(result.flow_id, 2)]


# -- replayed flow ids: a retry must be the very call it repeats ------------------------------

VAULT_FLOW = (
    LOGIN_FLOW + "vault\tOpening vault for :user with #pin\tserver\n"
    "vault\tVault opened for :user\tserver\n"
    "ping\tPing from :who\tserver\n"
)

VAULT_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("vault", "Opening vault for :user with #pin")
def open_vault(ctx):
    log.info("next", gold="gold-of-" + ctx["user"])


@mesh.handler("ping", "Ping from :who")
def ping(ctx):
    log.info("next", pong=True)
"""

VICTIM = {"user": "ada", "pin": "4711-secret-pin"}


@pytest.fixture
def vault(mesh_dir: MeshDir, peers: Peers, connect) -> tuple[Any, Any, Any]:
    """``server`` serving vault and ping; ada's vault flow has run through it (as client).
    Returns (server peer, ada's result, raw Continue on server)."""
    import grpc

    mesh_dir.flow(VAULT_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.service(VAULT_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    server = peers.start(mesh_dir, "server")
    result = connect(mesh_dir.config, "client").start("vault", **VICTIM, timeout=10)
    channel = grpc.insecure_channel(server.address)
    raw = channel.unary_unary(
        "/mesh.v1.Mesh/Continue", request_serializer=None, response_deserializer=None
    )
    yield server, result, raw
    channel.close()


def _call(
    mesh_dir: MeshDir, request: str, flow_id: str, context: dict[str, Any] | bytes, **fields: Any
) -> bytes:
    """A Continue call's bytes, as client sends them; ``context`` as a dict or its JSON."""
    import json

    from mesh.config import load_config
    from mesh.v1 import mesh_pb2 as pb

    values = {
        "request": request,
        "line_index": 0,
        "context": context
        if isinstance(context, bytes)
        else json.dumps(context, separators=(",", ":"), ensure_ascii=False).encode(),
        "flow_id": flow_id,
        "digest": load_config(mesh_dir.config).flows[request].digest,
        "via": ["client"],
        **fields,
    }
    return bytes(pb.ContinueRequest(**values).SerializeToString())


def _status(raw: Any, data: bytes) -> tuple[str, str, bytes]:
    import grpc

    try:
        return "OK", "", raw(data, timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", b""


@pytest.mark.parametrize(
    ("request_name", "context"),
    [
        pytest.param("ping", {"who": "mallory"}, id="another-request"),
        pytest.param("vault", {"user": "mallory", "pin": "0000"}, id="same-request-other-context"),
        pytest.param("vault", {}, id="same-request-no-context"),
    ],
)
def test_a_replayed_flow_id_gets_nothing_of_the_earlier_flow(
    vault, mesh_dir: MeshDir, request_name: str, context: dict[str, Any]
) -> None:
    """Mallory, who may start flows, sends line 0 with the flow id of ada's finished vault
    flow (flow ids are in every log line): refused ALREADY_EXISTS, no handler runs, and
    nothing of ada's flow comes back (before the fix: ada's recorded reply, final context
    with her pin unmasked and her gold, and her steps)."""
    server, result, raw = vault
    code, details, reply = _status(raw, _call(mesh_dir, request_name, result.flow_id, context))
    assert code == "ALREADY_EXISTS", (code, details, reply[:200])
    assert result.flow_id in details
    assert "new flow needs a new flow id" in details
    for leak in (VICTIM["pin"], "gold-of-ada", "Opening vault"):
        assert leak not in details
    ran = [e for e in server.events() if e.get("flow_id") == result.flow_id]
    assert not [
        e for e in ran if e.get("event", "").startswith(("Ping from", "Opening vault for m"))
    ]
    refused = [e for e in server.events() if e.get("code") == "ALREADY_EXISTS"]
    assert len(refused) == 1 and refused[0]["level"] == "warning"


def test_a_retry_of_the_very_call_still_gets_its_reply(vault, mesh_dir: MeshDir) -> None:
    """What gRPC's own retry sends, the same bytes again: the recorded reply, no second run."""
    from mesh.v1 import mesh_pb2 as pb

    server, result, raw = vault
    code, details, reply = _status(raw, _call(mesh_dir, "vault", result.flow_id, VICTIM))
    assert code == "OK", details
    assert pb.ContinueReply.FromString(reply).WhichOneof("outcome") == "done"
    opened = [e for e in server.events() if e.get("event", "").startswith("Opening vault for")]
    assert len(opened) == 1
    repeated = [e for e in server.events() if e.get("event") == "mesh.step_repeated"]
    assert [(e["flow_id"], e["line_index"]) for e in repeated] == [(result.flow_id, 0)]


def test_a_replayed_flow_id_at_a_later_line_is_refused(vault, mesh_dir: MeshDir, connect) -> None:
    """Login line 1 is sent by client (the via a token holder may claim without mutual TLS)
    with the flow id of ada's login and another context: the step (flow id, line 1) ran for
    another call, so it is refused, not answered with ada's session (as it was before)."""
    server, _, raw = vault
    login = connect(mesh_dir.config, "client").start(
        "login", username="ada", password=password_of("ada"), timeout=10
    )
    data = _call(mesh_dir, "login", login.flow_id, {"username": "mallory"}, line_index=1)
    code, details, reply = _status(raw, data)
    assert code == "ALREADY_EXISTS", (code, details, reply[:200])
    assert "session-ada" not in details
    tested = [e for e in server.events() if e.get("event", "").startswith("Testing password")]
    assert [e["flow_id"] for e in tested] == [login.flow_id]


# -- the record's memory is bounded in bytes ---------------------------------------------------

BULK_FLOW = "Request\tLog\tMachine\nbulk\tSending :n\tclient\nbulk\tStoring :n\tserver\n"

BULK_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("bulk", "Storing :n")
def store(ctx):
    log.info("next", stored=len(ctx["blob"]))
"""


def rss_mib(pid: int) -> float:
    """A process's resident set, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_peer_holds_no_more_replies_than_dedup_bytes(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """Anyone who may start a flow sends 800 flows with 250 kB contexts (200 MB of replies)
    to a peer with dedup_bytes = 16 MiB: it keeps replies for retries, but no more than that,
    so it grows by the budget and what flows in flight hold, 30-35 MiB here (before: every
    reply kept until dedup_size or dedup_age: 210 MiB for these, 730 MiB for 400 flows of
    1 MB; the OOM killer's for more)."""
    mesh_dir.flow(BULK_FLOW)
    mesh_dir.service(BULK_SERVICE)
    budget = 16
    mesh_dir.write_config({"client": False, "server": True}, extra=f"dedup_bytes = {budget << 20}")
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    blob = "x" * 250_000

    def send(n: int) -> int:
        return int(node.start("bulk", n=n, blob=blob, timeout=30).context["stored"])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(send, range(16))) == [len(blob)] * 16  # warm: threads, arenas
        before = rss_mib(server.pid)
        assert list(pool.map(send, range(800))) == [len(blob)] * 800
    after = rss_mib(server.pid)
    # The budget, plus what 4 flows in flight hold (each call's bytes, its decoded context,
    # the reply) and the allocator keeps of them: 15-20 MiB with a budget of 64 KiB here.
    assert after - before < budget + 32, f"server RSS {before:.1f} -> {after:.1f} MiB"


def test_a_retry_of_a_step_whose_reply_was_dropped_is_told_so(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """A reply larger than dedup_bytes is not kept; the very call repeated (as gRPC's retry
    would send it) gets FAILED_PRECONDITION saying the step ran and its reply is no longer
    kept, and the step does not run a second time."""
    import grpc

    from mesh.wire import dump_context

    mesh_dir.flow(BULK_FLOW)
    mesh_dir.service(BULK_SERVICE)
    mesh_dir.write_config({"client": False, "server": True}, extra="dedup_bytes = 65536")
    server = peers.start(mesh_dir, "server")
    context = {"n": 1, "blob": "x" * 100_000}
    result = connect(mesh_dir.config, "client").start("bulk", **context, timeout=30)
    data = _call(mesh_dir, "bulk", result.flow_id, dump_context(context), line_index=1)
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(
            "/mesh.v1.Mesh/Continue", request_serializer=None, response_deserializer=None
        )
        code, details, _ = _status(raw, data)
        other, _, _ = _status(raw, _call(mesh_dir, "bulk", result.flow_id, {"n": 2}, line_index=1))
    assert code == "FAILED_PRECONDITION", details
    assert "bulk line 1 of flow" in details
    assert "ran here already, and its reply is no longer kept" in details
    assert other == "ALREADY_EXISTS"  # another call for the step gets nothing either
    stored = [e for e in server.events() if e.get("event", "").startswith("Storing")]
    assert [e["flow_id"] for e in stored] == [result.flow_id]
