"""Scale: 10,000 flows in flight at once through a 4-machine chain, each waiting 10 s.

The mesh: ``m0`` → ``m1`` → ``m2`` → ``m3``, each a ``mesh peer`` process on
127.0.0.1 with the default config (``workers``, ``max_calls``, ``link_window``);
the first three lines have plain handlers (they run on the peers' worker threads),
the last an ``async def`` handler that sleeps ``--seconds`` (on m3's event loop).
This process is the originator (``client``, no address): it starts every flow at
once with ``await node.start_async_with(...)``, and while they are in flight it
samples each peer's thread count (``/proc/PID/status``) and RSS. Printed: flows
finished, refused and failed, the elapsed time, the most flows in the chain at
once (from reaching m0 to their result coming back, by the flows' own timelines)
and the most asleep on m3 at once, the most threads each peer had, each peer's
peak RSS (``VmHWM``), and a PASS/FAIL line per target:

* every flow finishes, none refused or failed;
* all of them were in the chain together (the last reached m0 before the first
  came back); how many were asleep on m3 together also depends on how fast the
  machine pushes them through the first three hops within ``--seconds``;
* no thread per waiting flow: no peer has more threads than its ``workers``
  and a margin for gRPC's and the event loop's own;
* peak RSS per peer under 300 MiB.

    .venv/bin/python scripts/scale.py [--flows 10000] [--seconds 10] [--workers N]

Exits 1 when a target fails. Every peer it starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Procs, env_with_repo, free_port

MACHINES = ("m0", "m1", "m2", "m3")
RSS_LIMIT_MIB = 300.0
#: Threads a peer has besides its workers: the main thread, the event loop's, gRPC's.
THREAD_MARGIN = 32
READY_TIMEOUT = 60.0

FLOW = """\
Request\tLog\tMachine
scale\tAccepting :n\tm0
scale\tChecking :n\tm1
scale\tRouting :n\tm2
scale\tWaiting on :n\tm3
"""

SERVICE = """
import asyncio

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("scale", "Accepting :n")
def accept(ctx):
    log.info("next")


@mesh.handler("scale", "Checking :n")
def check(ctx):
    log.info("next")


@mesh.handler("scale", "Routing :n")
def route(ctx):
    log.info("next")


@mesh.handler("scale", "Waiting on :n")
async def wait(ctx):
    await asyncio.sleep(ctx["seconds"])
    log.info("next", waited=True)
