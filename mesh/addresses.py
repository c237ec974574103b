"""Machine addresses: ``host:port``, gRPC targets, replicas; pure functions on strings.

``mesh.toml`` gives each machine an address its callers dial (a ``host:port`` or a target
gRPC resolves itself, such as ``dns:///host:port`` or ``ipv4:a:1,b:2`` listing replicas)
and where its peers bind. Nothing here resolves, dials or binds: config.py checks
addresses with these functions, and the peer, the supervisor and the transport read them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

__all__ = [
    "ADDRESS_FORMS",
    "address_problem",
    "count_up",
    "dialable",
    "host_port",
    "host_port_problem",
    "is_ip_literal",
    "is_loopback",
    "is_target",
    "listed_replicas",
    "listed_target",
]

#: The forms an address may take, for messages about a malformed one.
ADDRESS_FORMS = "want host:port, [ipv6]:port, or a gRPC target such as dns:///host:port"

#: Schemes whose target is a comma-separated list of host:port, one per replica.
_LIST_SCHEMES = ("ipv4:", "ipv6:")

# Schemes gRPC resolves itself. Matched before host:port, as gRPC does: "dns:50052" is a target.
_SCHEMES = frozenset({"ipv4", "ipv6", "dns", "unix", "unix-abstract", "xds"})
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_IPV4_LIKE = re.compile(r"[0-9.]+")


def is_target(address: str) -> bool:
    """A gRPC target with a scheme, which gRPC resolves itself, rather than a host:port."""
    match = _SCHEME_RE.match(address)
    if match is None:
        return False
    return match.group(1).lower() in _SCHEMES or address[match.end() :].startswith("//")


def address_problem(address: str) -> str | None:
    """Why ``address`` is neither a target nor a plain host:port, or None when it is fine."""
    if any(c.isspace() for c in address):
        return "it contains whitespace"
    if is_target(address):
        scheme, _, rest = address.partition(":")
        if not rest.lstrip("/"):
            return f"nothing follows {scheme}:"
        return None
    return host_port_problem(address)


def host_port_problem(text: str) -> str | None:
    """Why ``text`` is not a plain host:port, or None when it is one."""
    try:
        host_port(text)
    except ValueError as exc:
        return str(exc)
    return None


def host_port(text: str) -> tuple[str, int]:
    """Split a plain ``host:port``; the host comes back normalised so equal endpoints compare equal.

    Raises ValueError with the reason, phrased to follow "is malformed: ".
    """
    if any(c.isspace() for c in text):
        raise ValueError("it contains whitespace")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("'[' without ']'")
        inner, rest = text[1:end], text[end + 1 :]
        try:
            host = f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise ValueError(f"{inner!r} in brackets is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError("no :port after the ']'")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("no :port")
        if not host:
            raise ValueError("no host before the :port")
        if ":" in host:
            raise ValueError("an IPv6 host needs brackets, like [::1]:50052")
        if _IPV4_LIKE.fullmatch(host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv4 address") from None
        elif len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or IP address")
        else:
            host = host.lower().rstrip(".")
    if not port_text:
        raise ValueError("no port after the ':'")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 1-65535")
    return host, int(port_text)


def is_ip_literal(host: str) -> bool:
    """True for a host as :func:`host_port` returns it that is an IP address, not a name."""
    return host.startswith("[") or _IPV4_LIKE.fullmatch(host) is not None


def count_up(base: str, count: int | None) -> list[str]:
    """``count`` host:port addresses from ``base``, the port counted up by one each.

    Raises ValueError when the last port would pass 65535.
    """
    if count is None or count == 1:
        return [base]
    host, _, port_text = base.rpartition(":")
    port = int(port_text)
    if port + count - 1 > 65535:
        raise ValueError("would pass port 65535")
    return [f"{host}:{p}" for p in range(port, port + count)]


def listed_replicas(address: str) -> list[str] | None:
    """The host:port list of an ``ipv4:``/``ipv6:`` target, or None for any other address."""
    lowered = address.lower()
    for scheme in _LIST_SCHEMES:
        if lowered.startswith(scheme) and not address[len(scheme) :].startswith("//"):
            parts = address[len(scheme) :].split(",")
            if all(host_port_problem(p) is None for p in parts):
                return parts
    return None


def listed_target(binds: Sequence[str]) -> str:
    """The ``ipv4:``/``ipv6:`` target that dials every one of ``binds`` (IP host:ports)."""
    scheme = "ipv6" if binds[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(binds)}"


def dialable(bind: str) -> str:
    """A replica's bind address as this host dials it (a wildcard host means loopback)."""
    host, _, port = bind.rpartition(":")
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "[0:0:0:0:0:0:0:0]"):
        return f"[::1]:{port}"
    return bind


def is_loopback(listen: str) -> bool:
    """True when ``host:port`` can only be reached from this host."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
