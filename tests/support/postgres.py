"""A real PostgreSQL server for the tests that need one: Debian's ``postgresql`` package,
started on a free port in a temporary data directory and stopped by process id.

``make test`` installs the package when it is missing (scripts/ensure-debian-packages.sh);
where it still is not there, :func:`missing` names what is, and the tests skip with that.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 30.0


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).resolve().parent if on_path else None


def _as_postgres() -> list[str]:
    """Postgres refuses to run as root: as root, run it as the ``postgres`` user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def missing() -> str | None:
    """Why no server can be started here (a reason for ``pytest.skip``), or None."""
    bindir = _bindir()
    if bindir is None or not (bindir / "initdb").exists():
        return "PostgreSQL server binaries (Debian package postgresql) are not installed"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser(1) is missing"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg package is not installed (pip install 'structlog-mesh[postgres]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Postgres:
    url: str
    port: int
    data: Path
    pid: int


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh server for the block, owned by this process and stopped by pid afterwards."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    bindir = _bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="mesh-pg-"))
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    runas = _as_postgres()
    subprocess.run(
        [
            *runas,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "mesh",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    port = _free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *runas,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(root),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"postgresql://mesh@127.0.0.1:{port}/postgres"
    try:
        _wait_ready(url, proc, root)
        yield Postgres(url=url, port=port, data=data, pid=proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # "fast" shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], root: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            text = (root / "server.log").read_text(errors="replace")
            raise RuntimeError(f"postgres exited with {proc.returncode}: {text[-2000:]}")
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