"""


def status(pid: int, key: str) -> int:
    """A number from /proc/PID/status (``Threads``, ``VmHWM`` in KiB, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def most_at_once(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals (start, end) that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def write_mesh(folder: Path, workers: int | None) -> tuple[Path, dict[str, str]]:
    addresses = {m: f"127.0.0.1:{free_port()}" for m in MACHINES}
    (folder / "flow.tsv").write_text(FLOW)
    (folder / "scale_steps.py").write_text(SERVICE)
    machines = "\n".join(f'{m} = "{a}"' for m, a in addresses.items())
    config = folder / "mesh.toml"
    pool = "" if workers is None else f"workers = {workers}\n"
    config.write_text(
        f'flow = "flow.tsv"\nservices = ["scale_steps"]\n{pool}'
        f'[machines]\nclient = ""\n{machines}\n'
    )
    return config, addresses


async def crowd(
    node: Any, flows: int, seconds: float, timeout: float, pids: dict[str, int]
) -> tuple[list[Any], float, dict[str, int]]:
    """Start every flow at once; sample the peers' threads until all have ended."""
    threads = dict.fromkeys(pids, 0)

    def sample() -> None:
        for machine, pid in pids.items():
            threads[machine] = max(threads[machine], status(pid, "Threads"))

    start = time.perf_counter()

    async def flow(n: int) -> tuple[Any, float]:
        context = {"n": n, "seconds": seconds}
        result = await node.start_async_with("scale", context, timeout=timeout)
        return result, time.time()  # when its result came back (steps use the wall clock)

    tasks = [asyncio.ensure_future(flow(n)) for n in range(flows)]
    while not all(task.done() for task in tasks):
        sample()
        await asyncio.wait(tasks, timeout=0.2)
    sample()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return results, time.perf_counter() - start, threads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=10_000, help="flows in flight (10,000)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="how long the last step sleeps (10)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="each flow's deadline, seconds (300)"
    )
    parser.add_argument(
        "--workers", type=int, help="the peers' workers (default: the config's default, 256)"
    )
    args = parser.parse_args(argv)

    import mesh
    from mesh.config import load_config
    from mesh.errors import PeerRefused
    from mesh.peer import wait_serving

    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))  # the finally below stops peers
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-scale-") as tmp:
            config, addresses = write_mesh(Path(tmp), args.workers)
            workers = load_config(config).workers
            peers = {
                m: procs.start(
                    [sys.executable, "-m", "mesh", "peer", m, "-c", str(config), "--json"],
                    env=env_with_repo(),
                )
                for m in MACHINES
            }
            for m, proc in peers.items():
                if not wait_serving(
                    addresses[m], READY_TIMEOUT, lambda p=proc: p.poll() is not None
                ):
                    print(f"scale: peer {m} did not start (exit {proc.poll()})", file=sys.stderr)
                    return 1
            devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
            mesh.configure_logging(json=True, file=devnull)
            node = mesh.connect(config, machine="client")
            try:
                node.start("scale", n=-1, seconds=0, timeout=30)  # every link is up
                pids = {m: p.pid for m, p in peers.items()}
                results, elapsed, threads = asyncio.run(
                    crowd(node, args.flows, args.seconds, args.timeout, pids)
                )
                rss = {m: status(pid, "VmHWM") / 1024 for m, pid in pids.items()}
            finally:
                node.close()
                devnull.close()
    finally:
        procs.stop_all()

    errors = [r for r in results if isinstance(r, BaseException)]
    refused = [e for e in errors if isinstance(e, PeerRefused)]
    finished = [r for r in results if not isinstance(r, BaseException)]
    asleep = most_at_once(
        [(s.start, s.start + s.duration) for r, _ in finished for s in r.steps if s.machine == "m3"]
    )
    in_chain = most_at_once(
        [(s.start, end) for r, end in finished for s in r.steps if s.machine == "m0"]
    )
    most_threads = max(threads.values())
    peak = max(rss.values())
    out = [
        f"flows finished   : {len(finished)} of {args.flows}",
        f"refused / failed : {len(refused)} / {len(errors) - len(refused)}",
        f"elapsed          : {elapsed:.1f} s (the last step sleeps {args.seconds:g} s)",
        f"in the chain     : {in_chain} flows at once, at most (from m0 to their result)",
        f"asleep on m3     : {asleep} flows at once, at most",
        "threads per peer : "
        + ", ".join(f"{m} {n}" for m, n in threads.items())
        + f" (the most seen while flows were in flight; workers = {workers})",
        "peak RSS per peer: " + ", ".join(f"{m} {v:.1f}" for m, v in rss.items()) + " MiB (VmHWM)",
        "peer pids        : " + ", ".join(f"{m} {pid}" for m, pid in pids.items()) + " (stopped)",
    ]
    if errors:
        out.append(f"first error      : {type(errors[0]).__name__}: {errors[0]}"[:300])
    checks = [
        (
            "every flow finished",
            len(finished) == args.flows,
            f"{len(finished)} of {args.flows}",
        ),
        ("none refused or failed", not errors, f"{len(refused)} refused, {len(errors)} in all"),
        (
            "all in flight together",
            in_chain == args.flows,
            f"{in_chain} of {args.flows} in the chain at once",
        ),
        (
            "no thread per waiting flow",
            most_threads <= workers + THREAD_MARGIN,
            f"at most {most_threads} threads in a peer (limit workers + {THREAD_MARGIN}"
            f" = {workers + THREAD_MARGIN}) with {args.flows} flows in flight",
        ),
        (
            f"peak RSS per peer < {RSS_LIMIT_MIB:g} MiB",
            peak < RSS_LIMIT_MIB,
            f"{peak:.1f} MiB at most",
        ),
    ]
    out += [f"{'PASS' if ok else 'FAIL'}  {label}: {detail}" for label, ok, detail in checks]
    print("\n".join(out))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
