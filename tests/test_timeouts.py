"""Timeouts a careless user may give: huge, infinite, zero, negative, NaN.

A huge finite timeout is capped at what gRPC can carry (``mesh.deadlines.MAX_SECONDS``),
so the flow runs; zero, negatives and non-finite values are refused at once with one
line naming the value, in the API, in ``mesh call`` and in ``mesh.toml``. Against one
real ``server`` peer shared by the module.
"""

from __future__ import annotations

import json

import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir, password_of
from support.peers import Peer

from mesh.config import load_config
from mesh.deadlines import MAX_SECONDS

PASSWORD = password_of("ada")
BAD = [0, -1, float("nan"), float("inf"), float("-inf"), True, "5"]


@pytest.mark.parametrize("timeout", [1e12, 1e9, 10**15, MAX_SECONDS * 2])
def test_a_huge_timeout_runs_the_flow(
    login_server: tuple[MeshDir, Peer], connect, timeout: float
) -> None:
    """node.start(timeout=1e12) against a healthy peer: before, gRPC's deadline overflowed
    and the flow failed at once with FlowTimeout; now the timeout is capped and it runs."""
    mesh_dir, _ = login_server
    node = connect(mesh_dir.config, "client")

    result = node.start("login", username="ada", password=PASSWORD, timeout=timeout)

    assert result.context["session"] == "session-ada"


@pytest.mark.parametrize("timeout", BAD, ids=repr)
def test_a_bad_timeout_is_refused_in_one_line(
    login_server: tuple[MeshDir, Peer], connect, timeout: object
) -> None:
    """node.start(timeout=inf/0/-1/nan/True/"5"): a ValueError naming the value, before any
    line runs (inf used to fail as FlowTimeout, "5" as a TypeError about '>')."""
    mesh_dir, _ = login_server
    node = connect(mesh_dir.config, "client")

    with pytest.raises(ValueError) as info:
        node.start("login", username="ada", password=PASSWORD, timeout=timeout)

    message = str(info.value)
    assert "\n" not in message
    assert message == f"timeout must be a positive number of seconds, not {timeout!r}"


def call(mesh_dir: MeshDir, timeout: str) -> tuple[int, str, str]:
    done = run_mesh(
        "call",
        "login",
        "username=ada",
        f"password={PASSWORD}",
        "--json",
        "--timeout",
        timeout,
        "-c",
        mesh_dir.config,
    )
    return done.returncode, done.stdout, done.stderr


def test_mesh_call_with_a_huge_timeout_runs(login_server: tuple[MeshDir, Peer]) -> None:
    """mesh call --timeout 1e12: before, FlowTimeout at once; now the flow runs."""
    code, out, err = call(login_server[0], "1e12")

    assert code == 0, err
    assert json.loads(out)["context"]["session"] == "session-ada"


@pytest.mark.parametrize("timeout", ["inf", "0", "-1", "nan"])
def test_mesh_call_refuses_a_bad_timeout_in_one_line(
    login_server: tuple[MeshDir, Peer], timeout: str
) -> None:
    """mesh call --timeout 0/-1/nan printed a Python traceback, --timeout inf a FlowTimeout;
    now each is one line naming --timeout and the value, exit 1, and nothing runs."""
    code, out, err = call(login_server[0], timeout)

    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"mesh call: --timeout must be a positive number of seconds, not {timeout}"
    )
    assert "User attempted login" not in err


def test_a_huge_timeout_in_mesh_toml_is_capped(login_server: tuple[MeshDir, Peer], connect) -> None:
    """timeout = 1e12 in mesh.toml: before, every flow with the default timeout failed at
    once with FlowTimeout; now it is capped at MAX_SECONDS, and flows run."""
    mesh_dir, _ = login_server
    text = mesh_dir.config.read_text(encoding="utf-8")
    path = mesh_dir.root / "huge.toml"
    path.write_text("timeout = 1e12\ngrace = 1e12\n" + text, encoding="utf-8")
    assert load_config(path).timeout == MAX_SECONDS
    assert load_config(path).grace == MAX_SECONDS
    node = connect(path, "client")

    result = node.start("login", username="ada", password=PASSWORD)

    assert result.context["session"] == "session-ada"
