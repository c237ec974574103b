"""Soak: many flows through a 3-machine mesh with a replicated machine; check none ran twice
and none went missing.

The mesh: ``client`` (this process, the originator), ``server`` at 2 replicas and
``store``, each peer a ``mesh peer`` process on 127.0.0.1. Flow ``soak`` goes
client → server → store → (handed back to) server → client; every handler records
its (flow_id, line_index) in its own process's SQLite file. At the end:

* exactly once: no (flow_id, line_index) is recorded twice;
* nothing missing: every flow the originator was told succeeded has all three of its
  handler steps recorded;

and the figures: flows/s, p50/p99 latency, failures, each peer's RSS at the start,
at each quarter of the flows and at the end.
Exits 1 if a check fails.

    .venv/bin/python scripts/soak.py [--flows 20000] [--concurrency 64] [--dedup-size N] [--keep]

RSS grows while each peer's record of replies (dedup.py) fills up to ``dedup_size``
entries, then stays flat; ``--dedup-size`` shows that in a short run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mesh
from mesh.config import load_config
from mesh.peer import wait_serving

FLOW = """\
Request\tLog\tMachine
soak\tAsked for :n\tclient
soak\tReceived :n\tserver
soak\tStored :n\tstore
soak\tAnswered :n\tserver
soak\tDone with :n\tclient
"""

#: The handler lines, by index: what must be recorded once for each successful flow.
HANDLED = (1, 2, 3)

SERVICE = '''
import os
import sqlite3
import threading

import structlog

import mesh

log = structlog.get_logger()
_local = threading.local()


def record(ctx):
    """One row per step run, in this process's own file: (flow_id, line_index)."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        path = os.path.join(os.environ["MESH_SOAK_DIR"], f"steps-{os.getpid()}.sqlite")
        conn = _local.conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS steps (flow_id TEXT, line_index INT, pid INT)")
    bound = structlog.contextvars.get_contextvars()  # the runtime binds the step's fields
    conn.execute(
        "INSERT INTO steps VALUES (?, ?, ?)", (bound["flow_id"], bound["line_index"], os.getpid())
    )


@mesh.handler("soak", "Received :n")
def received(ctx):
    record(ctx)
    log.info("next", received=True)


@mesh.handler("soak", "Stored :n")
def stored(ctx):
    record(ctx)
    log.info("next", stored=True)


@mesh.handler("soak", "Answered :n")
def answered(ctx):
    record(ctx)
    log.info("next", answered=True)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_mesh(root: Path, dedup_size: int | None) -> Path:
    (root / "flow.tsv").write_text(FLOW, encoding="utf-8")
    (root / "soak_service.py").write_text(textwrap.dedent(SERVICE), encoding="utf-8")
    replicas = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    config = root / "mesh.toml"
    config.write_text(
        'flow = "flow.tsv"\nservices = ["soak_service"]\ntimeout = 30\n'
        + (f"dedup_size = {dedup_size}\n" if dedup_size else "")
        + "[machines]\n"
        f'client = ""\nserver = "ipv4:{",".join(replicas)}"\n'
        f'store = "127.0.0.1:{free_port()}"\n',
        encoding="utf-8",
    )
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--dedup-size", type=int, help="the peers' dedup_size (default: the config's default)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the mesh folder and logs")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="mesh-soak-"))
    config = write_mesh(root, args.dedup_size)
    env = {**os.environ, "MESH_SOAK_DIR": str(root), "PYTHONUNBUFFERED": "1"}
    env.pop("MESH_CONFIG", None)
    loaded = load_config(config)
    peers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for machine, replica, address in [
            ("server", "1", loaded.machines["server"].binds[0]),
            ("server", "2", loaded.machines["server"].binds[1]),
            ("store", "", loaded.machines["store"].address),
        ]:
            label = f"{machine}{replica}"
            which = ["--replica", replica] if replica else []
            peers[label] = proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mesh", "peer", machine, *which, "-c", str(config)),
                    *("--log-file", str(root / f"{label}.log")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=root,
            )
            if not wait_serving(address, 60, lambda p=proc: p.poll() is not None):
                print(f"soak: peer {label} did not start; see {root}", file=sys.stderr)
                return 1
        return run(args, root, peers)
    finally:
        for proc in peers.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in peers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if not args.keep:
            for path in sorted(root.iterdir()):
                path.unlink()
            root.rmdir()
        else:
            print(f"soak: kept {root}")


