"""Fixtures for tests that run a real mesh: peers are separate processes on 127.0.0.1.

What they start is defined in ``tests/support/``; these fixtures create it for a test and
stop it afterwards, by process id, whether the test passed or failed (a peer that does
not exit 0 within ``STOP_TIMEOUT`` fails the test unless the test said otherwise:
``peer.expect_exit``, or ``peer.kill()``):

* ``mesh_dir`` / ``login_mesh``: a :class:`~support.meshdir.MeshDir` in the test's folder.
* ``peers``: :class:`~support.peers.Peers`, each ``mesh peer`` waited on until SERVING.
* ``login_server``: one login ``server`` peer shared by a module's tests.
* ``dev_certs``: a development CA and certificates made with ``mesh.tools.certs``.
* ``nodes`` / ``connect``: in-process nodes, closed at the end.
* ``up``: ``mesh up`` subprocesses (``support/up.py``), stopped with their peers.
* ``reply_dropper``: a TCP proxy that loses replies (``support/proxy.py``).
* ``netns``: a network namespace with a veth link (root only, else skipped).
* ``chromium``: headless Chromium (skipped, naming it, when it is not installed);
  ``browser``: one driven over the DevTools protocol, shared by a module's tests.
* ``mesh_ui``: ``mesh ui`` subprocesses (``support/ui.py``), stopped at the end.
* ``isolate_mesh`` (autouse): undoes what an in-process ``mesh.connect`` leaves behind:
  structlog's configuration, the routing node, the handlers and modules the services
  registered, the config folders put on ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import settings
from support.chromium import Browser, Chromium
from support.meshdir import MeshDir, as_login_mesh
from support.netns import NetNs
from support.peers import Peer, Peers
from support.proxy import ReplyDropper
from support.ui import Ui
from support.up import Up

import mesh
from mesh import runtime as mesh_runtime
from mesh.processors import default_node
from mesh.registry import default_registry

# CI runs the property tests on a fixed seed, so a run is reproducible; local runs
# keep exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def mesh_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MeshDir]:
    """An empty mesh folder for this test."""
    tag = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    folder = MeshDir(tmp_path / "meshdir", tag)
    try:
        yield folder
    finally:
        folder.close()


@pytest.fixture
def login_mesh(mesh_dir: MeshDir) -> MeshDir:
    """The design notes' login flow: ``client`` (no address) and ``server``."""
    return as_login_mesh(mesh_dir)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """``peers.start(mesh_dir, machine)``: a running peer, stopped at the end of the test."""
    started = Peers(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="module")
def login_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshDir, Peer]]:
    """The login mesh's ``server`` peer, shared by one module's tests (which must leave it
    serving); stopped when the module is done."""
    root = tmp_path_factory.mktemp("login_server")
    mesh_dir = as_login_mesh(MeshDir(root / "meshdir", "login_server"))
    started = Peers(root)
    try:
        yield mesh_dir, started.start(mesh_dir, "server")
    finally:
        started.stop_all()
        mesh_dir.close()


@pytest.fixture
def dev_certs(tmp_path: Path) -> Path:
    """``mesh certs`` output for server, client and mesh-call: ca.pem, NAME.pem, NAME.key."""
    from mesh.tools.certs import make_certs  # needs the tls extra

    folder = tmp_path / "meshdir" / "certs"
    make_certs(folder, ["server", "client", "mesh-call"])
    return folder


@pytest.fixture
def nodes() -> Iterator[list[mesh.Node]]:
    """Append every in-process node here; each is closed at the end of the test."""
    opened: list[mesh.Node] = []
    yield opened
    for node in reversed(opened):
        node.close()


@pytest.fixture
def connect(nodes: list[mesh.Node]) -> Any:
    """``mesh.connect`` whose node is closed when the test ends."""

    def _connect(config: Path, machine: str) -> mesh.Node:
        node = mesh.connect(config, machine=machine)
        nodes.append(node)
        return node

    return _connect


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Any]:
    """``up(config, *args)`` starts ``mesh up``; everything it started is stopped at the end."""
    started: list[Up] = []

    def start(config: Path, *args: str, **kwargs: Any) -> Up:
        started.append(Up(config, tmp_path, *args, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def reply_dropper() -> Iterator[Any]:
    """``reply_dropper((host, port), marker, drops=1)``: a proxy that loses replies, stopped
    at the end of the test (see tests/support/proxy.py)."""
    started: list[ReplyDropper] = []

    def _start(target: tuple[str, int], marker: bytes, drops: int = 1) -> ReplyDropper:
        proxy = ReplyDropper(target, marker, drops)
        started.append(proxy)
        return proxy

    yield _start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh network namespace with a veth link to ours; deleted at the end of the test.

    Skipped where namespaces cannot be made (not root, no ``ip``, no CAP_NET_ADMIN)."""
    try:
        ns = NetNs(str(os.getpid() % 100_000))
    except (OSError, FileNotFoundError) as exc:
        pytest.skip(f"cannot make a network namespace here (needs root and iproute2): {exc}")
    try:
        ns.create()
    except (OSError, FileNotFoundError) as exc:
        ns.delete()
        pytest.skip(f"cannot make a network namespace here (needs root and iproute2): {exc}")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture(autouse=True)
def isolate_mesh() -> Iterator[None]:
    """Undo the global state an in-process ``mesh.connect`` installs."""
    handlers = dict(default_registry._handlers)
    modules = set(sys.modules)
    path = list(sys.path)
    try:
        yield
    finally:
        while (node := default_node()) is not None:  # closing one makes the next the default
            node.close()
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        mesh_runtime.current.set(None)
        default_registry._handlers.clear()
        default_registry._handlers.update(handlers)
        for name in set(sys.modules) - modules:
            if name.startswith("svc_"):
                del sys.modules[name]
        sys.path[:] = path


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Chromium:
    """Headless Chromium from PATH (``make test`` installs Debian's with
    scripts/ensure-debian-packages.sh); skipped, naming what is missing, without it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip(
            "no chromium or chromium-browser on PATH"
            " (scripts/ensure-debian-packages.sh chromium installs it)"
        )
    return Chromium(binary, tmp_path_factory.mktemp("chromium"))


@pytest.fixture(scope="module")
def browser(chromium: Chromium) -> Iterator[Browser]:
    """Headless Chromium driven over the DevTools protocol (``browser.page()``), shared by
    a module's tests; closed, by its process id, when the module is done."""
    running = chromium.browser()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def mesh_ui(tmp_path: Path) -> Iterator[Any]:
    """``mesh_ui(config, *args)`` starts ``mesh ui`` on a port of its own; stopped at the end."""
    started: list[Ui] = []

    def start(config: Path, *args: str, **kwargs: Any) -> Ui:
        started.append(Ui(config, tmp_path / f"ui-{len(started)}.log", *args, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()
