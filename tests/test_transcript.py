"""``mesh logs``: a real run's logs read back as one transcript per flow, and checked."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir, as_login_mesh, password_of
from support.peers import Peer, Peers

Events = list[dict[str, Any]]


@dataclass(frozen=True)
class RealRun:
    config: Path
    client_log: Path
    server: Peer
    ids: list[str]


def _call(mesh_dir: MeshDir, log: Path, password: str) -> str:
    # The service module is imported by `mesh call` from the config's folder.
    """Run login as the client, logging JSON to ``log``; the flow id (or "" if it failed)."""
    done = run_mesh(
        "call", "login", "username=ada", f"password={password}",
        "-c", mesh_dir.config, "--json", "--log-file", log,
    )  # fmt: skip
    if done.returncode:
        return ""
    return str(json.loads(done.stdout)["flow_id"])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealRun]:
    """Two good logins and a bad one against a real server (once for this module)."""
    tmp_path = tmp_path_factory.mktemp("real_run")
    mesh_dir = as_login_mesh(MeshDir(tmp_path / "meshdir", "transcript"))
    started = Peers(tmp_path)
    try:
        server = started.start(mesh_dir, "server")
        client_log = tmp_path / "client.log"
        ids = [_call(mesh_dir, client_log, password_of("ada")) for _ in range(2)]
        assert all(ids)
        assert _call(mesh_dir, client_log, "wrong-password") == ""
        started.stop_all()  # its log is complete once it has stopped
        yield RealRun(mesh_dir.config, client_log, server, ids)
    finally:
        started.stop_all()
        mesh_dir.close()


def _lines(path: Path) -> Events:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, events: Events) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return path


def test_real_run_reads_back_in_flow_order(real_run: RealRun) -> None:
    """Both machines' files merge into one transcript per flow; a failed flow is reported."""
    client_log, server, ids = real_run.client_log, real_run.server, real_run.ids
    first = run_mesh("logs", client_log, server.log_path, "-c", real_run.config, "--flow", ids[0])
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout.splitlines()
    assert out[0] == f"login  flow {ids[0]}  6 of 6 lines  ok"
    table = [re.split(r"\s{2,}", row.strip()) for row in out[2:]]
    steps = [(cells[0], cells[2]) for cells in table]
    assert steps == [
        ("0", "client"),
        ("1", "server"),
        ("2", "server"),
        ("3", "server"),
        ("4", "server"),
        ("5", "client"),
    ]
    assert "User attempted login as ada and ***" in out[2]
    assert password_of("ada") not in first.stdout
    # Every step but the last has a duration, in ms.
    assert all(re.search(r"\d+\.\d{3}$", row) for row in out[2:7])

    every = run_mesh("logs", client_log, server.log_path, "-c", real_run.config)
    assert every.returncode == 1
    assert every.stdout.count("6 of 6 lines  ok") == 2
    assert "login line 2" not in every.stdout
    assert (
        "line 2 'Testing password for :username' failed on server:"
        " PermissionError: invalid credentials"
    ) in every.stdout
    assert "line 3 'Setting session for :username' on server is missing (not reached:" in (
        every.stdout
    )
    assert every.stdout.rstrip().endswith("3 flows, 1 with problems")
    # The flows come out in the order they ran.
    assert every.stdout.index(ids[0]) < every.stdout.index(ids[1])


def _one_flow(real_run: RealRun) -> Events:
    every = _lines(real_run.client_log) + real_run.server.events()
    events = [e for e in every if e.get("flow_id") == real_run.ids[0]]
    return sorted(events, key=lambda e: e["timestamp"])


def _flow_line(events: Events, index: int) -> dict[str, Any]:
    own = [e for e in events if e["line_index"] == index and e["event"] != "checking password"]
    return own[0]


def _drop_line_3(events: Events) -> Events:
    return [e for e in events if e is not _flow_line(events, 3)]


def _line_2_on_client(events: Events) -> Events:
    _flow_line(events, 2)["machine"] = "client"
    return events


def _line_4_twice(events: Events) -> Events:
    again = dict(_flow_line(events, 4))
    again["timestamp"] = _flow_line(events, 5)["timestamp"]
    return [*events, again]


def _lines_2_and_3_swapped(events: Events) -> Events:
    two, three = _flow_line(events, 2), _flow_line(events, 3)
    two["timestamp"], three["timestamp"] = three["timestamp"], two["timestamp"]
    return events


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (_drop_line_3, "line 3 'Setting session for :username' on server is missing"),
        (
            _line_2_on_client,
            "line 2 'Testing password for :username' ran on client; the flow file says server",
        ),
        (_line_4_twice, "line 4 'Finish handling user login' ran twice (first at"),
        (
            _lines_2_and_3_swapped,
            "line 2 'Testing password for :username' ran after line 3"
            " 'Setting session for :username'; the flow file has it before",
        ),
    ],
    ids=["missing", "wrong-machine", "twice", "out-of-order"],
)
def test_tampered_logs_are_reported(
    real_run: RealRun, tmp_path: Path, tamper: Callable[[Events], Events], problem: str
) -> None:
    """A missing, misplaced, repeated or reordered line is named, and mesh logs exits 1."""
    tampered = _write(tmp_path / "tampered.jsonl", tamper(_one_flow(real_run)))
    done = run_mesh("logs", tampered, "-c", real_run.config)
    assert done.returncode == 1
    problems = [line for line in done.stdout.splitlines() if "problem:" in line]
    assert len(problems) == 1, done.stdout
    assert problem in problems[0]


