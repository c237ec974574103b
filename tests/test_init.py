"""``mesh init``: from an empty folder to a flow over three machines, as a new user goes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support.cli import ruff_as_a_user, run_mesh
from support.meshdir import free_port

from mesh.tools.init import FILES

RUFF = Path(sys.executable).parent / "ruff"
CARD = "4242424242424242"


def use_free_ports(config: Path) -> None:
    """Give stock and billing ports nothing listens on (as a user would edit them), so the
    test runs beside anything else on this machine."""
    text = config.read_text(encoding="utf-8")
    for port in ("7401", "7402"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    config.write_text(text, encoding="utf-8")


def test_init_writes_a_project_that_runs(tmp_path: Path, up) -> None:
    """`mesh init shop`, then the README's commands: `mesh check` is ok, `mesh up` serves
    stock and billing, `mesh call order …` runs the flow over the three machines with the
    card masked, and `mesh logs` reports it ok. The handlers pass this project's lint."""
    done = run_mesh("init", "shop", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shop = tmp_path / "shop"
    assert sorted(p.name for p in shop.iterdir()) == sorted(FILES)
    assert done.stdout.splitlines()[-1].startswith("next: cd shop && mesh check && mesh up")
    ruff_config = ruff_as_a_user(tmp_path)
    for check in ("check", "format --check"):
        lint = subprocess.run(
            [RUFF, *check.split(), "--config", ruff_config, "handlers.py"],
            capture_output=True, text=True, cwd=shop, check=False,
        )  # fmt: skip
        assert lint.returncode == 0, lint.stdout

    use_free_ports(shop / "mesh.toml")
    check = run_mesh("check", cwd=shop)
    assert check.returncode == 0, check.stderr
    assert "ok: 1 requests, 3 machines, 3 handlers" in check.stdout

    running = up(shop / "mesh.toml", "--log-dir", str(shop / "logs"))
    running.wait_healthy(2)
    call = run_mesh(
        "call", "order", "item=tea", "qty=2", "customer=ada", f"card={CARD}",
        "--log-file", "logs/client.log", "--json", cwd=shop,
    )  # fmt: skip
    assert call.returncode == 0, call.stderr
    out = json.loads(call.stdout)
    assert out["context"]["card"] == "***"
    assert (out["context"]["qty"], out["context"]["total"]) == (2, 7.0)
    assert [s["machine"] for s in out["steps"]] == ["client", "stock", "billing", "client"]
    assert out["steps"][2]["line"] == "Charging ada for 2 tea with card ***"

    refused = run_mesh("call", "order", "item=cake", "qty=99", "customer=ada", "card=x", cwd=shop)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        'mesh call: order line 1 "Reserving :qty :item" failed on stock:'
        " LookupError: only 12 cake left"
    )
    os.kill(running.pid, signal.SIGTERM)
    assert running.proc.wait(30) == 0

    logs = run_mesh(
        "logs", *sorted((shop / "logs").glob("*.log")), "--flow", out["flow_id"], cwd=shop
    )
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert re.search(rf"order  flow {out['flow_id']}  4 of 4 lines  ok", logs.stdout)
    assert CARD not in "".join(p.read_text() for p in (shop / "logs").glob("*.log"))


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    """A second `mesh init` refuses in one line naming the first file that exists, and
    writes nothing; `--force` writes every file afresh."""
    assert run_mesh("init", cwd=tmp_path).returncode == 0
    (tmp_path / "handlers.py").write_text("# mine\n", encoding="utf-8")
    (tmp_path / "README.md").unlink()

    again = run_mesh("init", cwd=tmp_path)

    assert again.returncode == 1
    assert again.stderr == "mesh init: mesh.toml exists; --force overwrites it\n"
    assert (tmp_path / "handlers.py").read_text(encoding="utf-8") == "# mine\n"
    assert not (tmp_path / "README.md").exists()
    forced = run_mesh("init", ".", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines()[-1].startswith("next: mesh check && mesh up")
    assert (tmp_path / "handlers.py").read_text(encoding="utf-8") == FILES["handlers.py"]


def test_init_into_a_file_is_one_line(tmp_path: Path) -> None:
    """A DIR that is a file is refused, naming it."""
    (tmp_path / "taken").write_text("", encoding="utf-8")
    done = run_mesh("init", "taken", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, "mesh init: taken is a file, not a folder\n")
