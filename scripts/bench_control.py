"""What control flow buys and costs, with real peers (docs/control-flow.md).

* **Fan-out.** A 100-element ``Each`` row over three replicas of ``inventory``, each run a
  handler doing 5 ms of I/O (a sleep), against the same work done item by item in one
  handler on ``inventory`` (target: the fan-out at least 2x faster).
* **Conditions.** A flow of ten lines over two machines, four of them with a ``When``
  that holds, against the same flow without the column (target: at most 1.05x the time).

Peers are ``mesh peer`` processes on 127.0.0.1, stopped by process id at the end; the
originator is this process. Prints the figures and their ratios; ``--json PATH`` writes
them too.

    .venv/bin/python scripts/bench_control.py [--items 100] [--flows 300] [--rounds 5]
    .venv/bin/python scripts/bench_control.py --smoke     # a few seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = "Request\tLog\tMachine\tWhen\tEach\n"
FLOWS = (
    HEADER + "fan\tOrder :n placed\tclient\n"
    "fan\tReserving one item\tinventory\t\titems\n"
    "fan\tOrder :n reserved\tclient\n"
    "serial\tOrder :n placed\tclient\n"
    "serial\tReserving every item\tinventory\n"
    "serial\tOrder :n reserved\tclient\n"
    + "".join(
        f"{name}\tStep {i} of :n\t{'client' if i in (0, 9) else 'worker'}\t"
        + ("go" if name == "cond" and i in (2, 4, 6, 8) else "")
        + "\n"
        for name in ("plain", "cond")
        for i in range(10)
    )
)

SERVICE = """
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("fan", "Reserving one item")
def reserve_one(ctx):
    time.sleep(ctx["io"])  # a call to a stock service
    log.info("next", reserved=ctx["item"])


@mesh.handler("serial", "Reserving every item")
def reserve_all(ctx):
    done = []
    for item in ctx["items"]:
        time.sleep(ctx["io"])
        done.append({"reserved": item})
    log.info("next", items_results=done)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_mesh(root: Path) -> Path:
    (root / "flow.tsv").write_text(FLOWS, encoding="utf-8")
    (root / "bench_control_service.py").write_text(SERVICE, encoding="utf-8")
    inventory = [f"127.0.0.1:{_free_port()}" for _ in range(3)]
    worker = f"127.0.0.1:{_free_port()}"
    config = root / "mesh.toml"
    config.write_text(
        'flow = "flow.tsv"\nservices = ["bench_control_service"]\nmax_fan_out = 64\n'
        f'[machines]\nclient = ""\nworker = "{worker}"\n'
        f'inventory = "ipv4:{",".join(inventory)}"\n',
        encoding="utf-8",
    )
    return config


def _start_peers(config: Path, log: Path) -> list[subprocess.Popen[bytes]]:
    from mesh.config import load_config
    from mesh.peer import wait_serving

    loaded = load_config(config)
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(config.parent)}
    env.pop("MESH_CONFIG", None)
    with log.open("ab") as out:
        starts = [("worker", None)] + [("inventory", k) for k in (1, 2, 3)]
        for machine, replica in starts:
            which = ["--replica", str(replica)] if replica else []
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mesh", "peer", machine, *which, "-c", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=config.parent,
                )
            )
    for bind, proc in zip(
        [loaded.machines["worker"].listen, *loaded.machines["inventory"].binds], procs, strict=True
    ):
        if not wait_serving(bind, 60, lambda p=proc: p.poll() is not None):  # type: ignore[misc]
            raise SystemExit(f"a peer did not start; see {log}")
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _time(fn: object, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(items: int, flows: int, rounds: int, io: float) -> dict[str, float]:
    import structlog

    import mesh

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _write_mesh(root)
        procs = _start_peers(config, root / "peers.log")
        try:
            structlog.configure(
                processors=[mesh.processor, structlog.processors.JSONRenderer()],
                logger_factory=structlog.ReturnLoggerFactory(),
                cache_logger_on_first_use=True,
            )
            node = mesh.connect(config, machine="client")
            cart = [f"sku-{i}" for i in range(items)]
            try:

                def fan() -> None:
                    done = node.start("fan", n=1, items=cart, io=io, timeout=120)
                    assert len(done.context["items_results"]) == items

                def serial() -> None:
                    node.start("serial", n=1, items=cart, io=io, timeout=120)

                def run(name: str) -> None:
                    for _ in range(flows):
                        node.start(name, n=1, go=True, timeout=60)

                for warm in (fan, serial, lambda: run("plain"), lambda: run("cond")):
                    warm()
                figures: dict[str, list[float]] = {"fan": [], "serial": [], "plain": [], "cond": []}
                for n in range(rounds):  # interleaved, each side first in turn
                    pairs = [("fan", fan), ("serial", serial)]
                    pairs += [(k, lambda k=k: run(k)) for k in ("plain", "cond")]  # type: ignore[misc]
                    for name, fn in pairs if n % 2 == 0 else pairs[::-1]:
                        per = flows if name in ("plain", "cond") else 1
                        figures[name].append(_time(fn, 1) / per)
            finally:
                node.close()
        finally:
            _stop(procs)
    out = {k: statistics.median(v) for k, v in figures.items()}
    out["fan_speedup"] = out["serial"] / out["fan"]
    out["condition_cost"] = out["cond"] / out["plain"]
    out.update(items=items, flows=flows, rounds=rounds, io_ms=io * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="elements of the Each row")
    parser.add_argument("--flows", type=int, default=300, help="flows per condition round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--io", type=float, default=0.005, help="seconds of I/O per item")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.items, args.flows, args.rounds = 12, 10, 1
    r = measure(args.items, args.flows, args.rounds, args.io)
    print(f"fan-out: {r['items']} items x {r['io_ms']:g} ms of I/O, 3 replicas, medians")
    print(f"  Each row, over the replicas   : {r['fan'] * 1000:9.1f} ms/flow")
    print(f"  one handler, item by item     : {r['serial'] * 1000:9.1f} ms/flow")
    print(f"  speed-up                      : {r['fan_speedup']:9.2f}x   (target >= 2x)")
    print(f"conditions: 10 lines over 2 machines, {r['flows']} flows a round, medians")
    print(f"  without When                  : {r['plain'] * 1e6:9.1f} µs/flow")
    print(f"  4 rows with a When that holds : {r['cond'] * 1e6:9.1f} µs/flow")
    print(f"  ratio                         : {r['condition_cost']:9.3f}x  (target <= 1.05x)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
