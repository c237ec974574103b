"""Attack: try to break the mesh's promises against real peers, as an attacker or a careless
user would, and print what each attempt got.

It starts its own mesh on 127.0.0.1 in a temporary folder: a ``server`` peer (``mesh peer``,
its own process), a hostile peer ``evil`` (tests/support/hostile.py, a hand-written gRPC
server that forges replies) and ``client``, the originator, in this process. Then it tries:

* replaying a flow id: line 0 of another request, and of the same one with another context,
  with the flow id of a finished flow (flow ids are in every log line); the same at a later
  line, claiming the machine that may send it;
* forged replies from ``evil``: hand-backs to line 0, past the end, to a line of another
  machine, and "done" with lines never run;
* oversized contexts: 100 flows of 1 MB each against a peer whose ``dedup_bytes`` is
  16 MiB (its RSS before and after), a call over ``max_message_bytes``, a reply over the
  originator's own limit;
* values JSON cannot carry (a lone surrogate, 1e400, a 5,000-digit int), at the originator
  and sent to the peer directly;
* call chains no flow makes: an empty ``via``, and one naming the receiving peer.

One line per attempt: what was tried, then ``refused: …`` or ``contained: …`` with the
status or error it got. An attempt that gets through prints ``BROKEN: …`` and the script
exits 1. It stops every process it started, by pid, and removes its folder (``--keep``
keeps it)::

    .venv/bin/python scripts/attack.py [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

from hostile import Hostile  # noqa: E402 - the hostile peer lives with the tests' support code

import mesh  # noqa: E402
from mesh.config import load_config  # noqa: E402
from mesh.peer import wait_serving  # noqa: E402
from mesh.v1 import mesh_pb2 as pb  # noqa: E402
from mesh.wire import dump_context  # noqa: E402

FLOW = """\
Request\tLog\tMachine
vault\tOpening vault for :user with #pin\tserver
vault\tVault opened for :user\tserver
ping\tPing from :who\tserver
relay\tStarting :n\tclient
relay\tEvil step for :n\tevil
relay\tBack home with :n\tclient
relay\tServer step for :n\tserver
relay\tFinished :n\tclient
hop\tSending :n\tclient
hop\tStoring :n\tserver
hop\tStored :n\tclient
outward\tGoing out for :n\tserver
outward\tOut there for :n\tevil
"""

SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("vault", "Opening vault for :user with #pin")
def open_vault(ctx):
    log.info("next", gold="gold-of-" + ctx["user"])


@mesh.handler("ping", "Ping from :who")
def ping(ctx):
    log.info("next", pong=True)


@mesh.handler("hop", "Storing :n")
def store(ctx):
    grown = {"pad": "y" * ctx["grow"]} if "grow" in ctx else {}
    log.info("next", stored=len(ctx.get("blob", "")), **grown)
"""

BUDGET_MIB = 16
#: The server's own message limit; the originator's second config allows less.
SMALL_LIMIT = 256 * 1024


