"""Fixtures for tests that run a real mesh: peers are separate processes on 127.0.0.1.

* :class:`MeshDir` writes a flow file, service modules and a ``mesh.toml`` into the
  test's ``tmp_path``, with a free ephemeral port for every machine that needs one.
* ``peers`` starts ``python -m mesh peer MACHINE -c CFG`` processes, waits for each
  to report SERVING on the gRPC health service, and stops every one it started
  (SIGTERM, wait, SIGKILL) when the test ends, passed or failed.
* ``dev_certs`` makes a development CA and certificates with ``mesh.tools.certs``, in the test.
* ``isolate_mesh`` (autouse) undoes what an in-process ``mesh.connect`` leaves
  behind: structlog's configuration, the routing node, the handlers and modules
  the services registered, the config folders put on ``sys.path``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import settings
from proxy import ReplyDropper

import mesh
from mesh import runtime as mesh_runtime
from mesh.config import load_config
from mesh.errors import ConfigError
from mesh.peer import wait_serving as peer_serving
from mesh.processors import default_node
from mesh.registry import default_registry
from mesh.transport import Transport

# CI runs the property tests on a fixed seed, so a run is reproducible; local runs
# keep exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: The flow file of the design notes (tab-separated, with its header row).
LOGIN_FLOW = (
    "Request\tLog\tMachine\n"
    "login\tUser attempted login as :username and #password\tclient\n"
    "login\tReceived request to login as :username\tserver\n"
    "login\tTesting password for :username\tserver\n"
    "login\tSetting session for :username\tserver\n"
    "login\tFinish handling user login\tserver\n"
    "login\tLogin successful\tclient\n"
    "feed\tFetching feed information\tclient\n"
    "feed\tRetrieving feed information\tserver\n"
)

#: The login service the tests use in place of the repo's examples: a password is
#: right when it is "hunter2-" + the username; the session token names its user.
LOGIN_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Testing password for :username")
def test_password(ctx):
    log.info("checking password", user=ctx["username"])
    if ctx["password"] != "hunter2-" + ctx["username"]:
        raise PermissionError("invalid credentials")
    log.info("next", verified=True)


@mesh.handler("login", "Setting session for :username")
def set_session(ctx):
    log.info("next", session="session-" + ctx["username"])
"""

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

_names = itertools.count()


def free_port() -> int:
    """An ephemeral port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def password_of(username: str) -> str:
    """The password LOGIN_SERVICE accepts for ``username``."""
    return "hunter2-" + username


class MeshDir:
    """A mesh in a folder: flow files, service modules and configs, all under ``root``."""

    def __init__(self, root: Path, tag: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.tag = tag
        self.services: list[str] = []
        self.addresses: dict[str, str] = {}
        self.replicas: dict[str, list[str]] = {}  # a machine's replica addresses, 1st first
        self.config = root / "mesh.toml"

    def service(self, code: str, name: str | None = None) -> str:
        """Write a service module (a unique name, so in-process imports never collide)."""
        module = name or f"svc_{self.tag}_{next(_names)}_{uuid.uuid4().hex[:6]}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(code), encoding="utf-8")
        self.services.append(module)
        return module

    def flow(self, text: str, name: str = "flow.tsv") -> Path:
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        return path

    def write_config(
        self,
        machines: Mapping[str, bool | int | str],
        *,
        flow: str | list[str] = "flow.tsv",
        name: str = "mesh.toml",
        extra: str = "",
    ) -> Path:
        """Write a ``mesh.toml``. A machine maps to True (give it a free port), False
        (no address: a pure originator), an int N (N replicas, each on a free port,
        dialled as one ``ipv4:`` target) or an address to use as is."""
        lines = [f"flow = {json.dumps(flow)}", f"services = {json.dumps(self.services)}"]
        if extra:
            lines.append(textwrap.dedent(extra).strip())
        lines.append("[machines]")
        for machine, want in machines.items():
            if want is True:
                address = self.addresses.get(machine) or f"127.0.0.1:{free_port()}"
            elif want is False:
                address = ""
            elif isinstance(want, int):
                binds = self.replicas.get(machine) or [
                    f"127.0.0.1:{free_port()}" for _ in range(want)
                ]
                self.replicas[machine] = binds
                address = "ipv4:" + ",".join(binds)
            else:
                address = str(want)
            self.addresses[machine] = address
            lines.append(f"{machine} = {json.dumps(address)}")
        path = self.root / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if name == "mesh.toml":
            self.config = path
        return path


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
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.wait())

    def kill(self) -> None:
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


def mesh_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MESH_CONFIG", None)
    return env


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
        flags for ``mesh peer``."""
        cfg = config or mesh_dir.config
        address = mesh_dir.addresses[machine]
        which: list[str] = []
        if replica is not None:
            address = mesh_dir.replicas[machine][replica - 1]
            which = ["--replica", str(replica)]
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
        probe = Transport.of(load_config(cfg), machine) if tls else None
        peer = Peer(machine, cfg, address, proc, log, probe=probe)
        self.started.append(peer)
        if wait:
            peer.wait_ready()
        return peer

    def stop_all(self) -> None:
        for peer in reversed(self.started):
            peer.stop()


