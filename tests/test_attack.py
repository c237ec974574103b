"""scripts/attack.py: every attack it tries against real peers is refused or contained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.cli import mesh_env

SCRIPT = Path(__file__).parent.parent / "scripts" / "attack.py"


def test_every_attack_is_refused_or_contained() -> None:
    """The script starts a server peer and a hostile peer, tries replayed flow ids, forged
    hand-backs, oversized contexts, values JSON cannot carry and call chains no flow makes,
    and prints one line per attempt: each says refused or contained, with the status or
    error it got (before the fixes: a replay printed ada's reply, a forged hand-back looped
    or finished with lines never run, and the script exits 1 on any of them)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        env=mesh_env(),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    attempts = [line for line in lines if " ... " in line]
    assert len(attempts) >= 17, done.stdout
    for line in attempts:
        assert " ... refused: " in line or " ... contained: " in line, line
    outcome = {line.split(" ... ")[0]: line.split(" ... ")[1] for line in attempts}
    replay = outcome["replay flow id of another request (ping line 0 with vault's flow id)"]
    assert replay.startswith("refused: ALREADY_EXISTS")
    assert "gold-of-ada" not in done.stdout
    assert outcome["forged reply from evil: hand-back to line 0"].startswith(
        "refused: PeerRefused (evil at"
    )
    assert outcome["a via naming the receiving peer itself"].startswith("refused: INVALID_ARGUMENT")
    assert lines[-1].startswith("attack: 0 of the attempts got through")
