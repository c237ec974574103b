"""``make demo`` (scripts/demo.py): the example mesh end to end, and what makes it fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support.cli import mesh_env
from support.meshdir import MeshDir
from support.peers import Peers

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo.py"


def example_mesh(mesh_dir: MeshDir) -> MeshDir:
    """A copy of the repo's example mesh (examples/, services/) with ports of its own."""
    shutil.copytree(REPO / "examples", mesh_dir.root / "examples")
    shutil.copytree(
        REPO / "services", mesh_dir.root / "services", ignore=shutil.ignore_patterns("__pycache__")
    )
    mesh_dir.services = ["services.login", "services.feed", "services.index"]
    mesh_dir.write_config(
        {"client": False, "server": True, "emailservice": True},
        flow=["examples/flow.tsv", "examples/index.csv"],
    )
    return mesh_dir


def test_demo_fails_when_mesh_up_fails(mesh_dir: MeshDir, peers: Peers, tmp_path: Path) -> None:
    """Peers left from an earlier, interrupted demo still hold the mesh's ports: `mesh up`
    fails, and so does the demo, naming the taken port; it never prints "demo: ok". Before,
    the leftovers answered `mesh up`'s health probe and every call, and the demo said ok."""
    example_mesh(mesh_dir)
    old_data = {"MESH_DATA_DIR": str(tmp_path / "earlier-run")}
    peers.start(mesh_dir, "emailservice", env=old_data)
    peers.start(mesh_dir, "server", env=old_data)  # after emailservice, which it dials

    done = subprocess.run(
        [sys.executable, str(DEMO), "--config", str(mesh_dir.config)],
        capture_output=True,
        text=True,
        env=mesh_env(),
        timeout=120,
        check=False,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "demo: ok" not in done.stdout
    failures = [ln for ln in done.stderr.splitlines() if ln.startswith("demo: FAILED")]
    assert len(failures) == 1, done.stderr
    assert "in use" in failures[0]
    assert any(mesh_dir.addresses[m] in failures[0] for m in ("server", "emailservice"))
