"""``mesh.configure_logging(file=…)`` takes a path or an open file, and flows log there."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import structlog
from support.meshdir import MeshDir

import mesh

SOLO_FLOW = (
    "Request\tLog\tMachine\nsolo\tAsked by :who\tclient\nsolo\tAnswered for :who — ✓\tclient\n"
)


@pytest.fixture
def solo_mesh(mesh_dir: MeshDir) -> MeshDir:
    """One flow whose lines all run on ``client``, in this process."""
    mesh_dir.flow(SOLO_FLOW)
    mesh_dir.write_config({"client": False})
    return mesh_dir


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "PathLike"])
def test_a_path_is_opened_for_append_in_utf8(
    solo_mesh: MeshDir, connect, tmp_path: Path, as_type: type
) -> None:
    """configure_logging(file="client.log"): before, it was accepted and the first log line
    failed with AttributeError: 'str' object has no attribute 'write'. Now the file is
    opened for append (what was there stays), in UTF-8, and the flow's lines land in it."""
    path = tmp_path / "client.log"
    path.write_text('{"event": "from an earlier run"}\n', encoding="utf-8")
    mesh.configure_logging(json=True, file=as_type(path))
    node = connect(solo_mesh.config, "client")

    result = node.start("solo", who="zoë")

    logged = events(path)
    assert logged[0] == {"event": "from an earlier run"}
    lines = [(e["event"], e["flow_id"]) for e in logged[1:]]
    assert lines == [("Asked by zoë", result.flow_id), ("Answered for zoë — ✓", result.flow_id)]


def test_an_open_file_is_written_as_before(solo_mesh: MeshDir, connect) -> None:
    """An open text file (or any object with write) still works, left open for its owner."""
    sink = io.StringIO()
    mesh.configure_logging(json=True, file=sink)
    node = connect(solo_mesh.config, "client")

    node.start("solo", who="ada")

    assert [json.loads(line)["event"] for line in sink.getvalue().splitlines()] == [
        "Asked by ada",
        "Answered for ada — ✓",
    ]
    assert not sink.closed


def test_a_path_that_cannot_be_opened_is_a_one_line_error(tmp_path: Path) -> None:
    """A log file in a folder that does not exist: refused when configured, naming it,
    not at the first log line."""
    path = tmp_path / "missing" / "client.log"

    with pytest.raises(OSError) as info:
        mesh.configure_logging(file=path)

    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not structlog.is_configured()
