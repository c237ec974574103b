"""``mesh up``: a peer process for every machine (every replica) with an address.

Starts ``mesh peer`` children, prefixes their output with their machine, waits until
each says it bound its port (``mesh peer MACHINE listening on HOST:PORT (pid N)``, with
the child's own pid) and then reports SERVING on gRPC health, watches them until Ctrl-C
or SIGTERM, and stops every one it started (SIGTERM, the config's grace, then SIGKILL).
On Linux a child also dies with its parent, so a ``mesh up`` killed outright leaves no
peer behind.

Health alone proves nothing about *whose* peer answers: a port still held by a peer
left from an earlier run answers the probe while the new child fails to bind it. So a
child counts as started only once it has said it listens, and one that exits first
fails ``mesh up`` at once, with the child's own reason (the taken address).

With a log folder (``mesh up --log-dir DIR``) the peers log JSON: each event is appended to
``DIR/MACHINE.log`` (``MACHINE.K.log`` for replica K), ready for ``mesh logs``, and shown
on the console as the peer itself would have shown it.
"""

from __future__ import annotations

import ctypes
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from mesh import colour
from mesh.addresses import dialable
from mesh.config import Config
from mesh.errors import MeshError
from mesh.peer import wait_serving
from mesh.transport import Transport

__all__ = ["run", "stop_event"]

#: How long a peer may take to become healthy before ``mesh up`` gives up on it.
HEALTHY_WITHIN = 30.0

#: What ``mesh peer`` prints on stderr once it has bound its port (a stable format).
LISTENING = re.compile(r"^mesh peer (\S+) listening on (\S+) \(pid (\d+)\)$")


@dataclass(eq=False)
class Child:
    """One ``mesh peer`` process and what its output has said so far."""

    label: str  # MACHINE, or MACHINE.K for a replica
    proc: subprocess.Popen[bytes]
    bound: str = ""  # the address it said it listens on, once it has
    listening: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)  # its output ended
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    log: IO[str] | None = None  # its JSON log file (mesh up --log-dir)

    def failure(self) -> MeshError:
        """Why it exited before it listened: its own error line, said once, in one line."""
        self.closed.wait(2.0)  # the relay reads its last lines
        lines = list(self.tail) or [""]
        said = [ln for ln in lines if ln.startswith("mesh peer: ")]
        reason = said[-1].removeprefix("mesh peer: ") if said else lines[-1]
        code = self.proc.returncode
        message = f"peer {self.label} exited with code {code} before it listened"
        if reason:
            message += f": {reason}"
        if "address in use" in reason:
            message += " (another process holds that port: a peer left from an earlier run?)"
        return MeshError(message)


def stop_event() -> threading.Event:
    """An event SIGTERM and SIGINT set: set up first, so an early signal is not lost."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def run(path: Path, config: Config, stop: threading.Event, log_dir: Path | None = None) -> int:
    """Start, watch and stop the peers of ``config`` (loaded from ``path``) until ``stop``;
    with ``log_dir``, keep each peer's JSON log there too."""
    # One peer per replica: (label, machine, replica or None, the address to check health at).
    peers = [
        (
            f"{m.name}.{k}" if len(m.binds) > 1 else m.name,
            m.name,
            k if len(m.binds) > 1 else None,
            dialable(bind) if len(m.binds) > 1 else m.address,
            bind,
        )
        for m in config.machines.values()
        if m.address
        for k, bind in enumerate(m.binds, 1)
    ]
    if not peers:
        raise MeshError(f"{path}: no machine has an address, so there is no peer to start")
    width = max(len(p[0]) for p in peers)
    logs = _open_logs(log_dir, [p[0] for p in peers]) if log_dir is not None else {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    children: dict[str, Child] = {}
    relays: list[threading.Thread] = []
    try:
        for label, name, replica, _, _ in peers:
            which = ["--replica", str(replica)] if replica is not None else []
            which += ["--json"] if logs else []
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "peer", name, *which, "-c", str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `mesh up` alone; it stops the peers
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - async-signal-safe, see there
            )
            procs[label] = proc
            children[label] = child = Child(label, proc, log=logs.get(label))
            relay = threading.Thread(
                target=_relay, args=(f"{label:<{width}} | ", child), daemon=True
            )
            relay.start()
            relays.append(relay)
        _wait_listening(list(children.values()), stop, time.monotonic() + HEALTHY_WITHIN)
        for label, name, _, health_at, _ in peers:
            probe = Transport.of(config, name)  # a TLS peer is probed with its own certificate
            _wait_healthy(
                label,
                health_at,
                procs[label],
                stop,
                deadline=time.monotonic() + HEALTHY_WITHIN,
                probe=probe,
            )
            _say(f"mesh up: {label} listening on {children[label].bound} (pid {procs[label].pid})")
        _say(f"mesh up: {len(peers)} peers healthy; Ctrl-C stops them")
        alive = set(procs)
        while alive and not stop.wait(0.2):
            for name in sorted(alive):
                code = procs[name].poll()
                if code is not None:
                    alive.discard(name)
                    _say(f"mesh up: peer {name} (pid {procs[name].pid}) exited with code {code}")
        if not alive:
            raise MeshError("every peer has exited")
        _say("mesh up: stopping")
        return 0
    finally:
        _stop_all(procs, config.grace)
        for relay in relays:  # a stopped peer's last lines, into its log before it is closed
            relay.join(5)
        for file in logs.values():
            file.close()


