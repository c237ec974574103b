"""How one machine's channels and server are secured and bounded.

The one place that turns the config's ``[tls]``, token and ``max_message_bytes`` into gRPC
objects: the dialer asks :meth:`Transport.open_channel` for a channel to a machine, the
server asks :meth:`Transport.guard` and :meth:`Transport.add_port`, and the
health probes :meth:`Transport.probe_args`. Plaintext without a token stays the default, for
development on one host; a peer that listens in plaintext beyond loopback warns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from mesh.addresses import is_loopback
from mesh.credentials import channel_credentials, server_credentials, target_name_option
from mesh.guard import ClientToken, Guard
from mesh.tls import TLSConfig
from mesh.token import Token
from mesh.wire import DEFAULT_MAX_MESSAGE_BYTES, message_options

if TYPE_CHECKING:
    from mesh.config import Config
    from mesh.flowfile import FlowSet

__all__ = ["Transport"]

_log = structlog.get_logger("mesh")

_LIMIT_KEYS = frozenset({"grpc.max_send_message_length", "grpc.max_receive_message_length"})


class Transport:
    """The TLS credentials, token and message limit of machine ``machine``."""

    def __init__(
        self,
        machine: str,
        *,
        tls: TLSConfig | None = None,
        token: Token | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.machine = machine
        self.tls = tls or TLSConfig()
        self.token = token
        self.max_message_bytes = max_message_bytes

    @classmethod
    def of(cls, config: Config, machine: str) -> Transport:
        return cls(
            machine,
            tls=config.tls,
            token=config.token,
            max_message_bytes=config.max_message_bytes,
        )

    def __repr__(self) -> str:
        tls = "tls" if self.tls.of(self.machine) else "plaintext"
        return f"<Transport {self.machine} {tls} token={'yes' if self.token else 'no'}>"

    # -- dialling ------------------------------------------------------------------------

    def probe_args(
        self, machine: str, options: Sequence[tuple[str, Any]] = ()
    ) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
        """Credentials (None: plaintext) and options for a channel to ``machine``."""
        opts = [o for o in options if o[0] not in _LIMIT_KEYS]
        opts += message_options(self.max_message_bytes)
        theirs = self.tls.of(machine)
        if theirs is None:
            return None, opts
        credentials = channel_credentials(self.tls.of(self.machine), theirs)
        return credentials, [*opts, target_name_option(machine)]

    def open_channel(
        self, machine: str, address: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.Channel:
        """A channel to ``machine`` at ``address``: TLS when that machine serves TLS, and
        the token on every call when one is configured."""
        credentials, opts = self.probe_args(machine, options)
        if credentials is None:
            channel = grpc.insecure_channel(address, options=opts)
        else:
            channel = grpc.secure_channel(address, credentials, options=opts)
        if self.token is not None:
            channel = grpc.intercept_channel(channel, ClientToken(self.token))
        return channel

    def unavailable_hint(self, machine: str, details: str) -> str:
        """Words to add when ``machine`` could not be reached and TLS is the likely cause:
        gRPC's own message ("Socket closed", "Tls handshake failed") does not say so."""
        if self.tls.of(machine) is None:
            if "Socket closed" in details:
                return (
                    f"; if {machine} serves TLS, this machine dials it in plaintext"
                    " (no [tls] for it in this mesh.toml)"
                )
            return ""
        if "Socket closed" in details or "andshake" in details:
            return (
                f"; the TLS handshake with {machine} failed: both sides must trust the same ca,"
                f" {machine}'s certificate must name {machine}, and a peer that requires client"
                " certificates needs ours"
            )
        return ""

    # -- serving -------------------------------------------------------------------------

    def server_options(self) -> list[tuple[str, Any]]:
        return list(message_options(self.max_message_bytes))

    def guard(self, flows: FlowSet) -> Guard:
        """What admits or refuses each call of the mesh service (mesh/guard.py)."""
        return Guard(
            self.machine,
            flows,
            self.token,
            self.max_message_bytes,
            tls=self.tls.of(self.machine) is not None,
        )

    def add_port(self, server: grpc.Server, listen: str) -> int:
        """Bind ``listen`` with TLS when this machine has a certificate, else in plaintext
        (with a warning when the address is reachable from other hosts). 0: not bound."""
        files = self.tls.of(self.machine)
        try:
            if files is not None:
                return int(server.add_secure_port(listen, server_credentials(files)))
            port = int(server.add_insecure_port(listen))
        except RuntimeError:
            return 0
        if not is_loopback(listen):
            _log.warning(
                "mesh.plaintext",
                machine=self.machine,
                listen=listen,
                advice="anyone who can reach this address can run this machine's lines;"
                " configure [tls] (and a token) in mesh.toml",
            )
        return port
