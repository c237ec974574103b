"""Colour in the mesh's own tables and errors on a terminal, plain text anywhere else;
NO_COLOR turns it off, FORCE_COLOR on (tests have no terminal: both are forced here, and a
real pseudo-terminal stands in for a user's)."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import mesh_env, run_mesh
from support.meshdir import MeshDir

from mesh import colour

ESC = "\x1b["


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("env", "tty", "expected"),
    [
        ({}, False, False),
        ({}, True, True),
        ({"TERM": "dumb"}, True, False),
        ({"NO_COLOR": "1"}, True, False),
        ({"NO_COLOR": ""}, True, True),  # empty means unset, per no-color.org
        ({"FORCE_COLOR": "1"}, False, True),
        ({"FORCE_COLOR": "0"}, False, False),
        ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False, False),
    ],
)
def test_when_colour_is_on(env: dict[str, str], tty: bool, expected: bool) -> None:
    """A terminal gets colour; NO_COLOR wins over FORCE_COLOR; a pipe only when forced."""
    stream = FakeTTY() if tty else io.StringIO()
    assert colour.enabled(stream, env) is expected
    painted = colour.Palette(expected).red("error:")
    assert painted == ("\x1b[31merror:\x1b[0m" if expected else "error:")


def run_check(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {"NO_COLOR": "", "FORCE_COLOR": "", **env}
    return run_mesh("check", "-c", config, env=clean)


def test_check_is_plain_in_a_pipe_and_coloured_when_forced(login_mesh: MeshDir) -> None:
    """`mesh check` piped: no escape codes; with FORCE_COLOR: a bold heading and a green ok;
    with NO_COLOR as well: plain again, and the same text once the codes are removed."""
    plain = run_check(login_mesh.config)
    assert plain.returncode == 0, plain.stderr
    assert ESC not in plain.stdout + plain.stderr

    forced = run_check(login_mesh.config, FORCE_COLOR="1")
    assert forced.returncode == 0, forced.stderr
    assert "\x1b[1m#  line" in forced.stdout
    assert "\x1b[32mok:\x1b[0m 2 requests" in forced.stdout
    assert _strip(forced.stdout) == plain.stdout

    both = run_check(login_mesh.config, FORCE_COLOR="1", NO_COLOR="1")
    assert both.stdout == plain.stdout


def test_an_error_is_red_when_forced(tmp_path: Path) -> None:
    """The one-line error of a command: its `mesh check:` prefix bold red when forced."""
    missing = tmp_path / "nope.toml"
    forced = run_mesh("check", "-c", missing, env={"FORCE_COLOR": "1", "NO_COLOR": ""})
    assert forced.returncode == 1
    assert forced.stderr.startswith("\x1b[1;31mmesh check:\x1b[0m ")
    plain = run_mesh("check", "-c", missing, env={"FORCE_COLOR": "", "NO_COLOR": ""})
    assert plain.stderr.startswith("mesh check: ")
    assert _strip(forced.stderr) == plain.stderr


def test_a_real_terminal_gets_colour_unless_no_color(login_mesh: MeshDir) -> None:
    """On a pseudo-terminal, as in a user's shell, `mesh check` is coloured by itself;
    NO_COLOR=1 makes it plain."""
    assert ESC in _on_a_terminal(login_mesh.config, {})
    assert ESC not in _on_a_terminal(login_mesh.config, {"NO_COLOR": "1"})


def _on_a_terminal(config: Path, env: dict[str, str]) -> str:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "check", "-c", str(config)],
            stdout=follower,
            stderr=follower,
            stdin=subprocess.DEVNULL,
            env={**mesh_env(), "NO_COLOR": "", "FORCE_COLOR": "", "TERM": "xterm", **env},
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(60) == 0
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


def _strip(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
