"""The package as a user gets it: built into an sdist and a wheel, checked as the package
index checks them, installed into a fresh virtual environment outside the repository, and
run from there: ``mesh --version``, ``mesh init``, ``mesh check``, ``mesh up`` and a flow.

A module or data file missing from the wheel passes every other test (they run from the
source tree) and fails here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.meshdir import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MESH_CONFIG")}
    done = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_wheel_installs_and_runs_a_flow(tmp_path: Path, up) -> None:
    """Build, twine check, install the wheel into a new venv, and run a project made by
    `mesh init` with the installed `mesh` alone, from a folder outside the repository."""
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("structlog_mesh-*-py3-none-any.whl")
    (sdist,) = dist.glob("structlog_mesh-*.tar.gz")
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist, cwd=tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mesh/py.typed", "mesh/v1/mesh_pb2.pyi", "mesh/tools/init.py"} <= names
    assert {"mesh/ui/static/mesh-ui.css", "mesh/ui/static/mesh-ui.js"} <= names  # mesh ui
    assert not any(n.startswith(("tests/", "services/", "scripts/")) for n in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)
    where = run(venv / "bin" / "python", "-c", "import mesh; print(mesh.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    mesh = venv / "bin" / "mesh"
    version = run(mesh, "--version", cwd=tmp_path).stdout.strip()
    assert version == f"mesh {wheel.name.split('-')[1]} (structlog-mesh)"

    run(mesh, "init", "shop", cwd=tmp_path)
    shop = tmp_path / "shop"
    config = shop / "mesh.toml"
    text = config.read_text(encoding="utf-8")
    for port in ("7401", "7402"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    config.write_text(text, encoding="utf-8")
    assert "ok: 1 requests" in run(mesh, "check", cwd=shop).stdout

    running = up(config, mesh=[str(mesh)])
    running.wait_healthy(2)
    call = run(
        mesh, "call", "order", "item=cake", "qty=3", "customer=ada", "card=4242424242424242",
        "--json", cwd=shop,
    )  # fmt: skip
    out = json.loads(call.stdout)
    assert out["context"]["total"] == 12.75
    assert [s["machine"] for s in out["steps"]] == ["client", "stock", "billing", "client"]
    os.kill(running.pid, signal.SIGTERM)
    assert running.proc.wait(30) == 0
