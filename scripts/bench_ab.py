"""A change to the hot path, A/B: the same chain run by two versions of the mesh, interleaved.

``bench.py`` compares the mesh with other systems; this compares the mesh with itself, to
say what one change buys. It starts two chains of N ``mesh peer`` processes on
127.0.0.1: chain A from the git revision ``--base`` (exported with ``git archive`` into a
temporary folder), chain B from this checkout. One originator (this process, this
checkout's mesh, ``mesh.connect_async``) runs rounds on A and B in turn, the order
swapped each round: flows one at a time (p50, and the peers' CPU per flow from
``/proc``), then 32 in flight for a fixed time (flows per second). It prints each round
and the median of the per-round ratios B/A, which load on a shared machine disturbs
least.

``--originator`` compares the two ways an asyncio application originates instead, on one
chain of this checkout: A a node of ``mesh.connect`` (its own event loop thread), B a
node of ``mesh.connect_async`` (the application's loop).

    .venv/bin/python scripts/bench_ab.py --base main~1 [--hops 4] [--rounds 6]
    .venv/bin/python scripts/bench_ab.py --originator
    .venv/bin/python scripts/bench_ab.py --base HEAD --smoke    # seconds, for the tests

Every process it starts is stopped by its pid, and the exported revision removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench import (  # noqa: E402 - beside this script
    CONTEXT,
    MESH_SERVICE,
    Procs,
    cpu_seconds,
    free_port,
    hop_line,
    interrupts_stop,
    spread,
    wait_grpc,
)


def export(revision: str, into: Path) -> Path:
    """The mesh package of ``revision``, as files in ``into`` (no worktree, no checkout)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "mesh"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"bench_ab: git archive {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def start_chain(
    procs: Procs, folder: Path, code: Path, hops: int, define: str
) -> tuple[Path, list[int]]:
    """N peers m0 … m(N-1), line i on mi, running the mesh found in ``code``."""
    folder.mkdir()
    rows = ["Request\tLog\tMachine"] + [f"chain{hops}\t{hop_line(i)}\tm{i}" for i in range(hops)]
    (folder / "flow.tsv").write_text("\n".join(rows) + "\n")
    (folder / "bench_hops.py").write_text(MESH_SERVICE.format(hops=(hops,), define=define))
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(hops)]
    machines = "\n".join(f'm{i} = "{a}"' for i, a in enumerate(addresses))
    config = folder / "mesh.toml"
    config.write_text(
        'flow = "flow.tsv"\nservices = ["bench_hops"]\ntimeout = 30\n'
        f'[machines]\nclient = ""\n{machines}\n'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(folder)]))
    env.pop("MESH_CONFIG", None)
    peers = [
        procs.start(
            [sys.executable, "-m", "mesh", "peer", f"m{i}", "-c", str(config), "--json"],
            env=env,
            cwd=folder,
        )
        for i in range(hops)
    ]
    wait_grpc(addresses, peers)
    return config, [p.pid for p in peers]


async def one_at_a_time(node: Any, request: str, flows: int) -> float:
    lat = []
    for _ in range(flows):
        start = time.perf_counter()
        await node.start_async_with(request, CONTEXT, timeout=30)
        lat.append(time.perf_counter() - start)
    return statistics.median(lat)


