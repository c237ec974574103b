"""The gRPC credentials and identities that a machine's TLS settings give.

:mod:`mesh.tls` reads the settings; this module turns them into gRPC objects: what a
peer serving TLS presents, what a caller trusts and presents, the channel option that
checks the peer's certificate names the machine, and the machine names a caller's
certificate carries.
"""

from __future__ import annotations

import grpc

from mesh.errors import ConfigError
from mesh.tls import TLSFiles

__all__ = ["channel_credentials", "peer_machines", "server_credentials", "target_name_option"]


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """What a peer serving TLS presents, and (mTLS) the authority it checks callers against."""
    if files.cert is None:
        raise ConfigError(f"{files.source}: tls: a peer serving TLS needs cert and key")
    pair = (files.read("key"), files.read("cert"))
    if files.require_client_cert:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=files.read("ca"), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


def channel_credentials(mine: TLSFiles | None, theirs: TLSFiles) -> grpc.ChannelCredentials:
    """Credentials to dial a TLS peer: trust our CA (else theirs, else the system's), and
    present our own certificate when we have one, for peers that require it."""
    trust = mine if mine is not None and mine.ca is not None else theirs
    root = trust.read("ca") if trust.ca is not None else None
    if mine is not None and mine.cert is not None:
        return grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=mine.read("key"),
            certificate_chain=mine.read("cert"),
        )
    return grpc.ssl_channel_credentials(root_certificates=root)


def target_name_option(machine: str) -> tuple[str, str]:
    """The channel option that makes TLS check the peer's certificate names ``machine``."""
    return ("grpc.ssl_target_name_override", machine)


def peer_machines(context: grpc.ServicerContext) -> frozenset[str] | None:
    """The names in the caller's certificate (its SANs), or None without a client certificate."""
    identities = context.peer_identities()
    if not identities:
        return None
    return frozenset(i.decode("utf-8", "replace") for i in identities)
