"""Tracing control flow: a fan-out's runs are sibling spans, a sub-flow's lines are children
of its row's span. In a subprocess, which sets up the OpenTelemetry SDK for itself."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

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

    root = Path(sys.argv[1])
    (root / "flow.tsv").write_text(
        "Request\\tLog\\tMachine\\tWhen\\tEach\\n"
        "t\\tStart :n\\tone\\n"
        "t\\tPer item\\tone\\t\\titems\\n"
        "t\\t@s\\tone\\n"
        "t\\tEnd\\tone\\n"
        "s\\tSub a\\tone\\n"
        "s\\tSub b\\tone\\n"
    )
    (root / "mesh.toml").write_text('flow = "flow.tsv"\\nservices = []\\n[machines]\\none = ""\\n')
    mesh.configure_logging(json=True, file=io.StringIO())
    node = mesh.connect(root / "mesh.toml", machine="one")
    node.start("t", n=1, items=[1, 2, 3])
    node.close()
    print(json.dumps([json.loads(s.to_json()) for s in exporter.get_finished_spans()]))
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.sdk") is None, reason="needs the otel extra"
)
def test_fan_out_runs_are_siblings_and_a_sub_flow_is_a_child(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    spans = json.loads(done.stdout)
    by_name: dict[str, list[dict]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    start = by_name["Start :n"][0]["context"]["span_id"]
    row = by_name["@s"][0]["context"]["span_id"]
    assert len(by_name["Per item"]) == 3
    assert {s["parent_id"] for s in by_name["Per item"]} == {start}  # siblings
    assert by_name["Sub a"][0]["parent_id"] == row  # the sub-flow nests under its row
    assert by_name["Sub b"][0]["parent_id"] == by_name["Sub a"][0]["context"]["span_id"]
    assert by_name["End"][0]["parent_id"] == row
    assert len({s["context"]["trace_id"] for s in spans}) == 1
