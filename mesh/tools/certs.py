"""``mesh certs``: a development certificate authority and one certificate per machine.

So that trying TLS is one command. Each machine's certificate names the machine as its only
DNS subject alternative name, which is how peers know who is calling (mutual TLS) and how a
caller knows it reached the machine it meant to (see :mod:`mesh.tls`). Not for production:
the CA key sits beside the certificates, unencrypted.

Needs the ``cryptography`` package: ``pip install 'mesh[tls]'``.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.errors import MeshError

__all__ = ["CA_CERT", "CA_KEY", "make_certs"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"

#: A DNS label sequence: what a certificate's DNS name may hold.
_DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*")


def _crypto() -> Any:
    try:
        from cryptography import x509  # noqa: PLC0415 - an optional extra
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 - an optional extra
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - an optional extra
        from cryptography.x509.oid import NameOID  # noqa: PLC0415 - an optional extra
    except ImportError:
        raise MeshError("the cryptography package is missing: pip install 'mesh[tls]'") from None
    return x509, hashes, serialization, ec, NameOID


def make_certs(
    directory: str | os.PathLike[str], machines: Sequence[str], *, days: int = 365
) -> list[Path]:
    """Write ``ca.pem``/``ca.key`` (kept if present, so machines can be added later) and
    ``MACHINE.pem``/``MACHINE.key`` for each machine; returns the files written."""
    names = [m.strip() for m in machines if m.strip()]
    if not names:
        raise MeshError("name at least one machine (--machines server,client)")
    for name in names:
        if not _DNS_NAME.fullmatch(name):
            raise MeshError(
                f"machine {name!r} cannot be a certificate's DNS name"
                " (letters, digits, '-' and '.')"
            )
        if name in {"ca"}:
            raise MeshError("a machine named 'ca' would overwrite the authority")
    x509, hashes, serialization, ec, NameOID = _crypto()
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MeshError(f"cannot create {folder}: {exc.strerror or exc}") from None

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    written: list[Path] = []
    ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    if ca_cert_path.is_file() and ca_key_path.is_file():
        try:
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        except (ValueError, TypeError) as exc:
            raise MeshError(f"{ca_cert_path} / {ca_key_path}: not usable: {exc}") from None
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh development CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key, serialization)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [ca_cert_path, ca_key_path]

    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
        _write_key(key_path, key, serialization)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [cert_path, key_path]
    return written


def _write_key(path: Path, key: Any, serialization: Any) -> None:
    """A private key, readable by its owner only (created so, never briefly world-readable)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)


def config_snippet(directory: str) -> str:
    """The ``mesh.toml`` lines that use what :func:`make_certs` wrote into ``directory``."""
    return (
        "[tls]\n"
        f'ca = "{directory}/{CA_CERT}"\n'
        f'cert = "{directory}/{{machine}}.pem"\n'
        f'key = "{directory}/{{machine}}.key"\n'
        "require_client_cert = true\n"
    )
