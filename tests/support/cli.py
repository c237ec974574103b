"""Running ``mesh`` as a user would: a subprocess with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def mesh_env() -> dict[str, str]:
    """The environment a ``mesh`` subprocess gets: unbuffered output, and no
    ``$MESH_CONFIG`` from the shell that runs the tests."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MESH_CONFIG", None)
    return env


def run_mesh(
    *args: str | Path,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``mesh ARGS`` as a user would (a subprocess), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**mesh_env(), **(env or {})},
        cwd=cwd,
        check=False,
    )


def ruff_as_a_user(tmp_path: Path) -> Path:
    """A ruff config with this project's lint rules, in a folder that has no ``mesh``.

    Generated code is checked as it would be in a user's project, where ``mesh``
    is an installed (third-party) package rather than one of the project's own.
    """
    import tomllib

    project = tomllib.loads(
        (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    )
    lint = project["tool"]["ruff"]["lint"]
    lines = [
        f"line-length = {project['tool']['ruff']['line-length']}",
        'target-version = "py311"',
        "[lint]",
        f"select = {json.dumps(lint['select'])}",
        f"ignore = {json.dumps(lint['ignore'])}",
    ]
    path = tmp_path / "ruff.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