async def in_flight(node: Any, request: str, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await node.start_async_with(request, CONTEXT, timeout=30)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def rounds(
    nodes: dict[str, Any], pids: dict[str, list[int]], args: argparse.Namespace
) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {"p50": [], "throughput": [], "cpu": []}
    request = f"chain{args.hops}"
    for node in nodes.values():
        await one_at_a_time(node, request, max(args.flows // 3, 5))  # warm: links open, code loaded
    for r in range(args.rounds):
        got: dict[str, tuple[float, float, float]] = {}
        for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
            cpu = sum(cpu_seconds(pid) for pid in pids[side])
            p50 = await one_at_a_time(nodes[side], request, args.flows)
            cpu = (sum(cpu_seconds(pid) for pid in pids[side]) - cpu) / args.flows
            thr = await in_flight(nodes[side], request, args.concurrency, args.seconds)
            got[side] = (p50, thr, cpu)
        (pa, ta, ca), (pb, tb, cb) = got["A"], got["B"]
        ratios["p50"].append(pb / pa)
        ratios["throughput"].append(tb / ta)
        if ca > 0:
            ratios["cpu"].append(cb / ca)
        print(
            f"round {r + 1}: one at a time p50 A {pa * 1e3:.2f} B {pb * 1e3:.2f} ms,"
            f" peers' CPU/flow A {ca * 1e3:.2f} B {cb * 1e3:.2f} ms;"
            f" {args.concurrency} in flight A {ta:.0f} B {tb:.0f} flows/s",
            flush=True,
        )
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="the git revision chain A runs (B: this checkout)")
    which.add_argument(
        "--originator",
        action="store_true",
        help="one chain; A originates from mesh.connect, B from mesh.connect_async",
    )
    parser.add_argument("--hops", type=int, default=4, help="machines in the chain (default 4)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, A and B each (default 6)")
    parser.add_argument("--flows", type=int, default=300, help="flows one at a time per round")
    parser.add_argument("--concurrency", type=int, default=32, help="flows in flight (default 32)")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds in flight per round")
    parser.add_argument("--async-handlers", action="store_true", help="async def handlers")
    parser.add_argument("--smoke", action="store_true", help="2 short rounds, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.flows, args.seconds = 2, 20, 0.3
    define = "async def" if args.async_handlers else "def"

    import mesh

    mesh.configure_logging(json=True, file=os.devnull)
    procs = Procs()
    try:
        with interrupts_stop(), tempfile.TemporaryDirectory(prefix="mesh-ab-") as tmp:
            root = Path(tmp)
            if args.originator:
                config, pids = start_chain(procs, root / "chain", REPO, args.hops, define)
                configs, chain_pids = {"A": config, "B": config}, {"A": pids, "B": pids}
                a_says = "mesh.connect (a loop thread of the node's own)"
                b_says = "mesh.connect_async (the application's loop)"
            else:
                base = export(args.base, Path(tempfile.mkdtemp(dir=tmp, prefix="base-")))
                a_cfg, a_pids = start_chain(procs, root / "a", base, args.hops, define)
                b_cfg, b_pids = start_chain(procs, root / "b", REPO, args.hops, define)
                configs, chain_pids = {"A": a_cfg, "B": b_cfg}, {"A": a_pids, "B": b_pids}
                a_says, b_says = f"peers of {args.base}", "peers of this checkout"
            print(f"A: {a_says}\nB: {b_says}", flush=True)
            every = sorted({pid for side in chain_pids.values() for pid in side})
            print(f"peer pids: {' '.join(map(str, every))}", flush=True)
            print(
                f"{args.hops} machines, {define} handlers; {args.rounds} rounds of {args.flows}"
                f" flows one at a time, then {args.concurrency} in flight for {args.seconds:g} s",
                flush=True,
            )

            async def run() -> dict[str, list[float]]:
                if args.originator:
                    nodes = {
                        "A": mesh.connect(configs["A"], machine="client"),
                        "B": await mesh.connect_async(configs["B"], machine="client"),
                    }
                else:
                    nodes = {
                        side: await mesh.connect_async(cfg, machine="client")
                        for side, cfg in configs.items()
                    }
                try:
                    return await rounds(nodes, chain_pids, args)
                finally:
                    for node in nodes.values():
                        await node.aclose()

            ratios = asyncio.run(run())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print("B/A, the median of the per-round ratios (min-max):")
    print(f"  p50 one flow at a time:    {spread(ratios['p50'], '.3f')}")
    print(f"  peers' CPU per flow:       {spread(ratios['cpu'], '.3f')}")
    print(f"  flows/s, {args.concurrency} in flight:     {spread(ratios['throughput'], '.3f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
