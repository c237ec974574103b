"""OpenTelemetry tracing across real peer processes, each exporting its spans to a file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir
from support.peers import Peers


def _installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it.

    Looked up, not imported: importing OpenTelemetry here would turn tracing on for
    every in-process test of this session (the hooks trace once the app imports it).
    find_spec imports the parent package, so without ``opentelemetry`` at all it raises
    instead of answering None; that would break the collection of this whole file.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_otel_sdk = pytest.mark.skipif(
    not _installed("opentelemetry.sdk"),
    reason="needs the mesh[otel] extra, opentelemetry-sdk (make test installs it)",
)

#: A client with no address, a server, and a ticket office; line 4 is handed back.
TRIP_FLOW = (
    "Request\tLog\tMachine\n"
    "trip\tBooking trip for :traveller with #card\tclient\n"
    "trip\tReserving seat for :traveller\tserver\n"
    "trip\tCharging card\tserver\n"
    "trip\tIssuing ticket :ticket\ttickets\n"
    "trip\tTrip booked for :traveller\tclient\n"
)
CARD = "4111-1111-1111-1111"

#: Every process that imports the services (both peers and `mesh call`) sets up
#: the SDK with an in-memory exporter and writes its spans to a file at exit.
TRACED_SERVICE = """
import atexit
import json
import os

import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import mesh

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)


@atexit.register
def dump():
    path = os.path.join(os.environ["MESH_TEST_SPANS"], f"spans-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump([json.loads(s.to_json()) for s in exporter.get_finished_spans()], f)


log = structlog.get_logger()


@mesh.handler("trip", "Charging card")
def charge(ctx):
    if ctx["card"] == "declined":
        raise ValueError("card declined")
    log.info("next", ticket="T-" + ctx["traveller"])
"""


def _trip_mesh(mesh_dir: MeshDir, service: str) -> None:
    mesh_dir.flow(TRIP_FLOW)
    mesh_dir.service(service)
    mesh_dir.write_config({"client": False, "server": True, "tickets": True})


def _spans(folder: Path) -> list[dict[str, Any]]:
    """Every exported span, each with the pid of the process that recorded it."""
    out = []
    for path in sorted(folder.glob("spans-*.json")):
        pid = int(path.stem.split("-")[1])
        out += [{**span, "pid": pid} for span in json.loads(path.read_text(encoding="utf-8"))]
    return out


@needs_otel_sdk
def test_one_trace_per_flow_across_peers(mesh_dir: MeshDir, peers: Peers, tmp_path: Path) -> None:
    """Each line is a span on its machine, named by its template, nested in flow order."""
    _trip_mesh(mesh_dir, TRACED_SERVICE)
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    env = {"MESH_TEST_SPANS": str(spans_dir)}
    # tickets first: the server dials it, and learns its port from the config at start
    started = [peers.start(mesh_dir, m, env=env) for m in ("tickets", "server")]
    ok = run_mesh(
        "call", "trip", "traveller=ada", f"card={CARD}", "-c", mesh_dir.config, "--json", env=env
    )
    assert ok.returncode == 0, ok.stderr
    flow_id = json.loads(ok.stdout)["flow_id"]
    declined = run_mesh(
        "call", "trip", "traveller=bob", "card=declined", "-c", mesh_dir.config, env=env
    )
    assert declined.returncode == 1
    for peer in started:
        assert peer.stop() == 0
    spans = _spans(spans_dir)
    assert CARD not in json.dumps(spans)  # names and attributes never hold a secret value

    trip = sorted(
        (s for s in spans if s["attributes"]["flow_id"] == flow_id),
        key=lambda s: s["attributes"]["line_index"],
    )
    lines = [line.split("\t") for line in TRIP_FLOW.splitlines()[1:]]
    assert [s["name"] for s in trip] == [text for _, text, _ in lines]
    assert [s["attributes"] for s in trip] == [
        {"flow_id": flow_id, "request": "trip", "line_index": i, "machine": machine}
        for i, (_, _, machine) in enumerate(lines)
    ]
    # Spans from three processes, one trace.
    assert len({s["pid"] for s in trip}) == 3
    assert len({s["context"]["trace_id"] for s in trip}) == 1
    # Each machine's spans come from one process: the one that ran its lines.
    pid_of = {s["attributes"]["machine"]: s["pid"] for s in trip}
    assert all(pid_of[s["attributes"]["machine"]] == s["pid"] for s in trip)
    # Nesting: a line's parent is the line before it in this call on this machine,
    # or the caller's line that handed the flow on; line 4, handed back to the
    # client, hangs under the client's line 0, whose call it returned from.
    span_id = [s["context"]["span_id"] for s in trip]
    assert [s["parent_id"] for s in trip] == [
        None,
        span_id[0],
        span_id[1],
        span_id[2],
        span_id[0],
    ]
    starts = [s["start_time"] for s in trip]
    assert starts == sorted(starts)
    assert all(s["status"]["status_code"] == "UNSET" for s in trip)

    failed = sorted(
        (s for s in spans if s["attributes"]["flow_id"] != flow_id),
        key=lambda s: s["attributes"]["line_index"],
    )
    assert [(s["attributes"]["line_index"], s["attributes"]["machine"]) for s in failed] == [
        (0, "client"),
        (1, "server"),
        (2, "server"),
    ]
    assert len({s["context"]["trace_id"] for s in failed} | {trip[0]["context"]["trace_id"]}) == 2
    charge = failed[2]
    # The card is secret, and "declined" was its value: scrubbed from the message too.
    assert charge["status"] == {"status_code": "ERROR", "description": "ValueError: card ***"}


UNTRACED_SERVICE = """
import sys

import structlog

import mesh

log = structlog.get_logger()


def otel():
    return sorted(name for name in sys.modules if name.startswith("opentelemetry"))


@mesh.handler("trip", "Booking trip for :traveller with #card")
def book(ctx):
    log.info("next", client_at_start=otel())


@mesh.handler("trip", "Charging card")
def charge(ctx):
    log.info("next", server=otel(), ticket="T-1")


@mesh.handler("trip", "Trip booked for :traveller")
def booked(ctx):
    log.info("next", client_at_end=otel())
"""


def test_nothing_of_opentelemetry_is_imported_unless_the_app_does(
    mesh_dir: MeshDir, peers: Peers
) -> None:
    """A flow across peers loads no OpenTelemetry module when the application uses none."""
    _trip_mesh(mesh_dir, UNTRACED_SERVICE)
    peers.start(mesh_dir, "tickets")
    peers.start(mesh_dir, "server")  # after tickets, which it dials
    done = run_mesh("call", "trip", "traveller=ada", "card=x", "-c", mesh_dir.config, "--json")
    assert done.returncode == 0, done.stderr
    context = json.loads(done.stdout)["context"]
    assert context["client_at_start"] == []
    assert context["server"] == []
    assert context["client_at_end"] == []


def test_collected_without_opentelemetry(tmp_path: Path) -> None:
    """Without OpenTelemetry installed this file still collects: the span test is skipped
    for want of the SDK, and the test that needs no OpenTelemetry still runs."""
    blocked = (
        "import sys; sys.modules['opentelemetry'] = None; import pytest;"  # as if not installed
        f" sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', {__file__!r},"
        " '-k', 'not without_opentelemetry']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed, 1 skipped" in done.stdout, done.stdout[-3000:]
    assert "needs the mesh[otel] extra" in done.stdout
