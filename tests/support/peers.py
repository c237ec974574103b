"""``mesh peer`` processes: started, waited on until SERVING, stopped by process id."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from mesh.config import load_config
from mesh.peer import wait_serving as peer_serving
from mesh.transport import Transport
from support.cli import mesh_env
from support.meshdir import MeshDir

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class Peer:
    """One ``mesh peer`` process; its stdout and stderr go to ``log_path``."""

    def __init__(
        self,
        machine: str,
        config: Path,
        address: str,
        proc: subprocess.Popen[bytes],
        log: Path,
        *,
        probe: Transport | None = None,
    ) -> None:
        self.probe = probe  # how to reach its health service when it serves TLS
        self.machine = machine
        self.config = config
        self.address = address
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log
        #: The exit code stop() checks for: 0, a clean stop, unless the test says
        #: otherwise (None: any code, for a peer the test killed or made fail on purpose).
        self.expect_exit: int | None = 0

    def __repr__(self) -> str:
        return f"<Peer {self.machine} pid {self.pid} at {self.address}>"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The peer's JSON log events (other output lines are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code.

        The test fails when the peer is still running after ``timeout`` seconds (it is
        then killed) or exits with another code than :attr:`expect_exit`: a peer that
        hangs on stop, or crashes, is a defect even when every flow succeeded."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self!r} still running {timeout} s after SIGTERM:\n{self._tail()}")
        code = int(self.proc.wait())
        if self.expect_exit is not None and code != self.expect_exit:
            pytest.fail(f"{self!r} exited with {code}, not {self.expect_exit}:\n{self._tail()}")
        return code

    def _tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, on purpose: stop() then accepts any exit code."""
        self.expect_exit = None
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll the health service until it says SERVING; fail with the log if the peer dies."""
        wait_serving(self.address, self.proc, timeout, self.log_text, self.probe)


def wait_serving(
    address: str,
    proc: subprocess.Popen[Any],
    timeout: float,
    log: Any,
    probe: Transport | None = None,
) -> None:
    if peer_serving(address, timeout, lambda: proc.poll() is not None, probe):
        return
    if proc.poll() is not None:
        pytest.fail(f"peer at {address} exited with {proc.returncode}:\n{log()}")
    pytest.fail(f"peer at {address} not SERVING after {timeout} s:\n{log()}")


#: What ``mesh peer`` prints on stderr once it serves: the address it bound and its pid.
_LISTENING = re.compile(r"^mesh peer (\S+) listening on (\S+) \(pid (\d+)\)$", re.MULTILINE)


def bound_address(peer: Peer, timeout: float = READY_TIMEOUT) -> str:
    """The address ``peer`` reports it bound (``mesh peer`` prints it once it serves)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in _LISTENING.finditer(peer.log_text()) if m.group(1) == peer.machine]
        if found:
            return found[0].group(2)
        if not peer.alive():
            pytest.fail(f"{peer} exited with {peer.proc.returncode}:\n{peer.log_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{peer} did not say where it listens in {timeout} s:\n{peer.log_text()}")
        time.sleep(0.02)


class Peers:
    """Starts peers and remembers them, so the fixture stops every one."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Peer] = []

    def start(
        self,
        mesh_dir: MeshDir,
        machine: str,
        *,
        config: Path | None = None,
        wait: bool = True,
        env: Mapping[str, str] | None = None,
        replica: int | None = None,
        prefix: Sequence[str] = (),
        tls: bool = False,
        args: Sequence[str] = (),
    ) -> Peer:
        """Start ``mesh peer MACHINE`` (``--replica K`` for one replica of several);
        ``prefix`` runs it through another command, e.g. ``ip netns exec NS``; ``tls``:
        the peer serves TLS, so probe it with its own config's credentials; ``args``: more
        flags for ``mesh peer``.

        A machine whose port is not chosen yet (see :class:`MeshDir`) starts on
        ``127.0.0.1:0``; the port it reports binding goes into every config of
        ``mesh_dir`` before this returns, so a peer or client started next can dial it.
        """
        cfg = config or mesh_dir.config
        address = mesh_dir.addresses[machine]
        which: list[str] = []
        if replica is not None:
            address = mesh_dir.replicas[machine][replica - 1]
            which = ["--replica", str(replica)]
        choose_port = mesh_dir.waiting(address)
        if choose_port:
            if not wait:
                raise ValueError(
                    f"{machine} chooses its port as it starts, so it is waited for;"
                    f" mesh_dir.fix_ports({machine!r}) first to start it without waiting"
                )
            which = ["--listen", "127.0.0.1:0"]
        log = self.tmp_path / f"peer-{machine}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    *prefix,
                    *(sys.executable, "-m", "mesh", "peer", machine, *which, "-c", str(cfg)),
                    "--json",
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**mesh_env(), **(env or {})},
                cwd=self.tmp_path,
            )
        peer = Peer(machine, cfg, address, proc, log)
        self.started.append(peer)  # stopped at the end even if it never gets ready
        if choose_port:
            peer.address = bound_address(peer)
            mesh_dir.settle(address, peer.address)
        if tls:
            peer.probe = Transport.of(load_config(cfg), machine)
        if wait:
            peer.wait_ready()
        return peer

    def stop_all(self) -> None:
        """Stop every peer, then fail naming each that did not exit as expected, in time."""
        problems = []
        for peer in reversed(self.started):
            try:
                peer.stop()
            except pytest.fail.Exception as exc:
                problems.append(str(exc))
        if problems:
            pytest.fail("\n".join(problems))
