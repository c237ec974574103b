"""TLS settings from ``mesh.toml``: which certificate files each machine uses.

A machine's name in the flow file is its identity on the wire too: its certificate carries
the name as a DNS subject alternative name (SAN). A caller checks that the peer it dials
presents the certificate of the machine it meant to reach (the TLS target name is the
machine's name, whatever the address), and a peer that requires client certificates knows
which machine is calling from the caller's certificate.

Settings come from ``[tls]`` (mesh-wide; ``{machine}`` in a path is replaced by the machine's
name) and ``[machines.NAME.tls]`` (that machine's own, overriding the mesh-wide keys). Paths
are relative to the config. Files are read only when credentials are built (by
``mesh/credentials.py``, the gRPC side), so a machine needs only its own key on disk, and a
missing file is a ``ConfigError`` naming the key. No gRPC here: loading a config is pure.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mesh.errors import ConfigError

__all__ = ["TLSConfig", "TLSFiles", "parse_tls"]

_KEYS = frozenset({"ca", "cert", "key", "require_client_cert"})
_PATH_KEYS = ("ca", "cert", "key")


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """One machine's TLS settings, resolved: absolute paths, the mesh-wide keys merged in.

    ``source`` is the config path and ``key`` the TOML key each field came from, so an
    unreadable file is reported where it was written.
    """

    ca: Path | None
    cert: Path | None
    key: Path | None
    require_client_cert: bool
    source: str
    keys: Mapping[str, str] = field(default_factory=dict)

    def read(self, name: str) -> bytes:
        """The PEM bytes of ``ca``, ``cert`` or ``key``; ConfigError naming the key if unusable."""
        path: Path | None = getattr(self, name)
        where = f"{self.source}: {self.keys.get(name, 'tls.' + name)}"
        if path is None:
            raise ConfigError(f"{where} is not set")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file {path}") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN " not in data:
            raise ConfigError(f"{where}: {path} is not a PEM file")
        return data


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Every machine's TLS settings; a machine missing from ``machines`` uses ``default``."""

    default: TLSFiles | None = None
    machines: Mapping[str, TLSFiles] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, machine: str) -> TLSFiles | None:
        """The settings ``machine`` uses, or None when it speaks plaintext.

        A caller that is no machine of the config (``mesh call`` acts as ``mesh-call``)
        gets the mesh-wide settings with ``{machine}`` in their paths replaced by its name.
        """
        files = self.machines.get(machine)
        if files is not None or self.default is None or not machine:
            return files or self.default
        d = self.default
        return dataclasses.replace(
            d, ca=_named(d.ca, machine), cert=_named(d.cert, machine), key=_named(d.key, machine)
        )

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.machines)


def parse_tls(where: str, root: Path, data: Mapping[str, object]) -> TLSConfig:
    """Read ``[tls]`` and every ``[machines.NAME.tls]`` of a loaded TOML document."""
    mesh_wide = data.get("tls")
    base: dict[str, Any] = {}
    if mesh_wide is not None:
        base = _table(where, "tls", mesh_wide)
    default = _resolve(where, root, key="tls", base=base, own={}, machine="") if base else None

    machines: dict[str, TLSFiles] = {}
    raw_machines = data.get("machines")
    if not isinstance(raw_machines, dict):
        return TLSConfig(default, MappingProxyType(machines))
    for name, entry in raw_machines.items():
        key = f"{_machine_key(name)}.tls"
        own: dict[str, Any] = {}
        if isinstance(entry, dict) and "tls" in entry:
            own = _table(where, key, entry["tls"])
        if own or _per_machine(base):
            machines[name] = _resolve(where, root, key=key, base=base, own=own, machine=name)
        files = machines.get(name, default)
        address = (
            entry
            if isinstance(entry, str)
            else entry.get("address", "")
            if isinstance(entry, dict)
            else ""
        )
        if files is not None and address and files.cert is None:
            raise ConfigError(
                f"{where}: {key if own else 'tls'}: {name} has an address, so it serves TLS"
                " and needs cert and key"
            )
    return TLSConfig(default, MappingProxyType(machines))


def _named(path: Path | None, machine: str) -> Path | None:
    if path is None or "{machine}" not in str(path):
        return path
    return Path(str(path).replace("{machine}", machine))


def _per_machine(base: Mapping[str, Any]) -> bool:
    return any("{machine}" in str(base.get(k, "")) for k in _PATH_KEYS)


def _table(where: str, key: str, raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {key} must be a table ([{key}]), not {type(raw).__name__}")
    for k, value in raw.items():
        if k not in _KEYS:
            raise ConfigError(
                f"{where}: {key}: unknown key {k!r} (known: {', '.join(sorted(_KEYS))})"
            )
        if k == "require_client_cert":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key}.{k} must be true or false, not {value!r}")
        elif not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key}.{k} must be a file name (a string), not {value!r}")
    return dict(raw)


def _resolve(
    where: str,
    root: Path,
    *,
    key: str,
    base: Mapping[str, Any],
    own: Mapping[str, Any],
    machine: str,
) -> TLSFiles:
    """Merge a machine's own keys over the mesh-wide ones and make the paths absolute."""
    paths: dict[str, Path | None] = {}
    keys: dict[str, str] = {}
    for name in _PATH_KEYS:
        if name in own:
            raw, keys[name] = own[name], f"{key}.{name}"
        elif name in base:
            raw, keys[name] = base[name], f"tls.{name}"
        else:
            paths[name] = None
            continue
        text = str(raw).replace("{machine}", machine) if machine else str(raw)
        paths[name] = root / text
    require = bool(own.get("require_client_cert", base.get("require_client_cert", False)))
    shown = key if own else "tls"
    if (paths["cert"] is None) != (paths["key"] is None):
        missing = "key" if paths["key"] is None else "cert"
        raise ConfigError(f"{where}: {shown}: cert and key go together; {missing} is missing")
    if require and paths["ca"] is None:
        raise ConfigError(
            f"{where}: {shown}: require_client_cert needs ca, the authority client"
            " certificates must be signed by"
        )
    return TLSFiles(paths["ca"], paths["cert"], paths["key"], require, where, keys)


def _machine_key(name: str) -> str:
    """The TOML key path of a machine, quoted when TOML would need quotes (as config.py)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return f"machines.{name}"
    return 'machines."' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