def config_error(path: Path) -> str:
    """Load ``path`` expecting a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


@pytest.fixture
def mesh_dir(tmp_path: Path, request: pytest.FixtureRequest) -> MeshDir:
    """An empty mesh folder for this test."""
    tag = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    return MeshDir(tmp_path / "meshdir", tag)


@pytest.fixture
def login_mesh(mesh_dir: MeshDir) -> MeshDir:
    """The design notes' login flow: ``client`` (no address) and ``server``."""
    return as_login_mesh(mesh_dir)


def as_login_mesh(mesh_dir: MeshDir) -> MeshDir:
    """Write the login flow, its service and a config (``client`` without an address,
    ``server``) into ``mesh_dir``; for fixtures of a wider scope than ``login_mesh``."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    return mesh_dir


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


@pytest.fixture
def dev_certs(tmp_path: Path) -> Path:
    """``mesh certs`` output for server, client and mesh-call: ca.pem, NAME.pem, NAME.key."""
    from mesh.tools.certs import make_certs

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
def reply_dropper() -> Iterator[Any]:
    """``reply_dropper((host, port), marker, drops=1)``: a proxy that loses replies, stopped
    at the end of the test (see tests/proxy.py)."""
    started: list[ReplyDropper] = []

    def _start(target: tuple[str, int], marker: bytes, drops: int = 1) -> ReplyDropper:
        proxy = ReplyDropper(target, marker, drops)
        started.append(proxy)
        return proxy

    yield _start
    for proxy in started:
        proxy.stop()


class NetNs:
    """A network namespace joined to this one by a veth pair, each end with its own address."""

    def __init__(self, tag: str) -> None:
        self.name = f"mesh-test-{tag}"
        self.host_if = f"mh{tag}h"
        self.ns_if = f"mh{tag}n"
        subnet = _free_subnet(int(tag) % 250)
        self.host_ip = f"10.231.{subnet}.1"
        self.ns_ip = f"10.231.{subnet}.2"

    @property
    def exec(self) -> list[str]:
        """The prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def link(self, up: bool) -> None:
        """Cut (False) or restore (True) the link, at this namespace's end."""
        _ip("link", "set", self.host_if, "up" if up else "down")

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        inside = ["-n", self.name]
        _ip(*inside, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip(*inside, "link", "set", self.ns_if, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def delete(self) -> None:
        # Deleting the namespace deletes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)


def _free_subnet(start: int) -> int:
    """A 10.231.X.0/30 no interface here uses (another test run may have one)."""
    for i in range(250):
        subnet = (start + i) % 250
        shown = subprocess.run(
            ["ip", "-o", "addr", "show", "to", f"10.231.{subnet}.0/30"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0 and not shown.stdout.strip():
            return subnet
    raise OSError("no free 10.231.X.0/30 subnet")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


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
        node = default_node()
        if node is not None:
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


# -- command line, browser and lint helpers (scaffold, diagram, logs) ---------


def run_mesh(
    *args: str | Path,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``mesh ARGS`` as a user would (a subprocess), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**mesh_env(), **(env or {})},
        cwd=cwd,
        check=False,
    )


def ruff_as_a_user(tmp_path: Path) -> Path:
    """A ruff config with this project's lint rules, in a folder that has no ``mesh``.

    Generated code is checked as it would be in a user's project, where ``mesh``
    is an installed (third-party) package rather than one of the project's own.
    """
    import tomllib

    project = tomllib.loads(
        (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    )
    lint = project["tool"]["ruff"]["lint"]
    lines = [
        f"line-length = {project['tool']['ruff']['line-length']}",
        'target-version = "py311"',
        "[lint]",
        f"select = {json.dumps(lint['select'])}",
        f"ignore = {json.dumps(lint['ignore'])}",
    ]
    path = tmp_path / "ruff.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


#: Where tests keep what a person may want to look at afterwards (gitignored).
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class Chromium:
    """Debian's headless Chromium, each run with a fresh profile folder."""

    def __init__(self, binary: str, profiles: Path) -> None:
        self.binary = binary
        self._profiles = profiles
        self._runs = itertools.count()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        profile = self._profiles / f"profile-{next(self._runs)}"
        return subprocess.run(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def dump_dom(self, url: str) -> str:
        """The page's DOM once it has loaded and rendered, serialized."""
        done = self._run("--dump-dom", url)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def screenshot(self, url: str, path: Path, size: str = "1400,1000") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = self._run(f"--screenshot={path}", f"--window-size={size}", url)
        assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
        return path


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Chromium:
    """Headless Chromium: found on PATH, else installed once with ``apt-get install chromium``."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None and shutil.which("apt-get") and os.geteuid() == 0:
        lock = ("-o", "DPkg::Lock::Timeout=600")
        for step in (("update",), ("install", "-y", "--no-install-recommends", "chromium")):
            subprocess.run(
                ["apt-get", *lock, *step],
                capture_output=True,
                timeout=900,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                check=False,
            )
        binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no chromium on PATH, and 'apt-get install chromium' could not install it")
    return Chromium(binary, tmp_path_factory.mktemp("chromium"))