_print_lock = threading.Lock()


def _say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _open_logs(folder: Path, labels: list[str]) -> dict[str, IO[str]]:
    """``FOLDER/LABEL.log`` for each peer, opened for append (made with its folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return {label: open(folder / f"{label}.log", "a", encoding="utf-8") for label in labels}
    except OSError as exc:
        raise MeshError(f"--log-dir {folder}: {exc.strerror or exc}") from None


def _relay(prefix: str, child: Child) -> None:
    """Copy a peer's output to ours line by line, each line prefixed with its machine;
    note the line that says it listens (with its own pid: no other process's word).

    With a log file the peer writes JSON: each event goes to the file as it came and to
    the console rendered as a peer on a console renders it; other lines (the peer's own
    messages on stderr, anything a handler prints) are shown as they are.
    """
    proc = child.proc
    assert proc.stdout is not None
    render = structlog.dev.ConsoleRenderer(colors=colour.enabled(sys.stdout))
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if child.log is not None and line.startswith("{"):
                line = _logged(line, child.log, render)
            for part in line.split("\n"):  # a traceback: every line marked with its peer
                _say(prefix + part)
            child.tail.append(line)
            if not child.listening.is_set():
                said = LISTENING.match(line)
                if said and int(said.group(3)) == proc.pid:
                    child.bound = said.group(2)
                    child.listening.set()
    finally:
        child.closed.set()


def _logged(line: str, log: IO[str], render: Any) -> str:
    """Append a JSON event to ``log``; return it as the console shows it."""
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict):
        return line
    log.write(line + "\n")
    log.flush()
    return str(render(None, str(event.get("level", "info")), event)).rstrip("\n")


def _wait_listening(children: list[Child], stop: threading.Event, deadline: float) -> None:
    """Until every child has said it listens; the first to exit before that fails it all."""
    waiting = list(children)
    while waiting:
        for child in list(waiting):
            if child.listening.is_set():
                waiting.remove(child)
            elif child.proc.poll() is not None:
                raise child.failure()
        if not waiting:
            return
        if stop.is_set():
            raise MeshError("stopped before every peer was listening")
        if time.monotonic() > deadline:
            names = ", ".join(c.label for c in waiting)
            raise MeshError(f"peer {names} did not start listening within {HEALTHY_WITHIN:.0f} s")
        stop.wait(0.05)


def _die_with_parent() -> None:
    """Linux: have the kernel stop a peer whose `mesh up` died without stopping it.

    Runs in the child between fork and exec, so it only calls a function pointer
    resolved beforehand in the parent: no imports, no locks.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


def _wait_healthy(
    name: str,
    address: str,
    proc: subprocess.Popen[bytes],
    stop: threading.Event,
    deadline: float,
    *,
    probe: Transport,
) -> None:
    timeout = deadline - time.monotonic()
    if wait_serving(address, timeout, lambda: proc.poll() is not None or stop.is_set(), probe):
        return
    if proc.poll() is not None:
        raise MeshError(f"peer {name} exited with code {proc.returncode} before it was healthy")
    if stop.is_set():
        raise MeshError("stopped before every peer was healthy")
    raise MeshError(f"peer {name} did not become healthy at {address} within {timeout:.0f} s")


def _stop_all(procs: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for name, proc in procs.items():
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _say(f"mesh up: peer {name} did not stop in time; killing it")
            proc.kill()
            proc.wait()
