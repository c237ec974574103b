"""What the tracing hooks cost a flow, with OpenTelemetry absent and with it recording.

Runs the same in-process flow (six local lines, no network, so the hooks are a
visible share of it) in worker processes, interleaved round by round:

* ``off``: the application never imports OpenTelemetry (the hooks are one
  ``sys.modules`` lookup each); the baseline;
* ``on``: the application set up the SDK with a ``SimpleSpanProcessor`` and an
  in-memory exporter, so every line becomes a recorded, exported span.

It prints µs per flow for each, the ratio against the baseline, and the cost of
one hook call while tracing is off.

    .venv/bin/python scripts/bench_tracing.py [--flows 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOW = "".join(f"bench\tStep {i} for :user\tone\n" for i in range(6))


def worker(mode: str, flows: int) -> dict[str, float]:
    """Time ``flows`` flows in this process; tracing as ``mode`` says."""
    if mode == "on":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    import io

    import mesh
    from mesh import tracing

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "flow.tsv").write_text(FLOW, encoding="utf-8")
        (root / "mesh.toml").write_text(
            'flow = "flow.tsv"\nservices = []\n[machines]\none = ""\n', encoding="utf-8"
        )
        mesh.configure_logging(json=True, file=io.StringIO())
        node = mesh.connect(root / "mesh.toml", machine="one")
        for _ in range(100):  # warm up
            node.start("bench", user="ada")
        start = time.perf_counter_ns()
        for _ in range(flows):
            node.start("bench", user="ada")
        per_flow = (time.perf_counter_ns() - start) / flows
        hook = 0.0
        if mode == "off":
            assert not any(m.startswith("opentelemetry") for m in sys.modules)
            calls = 200_000
            t0 = time.perf_counter_ns()
            for _ in range(calls):  # what each line's end asks when tracing is off
                tracing.enabled()
            hook = (time.perf_counter_ns() - t0) / calls
        else:
            assert len(exporter.get_finished_spans()) == 6 * (flows + 100)
        node.close()
    return {"flow_ns": per_flow, "hook_ns": hook}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.flows)))
        return 0
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            done = subprocess.run(
                [sys.executable, __file__, "--worker", mode, "--flows", str(args.flows)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(done.stdout))
    off = statistics.median(r["flow_ns"] for r in results["off"])
    on = statistics.median(r["flow_ns"] for r in results["on"])
    hook = statistics.median(r["hook_ns"] for r in results["off"])
    print(f"{args.rounds} rounds of {args.flows} flows of 6 local lines, medians")
    print(f"tracing off (no OpenTelemetry imported) : {off / 1000:9.1f} µs/flow")
    print(f"tracing on  (SDK, in-memory exporter)   : {on / 1000:9.1f} µs/flow")
    print(f"ratio on/off                            : {on / off:9.3f}x")
    print(f"one hook call with tracing off          : {hook:9.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
