"""``mesh up``: a peer process for every machine (every replica) with an address.

Starts ``mesh peer`` children, prefixes their output with their machine, waits until
each reports SERVING on gRPC health, then watches them until Ctrl-C or SIGTERM, and
stops every one it started (SIGTERM, the config's grace, then SIGKILL). On Linux a
child also dies with its parent, so a ``mesh up`` killed outright leaves no peer behind.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mesh.addresses import dialable
from mesh.config import Config
from mesh.errors import MeshError
from mesh.peer import wait_serving
from mesh.transport import Transport

__all__ = ["run", "stop_event"]

#: How long a peer may take to become healthy before ``mesh up`` gives up on it.
HEALTHY_WITHIN = 30.0


def stop_event() -> threading.Event:
    """An event SIGTERM and SIGINT set: set up first, so an early signal is not lost."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def run(path: Path, config: Config, stop: threading.Event) -> int:
    """Start, watch and stop the peers of ``config`` (loaded from ``path``) until ``stop``."""
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
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for label, name, replica, _, _ in peers:
            which = ["--replica", str(replica)] if replica is not None else []
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "peer", name, *which, "-c", str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `mesh up` alone; it stops the peers
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - async-signal-safe, see there
            )
            procs[label] = proc
            threading.Thread(
                target=_relay, args=(f"{label:<{width}} | ", proc), daemon=True
            ).start()
        for label, name, _, health_at, bind in peers:
            probe = Transport.of(config, name)  # a TLS peer is probed with its own certificate
            _wait_healthy(
                label,
                health_at,
                procs[label],
                stop,
                deadline=time.monotonic() + HEALTHY_WITHIN,
                probe=probe,
            )
            _say(f"mesh up: {label} listening on {bind} (pid {procs[label].pid})")
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


_print_lock = threading.Lock()


def _say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _relay(prefix: str, proc: subprocess.Popen[bytes]) -> None:
    """Copy a peer's output to ours line by line, each line prefixed with its machine."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        _say(prefix + raw.decode("utf-8", "replace").rstrip("\n"))


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
