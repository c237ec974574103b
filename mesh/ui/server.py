"""Start ``mesh ui``: check where it may listen, bind, say so, serve until stopped.

The one place that imports the ``ui`` extra at run time; without it ``mesh ui`` is a
one-line error naming the install line. The socket is bound here, before uvicorn runs,
so ``--listen 127.0.0.1:0`` works and the line printed at start names the real port.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from mesh.addresses import host_port, host_port_problem, is_loopback
from mesh.config import load_config
from mesh.distribution import install_hint
from mesh.errors import MeshError

__all__ = ["DEFAULT_LISTEN", "serve"]

DEFAULT_LISTEN = "127.0.0.1:8765"


def _require_extra() -> None:
    try:
        import starlette  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415
    except ImportError as exc:
        raise MeshError(
            f"mesh ui needs the ui extra ({exc.name} is not installed): {install_hint('ui')}"
        ) from None


def bind(listen: str) -> socket.socket:
    """A listening TCP socket at ``listen`` (``HOST:0``: a free port)."""
    head, _, given = listen.rpartition(":")
    checked = f"{head}:1" if given == "0" else listen  # port 0: the kernel picks one
    problem = host_port_problem(checked)
    if problem is not None:
        raise MeshError(f"--listen {listen!r} is not a host:port: {problem}")
    host, port = host_port(checked)
    port = 0 if given == "0" else port
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MeshError(f"--listen {listen}: cannot bind: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(config_path: Path, listen: str = DEFAULT_LISTEN) -> int:
    """Serve the page of the mesh ``config_path`` describes until SIGINT or SIGTERM."""
    _require_extra()
    import uvicorn  # noqa: PLC0415 - the ui extra

    from mesh.ui.access import Access, listen_problem  # noqa: PLC0415
    from mesh.ui.app import make_app  # noqa: PLC0415 - imports starlette

    config = load_config(config_path)
    problem = listen_problem(listen, config.token)
    if problem is not None:
        raise MeshError(problem)
    sock = bind(listen)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    access = Access(config.token, is_loopback(listen))
    app = make_app(config, access)
    print(access.announce(url), file=sys.stderr, flush=True)
    # A stable line: tests and scripts read the address and the pid from it.
    print(f"mesh ui listening on {url} (pid {os.getpid()})", file=sys.stderr, flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
