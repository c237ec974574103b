"""A mesh in a test's folder: flow files, service modules and ``mesh.toml`` files."""

from __future__ import annotations

import itertools
import json
import re
import socket
import textwrap
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest

from mesh.config import load_config
from mesh.errors import ConfigError

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

_names = itertools.count()


def free_port() -> int:
    """An ephemeral port nothing listens on right now.

    Bind-then-release: another process may take the port before the peer meant for it
    binds it. Only for a config that something other than ``Peers.start`` binds (``mesh
    up``, ``node.serve()``), or a peer that is dialled before it starts; see
    :meth:`MeshDir.fix_ports`.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def password_of(username: str) -> str:
    """The password LOGIN_SERVICE accepts for ``username``."""
    return "hunter2-" + username


class MeshDir:
    """A mesh in a folder: flow files, service modules and configs, all under ``root``.

    A machine written as ``True`` (or ``N`` replicas) gets the port its peer binds: the
    peer starts on ``127.0.0.1:0`` (``Peers.start``) and reports the port the kernel gave
    it, and :meth:`settle` writes it into every config of this folder. Until then the
    configs hold a placeholder: a port this folder keeps bound but not listening, so a
    call to it is refused, as to a peer that is down, and no other process can take it.
    Every process reads its config once, when it starts; so start a machine before the
    machines that dial it (a chain from its last machine), and connect clients last.
    """

    def __init__(self, root: Path, tag: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.tag = tag
        self.services: list[str] = []
        self.addresses: dict[str, str] = {}
        self.replicas: dict[str, list[str]] = {}  # a machine's replica addresses, 1st first
        self.config = root / "mesh.toml"
        self._held: dict[str, socket.socket] = {}  # placeholder address -> the socket holding it
        self._written: list[Path] = []

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
        """Write a ``mesh.toml``. A machine maps to True (a port of its own, chosen when its
        peer starts), False (no address: a pure originator), an int N (N replicas, each a
        port of its own, dialled as one ``ipv4:`` target) or an address to use as is."""
        lines = [f"flow = {json.dumps(flow)}", f"services = {json.dumps(self.services)}"]
        if extra:
            lines.append(textwrap.dedent(extra).strip())
        lines.append("[machines]")
        for machine, want in machines.items():
            if want is True:
                address = self.addresses.get(machine) or self._placeholder()
            elif want is False:
                address = ""
            elif isinstance(want, int):
                binds = self.replicas.get(machine) or [self._placeholder() for _ in range(want)]
                self.replicas[machine] = binds
                address = "ipv4:" + ",".join(binds)
            else:
                address = str(want)
            self.addresses[machine] = address
            lines.append(f"{machine} = {json.dumps(address)}")
        path = self.root / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if path not in self._written:
            self._written.append(path)
        if name == "mesh.toml":
            self.config = path
        return path

    def waiting(self, address: str) -> bool:
        """True while ``address`` is a placeholder: its peer has not chosen its port yet."""
        return address in self._held

    def settle(self, placeholder: str, address: str) -> None:
        """Put ``address`` where ``placeholder`` stood, in every config this folder wrote."""
        self._held.pop(placeholder).close()
        exact = re.compile(re.escape(placeholder) + r"(?![0-9])")  # :4123 is not :41234
        for path in self._written:
            text = path.read_text(encoding="utf-8")
            path.write_text(exact.sub(address, text), encoding="utf-8")
        for machine, known in self.addresses.items():
            self.addresses[machine] = exact.sub(address, known)
        for binds in self.replicas.values():
            binds[:] = [address if b == placeholder else b for b in binds]

    def fix_ports(self, *machines: str) -> None:
        """Choose the ports of ``machines`` now (default: every machine still waiting).

        For a config that something other than ``Peers.start`` binds (``mesh up``,
        ``node.serve()``), or a peer that is dialled before it starts, as when two peers
        call each other. :func:`free_port` is a bind-then-release race, so only there.
        """
        for machine in machines or tuple(self.addresses):
            for placeholder in [*self.replicas.get(machine, ()), self.addresses[machine]]:
                if self.waiting(placeholder):
                    self.settle(placeholder, f"127.0.0.1:{free_port()}")

    def close(self) -> None:
        """Release the placeholder ports still held."""
        for sock in self._held.values():
            sock.close()
        self._held.clear()

    def _placeholder(self) -> str:
        """A port held bound but not listening: calls to it are refused, and no other
        process can take it while it stands in for a port a peer has yet to choose."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        self._held[address] = sock
        return address


def as_login_mesh(mesh_dir: MeshDir) -> MeshDir:
    """Write the login flow, its service and a config (``client`` without an address,
    ``server``) into ``mesh_dir``; for fixtures of a wider scope than ``login_mesh``."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(LOGIN_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    return mesh_dir


def config_error(path: Path) -> str:
    """Load ``path`` expecting a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


#: A durable order over three machines: ``client`` (no address) places it, ``stock``
#: reserves the item (taking ``slow`` seconds when the context says so), ``billing``
#: charges the card, which is a secret; an item called "broken" is declined there.
ORDER_FLOW = (
    "Request\tLog\tMachine\n"
    "order\tOrder placed for :customer: :item with card #card\tclient\n"
    "order\tReserving :item for :customer\tstock\n"
    "order\tCharging :customer for :item\tbilling\n"
    "order\tOrder confirmed for :customer\tclient\n"
)

ORDER_SERVICE = """
import time

import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("order", "Reserving :item for :customer")
def reserve(ctx):
    time.sleep(float(ctx.get("slow", 0)))
    log.info("next", reserved=ctx["item"])


@mesh.handler("order", "Charging :customer for :item")
def charge(ctx):
    if ctx["item"] == "broken":
        raise ValueError(f"card declined for {ctx['item']}")
    log.info("next", charged=True, receipt="r-" + ctx["customer"])
"""


def as_order_mesh(mesh_dir: MeshDir, token: str | None = None) -> MeshDir:
    """Write the durable order flow, its service and a config into ``mesh_dir`` (with
    ``token`` in a token_file when given): start ``billing`` before ``stock``, which
    calls it."""
    mesh_dir.flow(ORDER_FLOW)
    mesh_dir.service(ORDER_SERVICE)
    extra = "durable = true"
    if token is not None:
        (mesh_dir.root / "token").write_text(token + "\n", encoding="utf-8")
        extra += '\ntoken_file = "token"'
    mesh_dir.write_config({"client": False, "stock": True, "billing": True}, extra=extra)
    return mesh_dir