def test_one_flow_in_one_file_reads_back_clean(real_run: RealRun, tmp_path: Path) -> None:
    """The untouched events of one flow, in one file, pass (the baseline of the tampering)."""
    untouched = _write(tmp_path / "flow.jsonl", _one_flow(real_run))
    clean = run_mesh("logs", untouched, "-c", real_run.config)
    assert clean.returncode == 0, clean.stdout
    assert clean.stdout.startswith(f"login  flow {real_run.ids[0]}  6 of 6 lines  ok\n")


def test_prefixed_lines_and_other_output_are_read(real_run: RealRun, tmp_path: Path) -> None:
    """JSON after a "machine | " prefix (a relay's output) is read; other lines are skipped."""
    relayed = tmp_path / "relayed.log"
    lines = [f"{e['machine']:<6} | {json.dumps(e)}" for e in _one_flow(real_run)]
    relayed.write_text("\n".join(["starting up", *lines, "bye"]) + "\n", encoding="utf-8")
    done = run_mesh("logs", relayed, "-c", real_run.config)
    assert done.returncode == 0, done.stdout
    assert f"login  flow {real_run.ids[0]}  6 of 6 lines  ok" in done.stdout


def test_a_machine_whose_log_is_missing_is_named(real_run: RealRun) -> None:
    """Given the server's log alone, the client's lines are missing, and the hint says why."""
    server, ids = real_run.server, real_run.ids
    done = run_mesh("logs", server.log_path, "-c", real_run.config, "--flow", ids[0][:8])
    assert done.returncode == 1
    assert (
        "line 0 'User attempted login as :username and #password' on client is missing"
        " (no log of client was read: is its file among those given?)"
    ) in done.stdout


def test_bad_input_is_one_line(real_run: RealRun, tmp_path: Path) -> None:
    """A missing file, or files with no flow lines, are one line and exit 1."""
    missing = run_mesh("logs", tmp_path / "nope.log", "-c", real_run.config)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"mesh logs: {tmp_path / 'nope.log'}: no such log file"
    ]
    empty = tmp_path / "empty.log"
    empty.write_text("not json\n{}\n", encoding="utf-8")
    none = run_mesh("logs", empty, "-c", real_run.config, "--flow", "abc")
    assert none.returncode == 1
    assert none.stderr.strip().splitlines() == [f"mesh logs: no flow abc in {empty}"]


def _shifted(events: Events, seconds: float) -> Events:
    """``events`` as a machine whose clock is ``seconds`` ahead (negative: behind) logs them."""
    out = []
    for event in events:
        stamp = datetime.fromisoformat(event["timestamp"]) + timedelta(seconds=seconds)
        out.append({**event, "timestamp": stamp.isoformat()})
    return out


@pytest.mark.parametrize(
    ("server_clock", "behind", "ahead"),
    [(-0.2, "server", "client"), (0.2, "client", "server")],
    ids=["server-behind", "server-ahead"],
)
def test_clock_skew_is_a_note_not_a_problem(
    real_run: RealRun, tmp_path: Path, server_clock: float, behind: str, ahead: str
) -> None:
    """The real run's logs, the server's stamped by a clock 200 ms off the client's (two
    machines whose clocks differ): the transcript is still in flow order and ok, exit 0, with a
    note naming the clock that is behind. Before, sorting by wall clock reported lines that
    "ran after" the lines they follow, and mesh logs exited 1."""
    server = _write(tmp_path / "server.log", _shifted(real_run.server.events(), server_clock))
    done = run_mesh(
        "logs", real_run.client_log, server, "-c", real_run.config, "--flow", real_run.ids[0]
    )
    assert done.returncode == 0, done.stdout
    out = done.stdout.splitlines()
    assert out[0] == f"login  flow {real_run.ids[0]}  6 of 6 lines  ok"
    assert [re.split(r"\s{2,}", row.strip())[0] for row in out[2:8]] == list("012345")
    notes = [line.strip() for line in out if line.strip().startswith("note:")]
    assert len(notes) == 1, done.stdout
    found = re.fullmatch(
        rf"note: clock skew: {behind}'s clock is at least ([\d.]+) ms behind {ahead}'s \(line .*",
        notes[0],
    )
    assert found, notes[0]
    assert 150 < float(found.group(1)) <= 200
    assert "problem" not in done.stdout
