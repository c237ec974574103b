"""``mesh certs``: a development CA and one certificate per machine, named by its SAN."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from support.cli import mesh_env, run_mesh

from mesh.errors import MeshError
from mesh.tools.certs import make_certs


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_one_certificate_per_machine_signed_by_the_ca(tmp_path: Path) -> None:
    """Each machine's certificate names exactly the machine and is issued by the new CA."""
    written = make_certs(tmp_path / "certs", ["server", "client"])
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"]
    )
    ca = load(tmp_path / "certs" / "ca.pem")
    for machine in ("server", "client"):
        cert = load(tmp_path / "certs" / f"{machine}.pem")
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [machine]


def test_private_keys_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """Key files are created 0600; certificates are not secret."""
    make_certs(tmp_path, ["server"])
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_the_ca_is_kept_so_machines_can_be_added(tmp_path: Path) -> None:
    """A second run reuses ca.pem/ca.key, so earlier certificates stay valid."""
    make_certs(tmp_path, ["server"])
    ca_before = (tmp_path / "ca.pem").read_bytes()
    written = make_certs(tmp_path, ["emailservice"])
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    assert tmp_path / "ca.pem" not in written
    load(tmp_path / "emailservice.pem").verify_directly_issued_by(load(tmp_path / "ca.pem"))
    load(tmp_path / "server.pem").verify_directly_issued_by(load(tmp_path / "ca.pem"))


@pytest.mark.parametrize(
    ("machines", "fragment"),
    [
        ([], "name at least one machine"),
        (["bad name"], "'bad name' cannot be a certificate's DNS name"),
        (["ca"], "would overwrite the authority"),
    ],
)
def test_bad_machine_lists(tmp_path: Path, machines: list[str], fragment: str) -> None:
    """No machine, a name no certificate can carry, or "ca": a MeshError saying so."""
    with pytest.raises(MeshError, match=fragment):
        make_certs(tmp_path, machines)


def test_cli_writes_certificates_and_prints_the_config(tmp_path: Path) -> None:
    """`mesh certs DIR --machines a,b` writes the files and prints the [tls] table to use."""
    done = run_mesh("certs", "certs", "--machines", "server,client", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "certs" / "client.pem").is_file()
    assert 'cert = "certs/{machine}.pem"' in done.stdout
    assert "require_client_cert = true" in done.stdout


def test_cli_without_cryptography_names_the_extra(tmp_path: Path) -> None:
    """Without the cryptography package, mesh certs says which extra to install; exit 1."""
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from mesh.cli import main\n"
        "sys.exit(main(['certs', 'out', '--machines', 'server']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=mesh_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "mesh certs: the cryptography package is missing: pip install 'mesh[tls]'"
    )
    assert not (tmp_path / "out").exists()
