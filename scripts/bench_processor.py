"""What the mesh processor costs an event that is not a flow line.

Prints ns per event for the same structlog chain with and without the mesh
processors (routing first, masking before the renderer), measured interleaved
in one run, and the ratio. A node is connected, so the processor is live.

    .venv/bin/python scripts/bench_processor.py [--events 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

import mesh

FLOW = """\
Request\tLog\tMachine
login\tUser attempted login as :username and #password\tclient
login\tReceived request to login as :username\tserver
login\tTesting password for :username\tserver
login\tLogin successful\tclient
"""


def chain(with_mesh: bool, sink: Any) -> None:
    tail: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer()
    procs = [mesh.processor, *tail, mesh.mask_secrets, renderer] if with_mesh else [*tail, renderer]
    structlog.configure(
        processors=procs,
        logger_factory=structlog.PrintLoggerFactory(sink),
        cache_logger_on_first_use=True,
    )


def run(with_mesh: bool, events: int, sink: Any) -> float:
    chain(with_mesh, sink)
    log = structlog.get_logger()
    start = time.perf_counter_ns()
    for i in range(events):
        log.info("user clicked", user_id=i, page="home")
    return (time.perf_counter_ns() - start) / events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "flow.tsv").write_text(FLOW)
        Path(tmp, "mesh.toml").write_text(
            'flow = "flow.tsv"\n[machines]\nserver = "127.0.0.1:1"\nclient = ""\n'
        )
        structlog.configure(processors=[mesh.processor])
        node = mesh.connect(Path(tmp, "mesh.toml"), machine="client")
        with open(os.devnull, "w") as sink:
            run(True, 2000, sink)  # warm up both paths
            run(False, 2000, sink)
            base, meshed = [], []
            for _ in range(args.rounds):
                base.append(run(False, args.events, sink))
                meshed.append(run(True, args.events, sink))
        node.close()
    b, m = statistics.median(base), statistics.median(meshed)
    direct = _direct_cost()
    print(f"non-flow structlog event, JSON to /dev/null, {args.rounds} interleaved rounds")
    for label, value, runs in (("without", b, base), ("with", m, meshed)):
        spread = f"(min {min(runs):.0f}, max {max(runs):.0f})"
        print(f"  {label + ' mesh processors':<24}: {value:8.0f} ns/event  {spread}")
    print(f"  ratio                   : {m / b:8.3f}x  ({(m - b):+.0f} ns)")
    print(f"  mesh.processor alone    : {direct:8.0f} ns/call on a non-flow event")
    return 0


def _direct_cost(calls: int = 200000) -> float:
    proc = mesh.processor
    ed = {"event": "user clicked", "user_id": 1}
    start = time.perf_counter_ns()
    for _ in range(calls):
        proc(None, "info", ed)
    return (time.perf_counter_ns() - start) / calls


if __name__ == "__main__":
    sys.exit(main())
