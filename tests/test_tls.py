"""``[tls]`` in mesh.toml: merged per machine, paths relative to the config, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.cli import mesh_env
from support.meshdir import LOGIN_FLOW, config_error

from mesh.config import load_config
from mesh.errors import ConfigError
from mesh.transport import Transport

MESH_WIDE = """
flow = "flow.tsv"
[tls]
ca = "certs/ca.pem"
cert = "certs/{machine}.pem"
key = "certs/{machine}.key"
require_client_cert = true
[machines]
client = ""
server = "127.0.0.1:50052"
"""


def config_at(tmp_path: Path, body: str) -> Path:
    (tmp_path / "flow.tsv").write_text(LOGIN_FLOW)
    path = tmp_path / "mesh.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_mesh_wide_paths_name_each_machine(tmp_path: Path) -> None:
    """{machine} in a [tls] path becomes each machine's name; paths are relative to the config."""
    config = load_config(config_at(tmp_path, MESH_WIDE))
    server, client = config.tls.of("server"), config.tls.of("client")
    assert server is not None
    assert client is not None
    assert server.cert == tmp_path / "certs" / "server.pem"
    assert client.key == tmp_path / "certs" / "client.key"
    assert server.ca == client.ca == tmp_path / "certs" / "ca.pem"
    assert server.require_client_cert


def test_a_machine_table_overrides_the_mesh_wide_keys(tmp_path: Path) -> None:
    """[machines.NAME.tls] replaces the keys it names and keeps the others."""
    body = MESH_WIDE.replace('server = "127.0.0.1:50052"\n', "") + textwrap.dedent(
        """
        [machines.server]
        address = "127.0.0.1:50052"
        [machines.server.tls]
        cert = "elsewhere/server-cert.pem"
        key = "elsewhere/server-key.pem"
        """
    )
    server = load_config(config_at(tmp_path, body)).tls.of("server")
    assert server is not None
    assert server.cert == tmp_path / "elsewhere" / "server-cert.pem"
    assert server.ca == tmp_path / "certs" / "ca.pem"
    assert server.keys["cert"] == "machines.server.tls.cert"


def test_without_tls_every_machine_is_plaintext(tmp_path: Path) -> None:
    """No [tls]: no machine has TLS settings; the default transport dials in plaintext."""
    plain = 'flow = "flow.tsv"\n[machines]\nclient = ""\nserver = "127.0.0.1:50052"\n'
    config = load_config(config_at(tmp_path, plain))
    assert config.tls.of("server") is None
    assert not config.tls.enabled


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (('ca = "certs/ca.pem"', 'ca = "certs/ca.pem"\ncerts = "x"'), "tls: unknown key 'certs'"),
        (('key = "certs/{machine}.key"\n', ""), "tls: cert and key go together; key is missing"),
        (('ca = "certs/ca.pem"\n', ""), "tls: require_client_cert needs ca"),
        (("require_client_cert = true", 'require_client_cert = "yes"'), "must be true or false"),
        (('ca = "certs/ca.pem"', "ca = 3"), "tls.ca must be a file name"),
        (('ca = "certs/ca.pem"', 'ca = ""'), "tls.ca must be a file name"),
    ],
)
def test_bad_tls_tables(tmp_path: Path, change: tuple[str, str], fragment: str) -> None:
    """Unknown keys, a cert without its key, mTLS without a CA, wrong types: one line each."""
    assert fragment in config_error(config_at(tmp_path, MESH_WIDE.replace(*change)))


def test_a_serving_machine_needs_a_certificate(tmp_path: Path) -> None:
    """TLS with only a CA cannot serve: the machine with an address is named."""
    body = 'flow = "flow.tsv"\n[tls]\nca = "ca.pem"\n[machines]\nclient = ""\nserver = "h:1"\n'
    assert "tls: server has an address, so it serves TLS and needs cert and key" in config_error(
        config_at(tmp_path, body)
    )


def test_unreadable_files_are_named_when_credentials_are_built(tmp_path: Path) -> None:
    """Files are read when used (a machine needs only its own key): a missing or non-PEM
    file is a ConfigError naming the key and the path."""
    config = load_config(config_at(tmp_path, MESH_WIDE))
    (tmp_path / "certs").mkdir()
    with pytest.raises(ConfigError, match=r"mesh.toml: tls.ca: no such file .*certs/ca.pem"):
        Transport.of(config, "client").open_channel("server", "127.0.0.1:1")
    (tmp_path / "certs" / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"tls.ca: .*ca.pem is not a PEM file"):
        Transport.of(config, "client").open_channel("server", "127.0.0.1:1")


def test_peer_with_a_missing_certificate_exits_with_one_line(tmp_path: Path) -> None:
    """`mesh peer` whose certificate is missing exits 1 naming the config key, no traceback."""
    path = config_at(tmp_path, MESH_WIDE)
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "peer", "server", "-c", str(path)],
        capture_output=True,
        text=True,
        env=mesh_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"mesh peer: {path}: tls.key: no such file {tmp_path / 'certs' / 'server.key'}"
    )
