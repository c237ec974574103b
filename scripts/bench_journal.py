"""What the journal costs a flow: durable against plain flows through the same 4 peers.

A 4-machine chain (``m0`` .. ``m3``, one ``mesh peer`` process each, on 127.0.0.1) and
an address-less originator (this process): the request ``durable`` is journaled on every
machine (``durable = ["durable"]``), ``plain`` is the same lines and is not. Each handler
only logs ``"next"``, so the figures are the mesh's own cost, journal included. Rounds
alternate plain and durable so that a busy machine slows both alike.

It prints, for each: flows per second with 32 in flight (``node.start_async``) and the
sequential p50 (``node.start``, one at a time); then durable/plain as ratios (the issue's
targets: throughput >= 0.7x, p50 <= 1.4x).

    .venv/bin/python scripts/bench_journal.py [--seconds 5] [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MACHINES = ("m0", "m1", "m2", "m3")

SERVICE = """
import structlog

import mesh

log = structlog.get_logger()

for request in ("plain", "durable"):
    for i, machine in enumerate(("m0", "m1", "m2", "m3")):

        @mesh.handler(request, f"Step {i} for :user")
        def step(ctx, _i=i):
            log.info("next", **{f"s{_i}": True})
"""


def flow_text() -> str:
    rows = ["Request\tLog\tMachine"]
    for request in ("plain", "durable"):
        rows.append(f"{request}\tStart for :user\tclient")
        rows += [f"{request}\tStep {i} for :user\t{m}" for i, m in enumerate(MACHINES)]
        rows.append(f"{request}\tDone for :user\tclient")
    return "\n".join(rows) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_peers(root: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for machine in reversed(MACHINES):
        log = (root / f"{machine}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    # BENCH_PROFILE=m1: that peer runs under cProfile, into /tmp/m1.prof.
                    *(
                        ["-m", "cProfile", "-o", f"/tmp/{machine}.prof"]
                        if os.environ.get("BENCH_PROFILE") == machine
                        else []
                    ),
                    *("-m", "mesh", "peer", machine, "-c", str(root / "mesh.toml")),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        )
    from mesh.peer import wait_serving

    text = (root / "mesh.toml").read_text()
    for machine in MACHINES:
        address = re.search(rf'^{machine} = "([^"]+)"', text, re.MULTILINE)
        assert address is not None
        if not wait_serving(address.group(1), 30):
            raise SystemExit(f"{machine} did not start: see {root / (machine + '.log')}")
    return procs


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds (user + system) the peers and this process have used so far."""
    total = sum(os.times()[:2])
    tick = os.sysconf("SC_CLK_TCK")
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def sequential(node: object, request: str, seconds: float) -> float:
    """p50 in ms of flows run one at a time for ``seconds``."""
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        node.start(request, user="ada")  # type: ignore[attr-defined]
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def concurrent(
    node: object, request: str, seconds: float, in_flight: int = 32
) -> tuple[float, int]:
    """Flows per second with ``in_flight`` flows in flight for ``seconds``, and how many."""

    async def run() -> tuple[float, int]:
        done = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                await node.start_async(request, user="ada")  # type: ignore[attr-defined]
                done += 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return done / (time.monotonic() - began), done

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each (default 2)")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    import mesh

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "flow.tsv").write_text(flow_text(), encoding="utf-8")
        (root / "bench_service.py").write_text(SERVICE, encoding="utf-8")
        machines = "\n".join(f'{m} = "127.0.0.1:{free_port()}"' for m in MACHINES)
        (root / "mesh.toml").write_text(
            'flow = "flow.tsv"\nservices = ["bench_service"]\ndurable = ["durable"]\n'
            f"timeout = 60\n[journal]\nsynchronous = {args.synchronous!r}\n"
            f'[machines]\nclient = ""\n{machines}\n'.replace("'", '"'),
            encoding="utf-8",
        )
        procs = start_peers(root)
        try:
            mesh.configure_logging(json=True, file=io.StringIO())
            node = mesh.connect(root / "mesh.toml", machine="client")
            for request in ("plain", "durable"):  # warm up links and journals
                concurrent(node, request, 1.0)
            results: dict[str, dict[str, list[float]]] = {
                r: {"tput": [], "p50": [], "cpu": []} for r in ("plain", "durable")
            }
            for _ in range(args.rounds):
                for request in ("plain", "durable"):
                    cpu = cpu_seconds(procs)
                    tput, flows = concurrent(node, request, args.seconds)
                    results[request]["cpu"].append((cpu_seconds(procs) - cpu) / flows * 1000)
                    results[request]["tput"].append(tput)
                    results[request]["p50"].append(sequential(node, request, args.seconds))
            node.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(15)
    print(
        f"journal bench: 4 peers, 6 lines (client, m0..m3, client), synchronous="
        f"{args.synchronous}, {args.rounds} x {args.seconds:g} s each, {os.cpu_count()} cores"
    )
    for request in ("plain", "durable"):
        tput = statistics.median(results[request]["tput"])
        p50 = statistics.median(results[request]["p50"])
        cpu = statistics.median(results[request]["cpu"])
        print(
            f"  {request:8s}: {tput:8.1f} flows/s at 32 in flight   p50 {p50:6.2f} ms sequential"
            f"   CPU {cpu:5.2f} ms/flow (5 processes)"
        )
    tput = statistics.median(results["durable"]["tput"]) / statistics.median(
        results["plain"]["tput"]
    )
    p50 = statistics.median(results["durable"]["p50"]) / statistics.median(results["plain"]["p50"])
    print(
        f"  durable/plain: throughput {tput:.2f}x (target >= 0.7x), p50 {p50:.2f}x (target <= 1.4x)"
    )


if __name__ == "__main__":
    main()