def run(args: argparse.Namespace, root: Path, peers: dict[str, subprocess.Popen[bytes]]) -> int:
    with (root / "client.log").open("a", encoding="utf-8") as log:
        mesh.configure_logging(json=True, file=log)
        return measure(args, root, peers)


def measure(args: argparse.Namespace, root: Path, peers: dict[str, subprocess.Popen[bytes]]) -> int:
    node = mesh.connect(root / "mesh.toml", machine="client")
    # Warm up at full concurrency: channels open, every worker thread started (each
    # with its own SQLite connection); RSS is measured from this steady state.
    warm_up = max(200, 4 * args.concurrency)
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda n: node.start("soak", n=-n - 1), range(warm_up)))
    rss_start = {label: rss_kib(p.pid) for label, p in peers.items()}

    def one(n: int) -> tuple[str | None, float, str]:
        began = time.perf_counter()
        try:
            result = node.start("soak", n=n, timeout=30)
        except mesh.MeshError as exc:
            return None, time.perf_counter() - began, f"{type(exc).__name__}: {exc}"
        return result.flow_id, time.perf_counter() - began, ""

    # Sampled at each quarter of the flows (the pool keeps running meanwhile), so
    # growth that levels off can be told from growth that goes on.
    samples: dict[str, list[int]] = {label: [] for label in peers}
    quarters = {args.flows * q // 4 for q in (1, 2, 3)}

    def sampled(n: int) -> tuple[str | None, float, str]:
        if n in quarters:
            for label, p in peers.items():
                samples[label].append(rss_kib(p.pid))
        return one(n)

    began = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        outcomes = list(pool.map(sampled, range(args.flows)))
    wall = time.perf_counter() - began
    rss_end = {label: rss_kib(p.pid) for label, p in peers.items()}
    node.close()

    succeeded = {flow_id for flow_id, _, _ in outcomes if flow_id}
    errors = Counter(error.split(":")[0] for _, _, error in outcomes if error)
    latencies = sorted(seconds for _, seconds, _ in outcomes)
    steps: Counter[tuple[str, int]] = Counter()
    by_pid: Counter[int] = Counter()
    for db in root.glob("steps-*.sqlite"):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            for flow_id, index, pid in conn.execute("SELECT flow_id, line_index, pid FROM steps"):
                steps[(flow_id, index)] += 1
                by_pid[pid] += 1
    twice = [key for key, count in steps.items() if count > 1]
    missing = [(f, i) for f in succeeded for i in HANDLED if (f, i) not in steps]

    dedup = load_config(root / "mesh.toml").dedup_size
    print(
        f"soak: {args.flows} flows at concurrency {args.concurrency}, {os.cpu_count()} cores,"
        f" dedup_size {dedup}"
    )
    print(f"  throughput      : {args.flows / wall:8.1f} flows/s  ({wall:.1f} s)")
    print(f"  latency p50     : {statistics.median(latencies) * 1000:8.1f} ms")
    print(f"  latency p99     : {latencies[int(len(latencies) * 0.99) - 1] * 1000:8.1f} ms")
    print(f"  failures        : {args.flows - len(succeeded)}  {dict(errors) if errors else ''}")
    print(
        f"  steps recorded  : {sum(steps.values())}  (by process: {sorted(by_pid.values())};"
        f" {warm_up} warm-up flows included)"
    )
    print(f"  exactly once    : {'ok' if not twice else f'FAILED: {len(twice)} steps ran twice'}")
    print(f"  nothing missing : {'ok' if not missing else f'FAILED: {len(missing)} steps missing'}")
    for label in peers:
        path = [rss_start[label], *samples[label], rss_end[label]]
        print(f"  rss {label:<11} : {' -> '.join(f'{k / 1024:.1f}' for k in path)} MiB")
    expected = len(HANDLED) * (len(succeeded) + warm_up)
    if sum(steps.values()) != expected:
        print(f"  FAILED: {sum(steps.values())} steps recorded, {expected} expected")
        return 1
    return 1 if twice or missing else 0


if __name__ == "__main__":
    sys.exit(main())