class Attack:
    """The mesh under attack, and the lines printed so far."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.broken = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.evil: Hostile | None = None

    # -- reporting --------------------------------------------------------------------------

    def report(self, attempt: str, outcome: str, detail: str, *, held: bool) -> None:
        word = outcome if held else "BROKEN"
        if not held:
            self.broken += 1
        detail = " ".join(detail.split())
        if len(detail) > 200:
            detail = detail[:197] + "..."
        print(f"{attempt} ... {word}: {detail}", flush=True)

    def expect_status(self, attempt: str, data: bytes, code: str, *, must_not: str = "") -> None:
        """Send raw bytes to server; the attempt is refused if it gets ``code``."""
        got, details = self.raw(data)
        held = got == code and not (must_not and must_not in details)
        self.report(attempt, "refused", f"{got} ({details})" if got != "OK" else got, held=held)

    def expect_error(
        self, attempt: str, run: Callable[[], Any], cls: type[BaseException], word: str = "refused"
    ) -> None:
        """Run ``run``; the attempt is refused if it raises ``cls`` (a MeshError)."""
        try:
            result = run()
        except cls as exc:
            self.report(attempt, word, f"{cls.__name__} ({exc})", held=True)
        except Exception as exc:
            self.report(attempt, word, f"{type(exc).__name__}: {exc}", held=False)
        else:
            self.report(attempt, word, f"it ran: {result!r}"[:200], held=False)

    # -- the mesh ---------------------------------------------------------------------------

    def start(self) -> None:
        root = self.root
        (root / "flow.tsv").write_text(FLOW, encoding="utf-8")
        (root / "attack_service.py").write_text(SERVICE, encoding="utf-8")
        self.evil = Hostile(root / "evil.log")
        port = _free_port()
        self.server_address = f"127.0.0.1:{port}"
        machines = (
            f'[machines]\nclient = ""\nserver = "{self.server_address}"\n'
            f'evil = "{self.evil.address}"\n'
        )
        head = 'flow = "flow.tsv"\nservices = ["attack_service"]\ntimeout = 10\n'
        self.config = root / "mesh.toml"
        self.config.write_text(
            head + f"dedup_bytes = {BUDGET_MIB << 20}\n" + machines, encoding="utf-8"
        )
        self.small = root / "small.toml"
        self.small.write_text(head + f"max_message_bytes = {SMALL_LIMIT}\n" + machines)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MESH_CONFIG", None)
        with (root / "server.out").open("wb") as out:
            server = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mesh", "peer", "server", "-c", str(self.config)),
                    *("--log-file", str(root / "server.log")),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=root,
            )
        self.procs.append(server)
        self.server_pid = server.pid
        if not wait_serving(self.server_address, 60, lambda: server.poll() is not None):
            raise SystemExit(f"attack: the server peer did not start; see {root}/server.out")
        mesh.configure_logging(json=True, file=(root / "client.log").open("a", encoding="utf-8"))
        self.node = mesh.connect(self.config, machine="client")
        self.digests = {
            name: flow.digest for name, flow in load_config(self.config).flows.flows.items()
        }
        self.channel = grpc.insecure_channel(self.server_address)
        self.continue_ = self.channel.unary_unary(
            "/mesh.v1.Mesh/Continue", request_serializer=None, response_deserializer=None
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()
        with contextlib.suppress(Exception):
            self.node.close()
        if self.evil is not None:
            self.evil.stop()
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def call(
        self, request: str, flow_id: str, context: bytes | dict[str, Any], **fields: Any
    ) -> bytes:
        """A Continue call's bytes, as client sends them."""
        values: dict[str, Any] = {
            "request": request,
            "line_index": 0,
            "context": context if isinstance(context, bytes) else dump_context(context),
            "flow_id": flow_id,
            "digest": self.digests[request],
            "via": ["client"],
            **fields,
        }
        return bytes(pb.ContinueRequest(**values).SerializeToString())

    def raw(self, data: bytes) -> tuple[str, str]:
        try:
            self.continue_(data, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", ""

    def server_rss(self) -> float:
        for line in Path(f"/proc/{self.server_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    # -- the attempts -----------------------------------------------------------------------

    def replays(self) -> None:
        victim = {"user": "ada", "pin": "4711"}
        flow_id = self.node.start("vault", **victim).flow_id
        self.expect_status(
            "replay flow id of another request (ping line 0 with vault's flow id)",
            self.call("ping", flow_id, {"who": "mallory"}),
            "ALREADY_EXISTS",
            must_not="gold-of-ada",
        )
        self.expect_status(
            "replay flow id of the same request with another context",
            self.call("vault", flow_id, {"user": "mallory", "pin": "0"}),
            "ALREADY_EXISTS",
        )
        relay = self.node.start(
            "relay",
            n=1,
            forge={"outcome": "hand_off", "machine": "client", "line_index": 2, "steps": [1]},
        )
        self.expect_status(
            "replay flow id at line 3, claiming to be client (the via a token holder may claim)",
            self.call("relay", relay.flow_id, {"n": 2}, line_index=3),
            "ALREADY_EXISTS",
        )

    def forged_replies(self) -> None:
        forged = [
            ("hand-back to line 0", {"outcome": "hand_off", "machine": "client", "line_index": 0}),
            (
                "hand-back past the end",
                {"outcome": "hand_off", "machine": "client", "line_index": 5},
            ),
            (
                "hand-back to a line of another machine",
                {"outcome": "hand_off", "machine": "client", "line_index": 3},
            ),
            ("done with lines 2-4 never run", {"outcome": "done"}),
            (
                "hand-back with a context that is not JSON",
                {"outcome": "hand_off", "machine": "client", "line_index": 2, "context": "{x"},
            ),
        ]
        for what, forge in forged:
            self.expect_error(
                f"forged reply from evil: {what}",
                lambda forge=forge: self.node.start("relay", n=1, forge={**forge, "steps": [1]}),
                mesh.PeerRefused,
            )

    def oversized(self) -> None:
        blob = "x" * 1_000_000

        def send(n: int) -> int:
            return int(self.node.start("hop", n=n, blob=blob).context["stored"])

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(8)))
            before = self.server_rss()
            list(pool.map(send, range(100)))
        after = self.server_rss()
        growth = after - before
        # The record holds at most the budget; what 4 flows in flight and the allocator keep
        # of 1 MB messages comes on top (50-60 MiB here); the 100 MB of replies do not.
        self.report(
            "100 flows with 1 MB contexts (100 MB of replies) against dedup_bytes = 16 MiB",
            "contained",
            f"server RSS {before:.0f} -> {after:.0f} MiB (+{growth:.0f})",
            held=growth < BUDGET_MIB + 64,
        )
        self.expect_error(
            "a context over max_message_bytes (5 MB against 4 MiB)",
            lambda: self.node.start("hop", n=1, blob="x" * 5_000_000),
            mesh.ContextError,
        )
        small = mesh.Node(load_config(self.small), "client")  # no line of its own to log
        try:
            self.expect_error(
                f"a reply over the originator's own limit ({SMALL_LIMIT:,} bytes)",
                lambda: small.start("hop", n=1, grow=300_000),
                mesh.ContextError,
            )
        finally:
            small.close()

    def unencodable(self) -> None:
        for what, value in [("a lone surrogate", "\ud83d"), ("a 5,000-digit int", 10**5000)]:
            self.expect_error(
                f"start a flow with {what} in the context",
                lambda value=value: self.node.start("ping", who=value),
                mesh.ContextError,
            )
        for what, context in [
            ("a lone surrogate", b'{"who": "\\ud83d"}'),
            ("1e400", b'{"who": 1e400}'),
            ("a 5,000-digit int", b'{"who": ' + b"7" * 5000 + b"}"),
        ]:
            self.expect_status(
                f"send server a context with {what}",
                self.call("ping", os.urandom(16).hex(), context),
                "INVALID_ARGUMENT",
            )

    def call_chains(self) -> None:
        # server runs line 0, then calls evil (which answers as an honest peer would).
        data = self.call("outward", os.urandom(16).hex(), {"n": 1}, via=[])
        got, details = self.raw(data)
        again, _ = self.raw(data)
        self.report(
            "line 0 with an empty via (a caller naming no machine), the flow going on to evil",
            "contained",
            "served as a caller from outside, and its retry from the record"
            if (got, again) == ("OK", "OK")
            else f"{got} ({details})",
            held=(got, again) == ("OK", "OK"),
        )
        self.expect_status(
            "a via naming the receiving peer itself",
            self.call("ping", os.urandom(16).hex(), {"who": "me"}, via=["server"]),
            "INVALID_ARGUMENT",
        )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def folder(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="mesh-attack-"))
    try:
        yield root
    finally:
        if keep:
            print(f"attack: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the mesh folder and logs")
    args = parser.parse_args(argv)
    began = time.monotonic()
    with folder(args.keep) as root:
        attack = Attack(root)
        try:
            attack.start()
            attack.replays()
            attack.forged_replies()
            attack.oversized()
            attack.unencodable()
            attack.call_chains()
        finally:
            attack.stop()
        print(
            f"attack: {attack.broken} of the attempts got through"
            f" ({time.monotonic() - began:.1f} s)"
        )
    return 1 if attack.broken else 0


if __name__ == "__main__":
    sys.exit(main())
