"""A mesh in a test's folder: flow files, service modules and ``mesh.toml`` files."""

from __future__ import annotations

import itertools
import json
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
