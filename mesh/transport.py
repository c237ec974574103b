"""How one machine's channels and server are secured and bounded.

The one place that turns the config's ``[tls]``, token and ``max_message_bytes`` into gRPC
objects: the node's links ask :meth:`Transport.link_channel` for a channel to each replica
(and send :meth:`Transport.link_metadata` when a link opens), the server asks
:meth:`Transport.guard`, :meth:`Transport.server_options` and :meth:`Transport.add_port`,
and health probes and tools :meth:`Transport.open_channel` (blocking gRPC). Plaintext
without a token stays the default, for development on one host; a peer that listens in
plaintext beyond loopback warns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import structlog

from mesh.addresses import is_loopback
from mesh.credentials import channel_credentials, server_credentials, target_name_option
from mesh.guard import Guard
from mesh.tls import TLSConfig
from mesh.token import Token
from mesh.wire import DEFAULT_MAX_MESSAGE_BYTES, message_options

if TYPE_CHECKING:
    from mesh.config import Config
    from mesh.flowfile import FlowSet

__all__ = ["Transport"]

_log = structlog.get_logger("mesh")

_LIMIT_KEYS = frozenset({"grpc.max_send_message_length", "grpc.max_receive_message_length"})

#: The metadata key a link's opener (and the peer, in its initial metadata) states the
#: largest message it takes in, so each side sends the other nothing larger.
LIMIT_KEY = "mesh-max-message"

#: Channel options of a link: each replica has a channel of its own, dialled again soon
#: after it went away, and a silent partition is found by keepalive pings within seconds
#: rather than when TCP gives up, minutes later.
LINK_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

#: What a peer lets callers do that links need: keepalive pings every few seconds.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),  # two peers started on one port would otherwise share it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
)


def frame_limit(limit: int) -> int:
    """gRPC's own limit for messages on a link: room for a call or reply of ``limit``
    bytes in its frame, so that an oversized one is refused by the mesh, naming its
    size, not by gRPC, which would break the whole link."""
    return min(limit + limit // 8 + 64 * 1024, 2**31 - 1)


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _CallDetails(_Details, grpc.ClientCallDetails):  # type: ignore[misc]
    pass


class ClientToken(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the token to every unary call a blocking channel makes (call credentials
    would need TLS)."""

    def __init__(self, token: Token) -> None:
        self._pair = token.header()

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        metadata = [*(details.metadata or ()), self._pair]
        new = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return continuation(new, request)


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

    def link_channel(self, machine: str, address: str) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to one replica of ``machine``, for a link (mesh/links.py)."""
        credentials, opts = self.probe_args(machine, LINK_OPTIONS)
        limit = frame_limit(self.max_message_bytes)
        opts = [o for o in opts if o[0] not in _LIMIT_KEYS]
        opts += [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=opts)
        return grpc.aio.secure_channel(address, credentials, options=opts)

    def link_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a link sends when it opens: the token, and the largest reply it takes."""
        pairs = [(LIMIT_KEY, str(self.max_message_bytes))]
        if self.token is not None:
            pairs.append(self.token.header())
        return tuple(pairs)

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
        """A peer's server: a unary call up to the limit, link frames with room around it."""
        limit = frame_limit(self.max_message_bytes)
        return [
            *SERVER_OPTIONS,
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]

    def guard(self, flows: FlowSet) -> Guard:
        """What admits or refuses each call of the mesh service (mesh/guard.py)."""
        return Guard(
            self.machine,
            flows,
            self.token,
            self.max_message_bytes,
            tls=self.tls.of(self.machine) is not None,
        )

    def add_port(self, server: grpc.Server | grpc.aio.Server, listen: str) -> int:
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
