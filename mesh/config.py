"""Read ``mesh.toml``: which flow files, which service modules, and where each machine lives.

Every mistake becomes a one-line :class:`ConfigError` that starts with the config's path and
names the key. A typo here would otherwise surface much later, on another machine, as a peer that
never answers; so unknown keys are errors, not ignored, and every machine a flow file names must
have an entry.

Loading is pure but for reading the config and its flow files: nothing is dialled or bound, and
service modules are only imported by :func:`mesh.registry.import_services`, when a caller asks.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from mesh.addresses import (
    ADDRESS_FORMS,
    address_problem,
    count_up,
    host_port,
    host_port_problem,
    is_ip_literal,
    is_target,
    listed_replicas,
    listed_target,
)
from mesh.deadlines import MAX_SECONDS
from mesh.errors import ConfigError
from mesh.flowfile import DEFAULT_MAX_FLOW_FILE_BYTES, FlowSet, Line, load_flows
from mesh.tls import TLSConfig, parse_tls
from mesh.token import Token, load_token
from mesh.wire import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "Config",
    "JournalConfig",
    "MachineConfig",
    "check_machine",
    "duration",
    "find_config",
    "load_config",
]

_FILENAME = "mesh.toml"

#: Bytes of replies a peer keeps for retries (dedup.py) unless ``dedup_bytes`` says otherwise.
DEFAULT_DEDUP_BYTES = 64 * 1024 * 1024
_ENV = "MESH_CONFIG"

_TOP_KEYS = frozenset(
    {
        "flow",
        "services",
        "timeout",
        "strict",
        "workers",
        "grace",
        "machines",
        "dedup_size",
        "dedup_age",
        "dedup_bytes",
        "max_calls",
        "link_window",
        "max_depth",
        "max_fan_out",
        "durable",
        "journal",
        "requests",
    }
    | {"tls", "token_file", "max_message_bytes", "max_flow_file_bytes"}  # mesh/tls.py, token.py
)
_MACHINE_KEYS = frozenset({"address", "listen", "replicas", "tls"})  # tls: read by mesh/tls.py
_TLS_KEYS = frozenset({"ca", "cert", "key", "require_client_cert"})  # mesh/tls.py checks them
_JOURNAL_KEYS = frozenset({"url", "keep", "synchronous"})
_REQUEST_KEYS = frozenset({"timeout"})

#: Where a machine's journal is, unless ``[journal] url`` says otherwise: relative to mesh.toml.
DEFAULT_JOURNAL_URL = "sqlite:///.mesh-data/{machine}.db"
#: How long finished durable flows stay in the journal unless ``[journal] keep`` says.
DEFAULT_KEEP = 7 * 24 * 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """Where one machine is reached and where its peer binds.

    ``address`` and ``listen`` differ when peers dial a name (a load balancer, a DNS name) that is
    not what the process itself can bind. ``address == ""`` marks a pure originator: it starts
    flows but never listens, so no other machine can call it.
    """

    name: str
    address: str
    listen: str
    #: Where each replica binds, when the machine has more than one (``listen`` is the first).
    replicas: tuple[str, ...] = ()

    @property
    def binds(self) -> tuple[str, ...]:
        """Where each of the machine's peers binds: one per replica; none for an originator."""
        if self.replicas:
            return self.replicas
        return (self.listen,) if self.listen else ()


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """Where a machine keeps the journal of its durable flows, and for how long.

    ``url`` is ``sqlite:///PATH`` (relative to mesh.toml unless absolute; ``{machine}`` is
    the machine's name) or ``postgresql://...`` (shared by a machine's replicas).
    """

    url: str = DEFAULT_JOURNAL_URL
    keep: float = DEFAULT_KEEP
    synchronous: str = "full"  # or "normal": SQLite's PRAGMA synchronous in WAL mode


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded, checked ``mesh.toml``; its flow files are already read and cross-checked."""

    path: Path
    flows: FlowSet
    services: tuple[str, ...]
    machines: Mapping[str, MachineConfig]
    timeout: float = 30.0
    strict: bool = True
    workers: int = 256  # threads for synchronous handlers, per peer
    # Steps a peer runs at once (a flow waiting for another machine does not count);
    # beyond it a call is refused as busy.
    max_calls: int = 20_000
    # Calls a node has in flight on one link to one replica; beyond it, on every link of
    # a machine, a call is refused as busy.
    link_window: int = 20_000
    grace: float = 10.0
    # Control flow (docs/control-flow.md): how deep sub-flows may nest (a request that
    # calls itself loops at most this many times), and how many runs of an ``Each`` row
    # one machine has in flight at once.
    max_depth: int = 16
    max_fan_out: int = 32
    tls: TLSConfig = field(default_factory=TLSConfig)
    token: Token | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_flow_file_bytes: int = DEFAULT_MAX_FLOW_FILE_BYTES
    dedup_size: int = 20_000
    dedup_age: float = 300.0
    dedup_bytes: int = DEFAULT_DEDUP_BYTES
    #: Requests whose flows are journaled (``durable = true`` or a list of names).
    durable: frozenset[str] = frozenset()
    journal: JournalConfig = field(default_factory=JournalConfig)
    #: ``[requests.NAME] timeout``: a request's own default deadline, in seconds.
    request_timeouts: Mapping[str, float] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The config's folder: flow paths and service modules are found relative to it."""
        return self.path.parent

    def timeout_of(self, request: str) -> float:
        """The default deadline of a flow of ``request``: its own, else ``timeout``."""
        return self.request_timeouts.get(request, self.timeout)

    def journal_url(self, machine: str) -> str:
        """``[journal] url`` for ``machine``: ``{machine}`` filled in, a relative SQLite path
        made absolute against the config's folder."""
        url = self.journal.url.replace("{machine}", machine)
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            if not path.is_absolute():
                path = self.root / path
            return f"sqlite:///{path}"
        return url


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Pick the config: ``-c PATH``, else ``$MESH_CONFIG``, else ``./mesh.toml``.

    A path that was asked for (by ``-c`` or the variable) but does not exist is an error rather
    than a fall-through, so a typo never quietly loads some other mesh's config.
    """
    if explicit is not None:
        return _existing(Path(explicit), "given with -c")
    env = os.environ.get(_ENV, "")
    if env:
        return _existing(Path(env), f"from ${_ENV}")
    local = Path(_FILENAME)
    if local.is_file():
        return _absolute(local)
    raise ConfigError(
        f"no {_FILENAME}: none given with -c, ${_ENV} is not set, "
        f"and {_absolute(local)} does not exist"
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check ``mesh.toml`` and the flow files it names; raise the first problem found."""
    config_path = _absolute(Path(path))
    where = str(config_path)
    data = _read_toml(config_path)

    _check_placement(where, data)
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: {_unknown_key(key, _TOP_KEYS)}")

    flow_paths = _flow_paths(where, config_path.parent, data)
    services = _services(where, data)
    timeout = _seconds(where, data, "timeout", 30.0)
    grace = _seconds(where, data, "grace", 10.0)
    workers = _positive_int(where, data, "workers", 256)
    max_calls = _positive_int(where, data, "max_calls", 20_000)
    link_window = _positive_int(where, data, "link_window", 20_000)
    max_depth = _positive_int(where, data, "max_depth", 16)
    max_fan_out = _positive_int(where, data, "max_fan_out", 32)
    dedup_size = _positive_int(where, data, "dedup_size", 20_000)
    dedup_age = _seconds(where, data, "dedup_age", 300.0)
    dedup_bytes = _byte_budget(where, data, "dedup_bytes", DEFAULT_DEDUP_BYTES)
    strict = _strict(where, data)
    machines = _machines(where, data)
    max_message_bytes = _bytes(where, data, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    max_flow_file_bytes = _bytes(where, data, "max_flow_file_bytes", DEFAULT_MAX_FLOW_FILE_BYTES)
    tls = parse_tls(where, config_path.parent, data)
    token = load_token(where, config_path.parent, data)
    journal = _journal(where, data)

    # Config keys are checked before flow files are read: they are cheaper to fix first.
    flows = load_flows(flow_paths, max_bytes=max_flow_file_bytes)
    _check_flow_machines(where, config_path.parent, flows, machines)
    durable = _durable(where, data, flows)
    request_timeouts = _request_timeouts(where, data, flows)

    return Config(
        path=config_path,
        flows=flows,
        services=services,
        machines=MappingProxyType(machines),
        timeout=timeout,
        strict=strict,
        workers=workers,
        max_calls=max_calls,
        link_window=link_window,
        max_depth=max_depth,
        max_fan_out=max_fan_out,
        grace=grace,
        tls=tls,
        token=token,
        max_message_bytes=max_message_bytes,
        max_flow_file_bytes=max_flow_file_bytes,
        dedup_size=dedup_size,
        dedup_age=dedup_age,
        dedup_bytes=dedup_bytes,
        durable=durable,
        journal=journal,
        request_timeouts=MappingProxyType(request_timeouts),
    )


# --- reading -------------------------------------------------------------------------------


def _absolute(path: Path) -> Path:
    """Absolute and normalised, but symlinks kept: flow paths are relative to where it appears."""
    return Path(os.path.abspath(path))


def _existing(path: Path, how: str) -> Path:
    if path.is_file():
        return _absolute(path)
    what = "is a directory, not a config file" if path.is_dir() else "does not exist"
    raise ConfigError(f"{_absolute(path)}: config {how} {what}")


def _read_toml(path: Path) -> dict[str, object]:
    where = str(path)
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: no such config file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{where}: is a directory, not a config file") from exc
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {_one_line(str(exc))}") from exc


# --- top-level keys ------------------------------------------------------------------------


def _flow_paths(where: str, root: Path, data: Mapping[str, object]) -> list[Path]:
    if "flow" not in data:
        raise ConfigError(f'{where}: missing key flow (the flow file(s), e.g. flow = "flow.tsv")')
    raw = data["flow"]
    if isinstance(raw, str):
        items: list[tuple[str, object]] = [("flow", raw)]
    elif isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{where}: flow is an empty list; name at least one flow file")
        items = [(f"flow[{i}]", item) for i, item in enumerate(raw)]
    else:
        raise ConfigError(
            f"{where}: flow must be a file name or a list of file names, not {_show(raw)}"
        )

    paths: list[Path] = []
    seen: dict[Path, str] = {}
    for key, item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {key} must be a file name (a string), not {_show(item)}")
        if not item:
            raise ConfigError(f"{where}: {key} is an empty file name")
        path = _absolute(root / item)
        if path in seen:
            raise ConfigError(f"{where}: {key} {item!r} is the same file as {seen[path]}")
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"{where}: {key}: flow file {item!r} {what} ({path})")
        seen[path] = key
        paths.append(path)
    return paths


def _services(where: str, data: Mapping[str, object]) -> tuple[str, ...]:
    raw = data.get("services", [])
    if not isinstance(raw, list):
        raise ConfigError(
            f"{where}: services must be a list of module names, like "
            f'["services.auth"], not {_show(raw)}'
        )
    names: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ConfigError(
                f"{where}: services[{i}] must be a module name (a string), not {_show(item)}"
            )
        # Caught here, not at import: "services/auth.py" would only fail on a peer, much later.
        if not item or not all(part.isidentifier() for part in item.split(".")):
            raise ConfigError(
                f"{where}: services[{i}] {item!r} is not a module name "
                f"(dotted identifiers, like services.auth)"
            )
        names.append(item)
    return tuple(names)


def _seconds(where: str, data: Mapping[str, object], key: str, default: float) -> float:
    value = data.get(key, default)
    # bool is an int to Python, but "timeout = true" is a mistake, not one second.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{where}: {key} must be a positive number of seconds, not {_show(value)}"
        )
    return min(float(value), MAX_SECONDS)  # more than gRPC can carry: waiting "for ever"


def _positive_int(where: str, data: Mapping[str, object], key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, not {_show(value)}")
    return value


def _bytes(where: str, data: Mapping[str, object], key: str, default: int) -> int:
    value = data.get(key, default)
    # gRPC takes a message limit as a C int; below 64 KiB no real flow would fit.
    if isinstance(value, bool) or not isinstance(value, int) or not 64 * 1024 <= value <= 2**31 - 1:
        raise ConfigError(
            f"{where}: {key} must be a number of bytes from 65536 to 2147483647, not {_show(value)}"
        )
    return value


def _byte_budget(where: str, data: Mapping[str, object], key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 64 * 1024:
        raise ConfigError(
            f"{where}: {key} must be a number of bytes, at least 65536, not {_show(value)}"
        )
    return value


def _strict(where: str, data: Mapping[str, object]) -> bool:
    value = data.get("strict", True)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: strict must be true or false, not {_show(value)}")
    return value


def duration(value: object) -> float | None:
    """Seconds in ``value``: a positive number, or a string like ``"30s"``, ``"10m"``,
    ``"2h"``, ``"7d"`` (no unit: seconds); None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match is None:
            return None
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_SECONDS)


def _duration(where: str, key: str, value: object) -> float:
    seconds = duration(value)
    if seconds is None:
        raise ConfigError(
            f"{where}: {key} must be a positive duration (seconds, or a string like"
            f' "30s", "10m", "2h", "7d"), not {_show(value)}'
        )
    return seconds


def _durable(where: str, data: Mapping[str, object], flows: FlowSet) -> frozenset[str]:
    value = data.get("durable", False)
    if isinstance(value, bool):
        return frozenset(flows) if value else frozenset()
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: durable must be true, false or a list of request names, not {_show(value)}"
        )
    names: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{where}: durable[{i}] must be a request name, not {_show(item)}")
        if item not in flows.flows:
            hint = _did_you_mean(item, flows) or f" (known: {', '.join(flows) or 'none'})"
            raise ConfigError(f"{where}: durable[{i}]: no request {item!r} in the flow files{hint}")
        names.add(item)
    return frozenset(names)


def _journal(where: str, data: Mapping[str, object]) -> JournalConfig:
    raw = data.get("journal", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: journal must be a table ([journal]), not {_show(raw)}")
    for k in raw:
        if k not in _JOURNAL_KEYS:
            raise ConfigError(f"{where}: journal: {_unknown_key(k, _JOURNAL_KEYS)}")
    url = raw.get("url", DEFAULT_JOURNAL_URL)
    if not isinstance(url, str) or not url.startswith(
        ("sqlite:///", "postgresql://", "postgres://")
    ):
        raise ConfigError(
            f"{where}: journal.url must be a string starting sqlite:/// or postgresql://,"
            f" not {_show(url)}"
        )
    if url.startswith("sqlite:///") and len(url) == len("sqlite:///"):
        raise ConfigError(f"{where}: journal.url {url!r} names no file")
    keep = _duration(where, "journal.keep", raw.get("keep", DEFAULT_KEEP))
    synchronous = raw.get("synchronous", "full")
    if synchronous not in ("full", "normal"):
        raise ConfigError(
            f'{where}: journal.synchronous must be "full" or "normal", not {_show(synchronous)}'
        )
    return JournalConfig(url=url, keep=keep, synchronous=str(synchronous))


def _request_timeouts(where: str, data: Mapping[str, object], flows: FlowSet) -> dict[str, float]:
    raw = data.get("requests", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: requests must be a table ([requests.NAME]), not {_show(raw)}")
    out: dict[str, float] = {}
    for name, entry in raw.items():
        if name not in flows.flows:
            hint = _did_you_mean(name, flows) or f" (known: {', '.join(flows) or 'none'})"
            raise ConfigError(
                f"{where}: requests.{name}: no request {name!r} in the flow files{hint}"
            )
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: requests.{name} must be a table, not {_show(entry)}")
        for k in entry:
            if k not in _REQUEST_KEYS:
                raise ConfigError(f"{where}: requests.{name}: {_unknown_key(k, _REQUEST_KEYS)}")
        if "timeout" in entry:
            out[name] = _duration(where, f"requests.{name}.timeout", entry["timeout"])
    return out


# --- machines ------------------------------------------------------------------------------


def _machines(where: str, data: Mapping[str, object]) -> dict[str, MachineConfig]:
    if "machines" not in data:
        raise ConfigError(
            f"{where}: missing [machines] table (each machine's address, "
            f'e.g. server = "127.0.0.1:50052")'
        )
    raw = data["machines"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: machines must be a table ([machines]), not {_show(raw)}")

    machines: dict[str, MachineConfig] = {}
    bound: dict[tuple[str, int], str] = {}
    for name, entry in raw.items():
        machine = _machine(where, name, entry)
        for listen in machine.binds:
            endpoint = host_port(listen)
            if endpoint in bound:
                raise ConfigError(
                    f"{where}: {_key(name)}: listen {listen!r} is the same host and port "
                    f"as {bound[endpoint]}'s; two peers would silently share a port"
                )
            bound[endpoint] = _key(name)
        machines[name] = machine
    return machines


def _machine(where: str, name: str, entry: object) -> MachineConfig:
    key = _key(name)
    raw_listen: object = ""
    count: int | None = None
    if isinstance(entry, str):
        address = entry
    elif isinstance(entry, dict):
        for k in entry:
            if k not in _MACHINE_KEYS:
                raise ConfigError(f"{where}: {key}: {_unknown_key(k, _MACHINE_KEYS)}")
        raw_address = entry.get("address", "")
        if not isinstance(raw_address, str):
            raise ConfigError(f"{where}: {key}.address must be a string, not {_show(raw_address)}")
        address = raw_address
        raw_listen = entry.get("listen", "")
        if not isinstance(raw_listen, str | list):
            raise ConfigError(
                f"{where}: {key}.listen must be a string (or a list, one per replica),"
                f" not {_show(raw_listen)}"
            )
        if "replicas" in entry:
            count = entry["replicas"]
            if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
                raise ConfigError(
                    f"{where}: {key}.replicas must be a positive integer, not {_show(count)}"
                )
    else:
        raise ConfigError(
            f"{where}: {key} must be an address string or a table "
            f"(address, listen, replicas), not {_show(entry)}"
        )

    if not address:
        if raw_listen:
            raise ConfigError(
                f"{where}: {key}: listen {_show(raw_listen)} given but the address is empty; "
                f"a machine without an address is a pure originator and never listens"
            )
        if count is not None:
            raise ConfigError(
                f"{where}: {key}: replicas given but the address is empty; "
                f"a machine without an address is a pure originator and never listens"
            )
        return MachineConfig(name, "", "")

    problem = address_problem(address)
    if problem is not None:
        raise ConfigError(
            f"{where}: {key}: address {address!r} is malformed: {problem} ({ADDRESS_FORMS})"
        )
    if isinstance(raw_listen, list):
        binds = _listen_list(where, key, raw_listen)
        if count is not None and count != len(binds):
            raise ConfigError(
                f"{where}: {key}: replicas = {count} but listen names {len(binds)} addresses"
            )
        return _with_replicas(name, address, binds)
    listen = str(raw_listen)
    if listen:
        problem = host_port_problem(listen)
        if problem is not None:
            raise ConfigError(
                f"{where}: {key}: listen {listen!r} is not a plain host:port: {problem}"
            )
        return _with_replicas(name, address, _count_up(where, key, "listen", listen, count))
    listed = listed_replicas(address)
    if listed is not None:
        if count is not None and count != len(listed):
            raise ConfigError(
                f"{where}: {key}: replicas = {count} but address {address!r}"
                f" lists {len(listed)} addresses"
            )
        return _with_replicas(name, address, listed)
    if is_target(address):
        raise ConfigError(
            f"{where}: {key}: address {address!r} is not a plain host:port, "
            f'so give listen = "host:port"'
        )
    binds = _count_up(where, key, "address", address, count)
    if len(binds) > 1:
        host, _ = host_port(address)
        if not is_ip_literal(host):
            raise ConfigError(
                f"{where}: {key}: replicas = {count} needs an IP address to count ports up"
                f" from, not {host!r}; list them instead, e.g. address ="
                f' "dns:///{host}:PORT" with listen = ["HOST:PORT", …]'
            )
        address = listed_target(binds)
    return _with_replicas(name, address, binds)


def _with_replicas(name: str, address: str, binds: list[str]) -> MachineConfig:
    return MachineConfig(name, address, binds[0], tuple(binds) if len(binds) > 1 else ())


def _count_up(where: str, key: str, what: str, base: str, count: int | None) -> list[str]:
    """``count`` host:port addresses from ``base``, the port counted up by one each."""
    try:
        return count_up(base, count)
    except ValueError:
        raise ConfigError(
            f"{where}: {key}: replicas = {count} counted up from {what} {base!r}"
            f" would pass port 65535"
        ) from None


def _listen_list(where: str, key: str, raw: list[object]) -> list[str]:
    if not raw:
        raise ConfigError(f"{where}: {key}.listen is an empty list; name one address per replica")
    binds: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {key}.listen[{i}] must be a string, not {_show(item)}")
        problem = host_port_problem(item)
        if problem is not None:
            raise ConfigError(
                f"{where}: {key}: listen[{i}] {item!r} is not a plain host:port: {problem}"
            )
        binds.append(item)
    return binds


def _check_flow_machines(
    where: str, root: Path, flows: FlowSet, machines: Mapping[str, MachineConfig]
) -> None:
    """Every machine a flow names needs an entry, or the flow would stall at runtime."""
    for machine in flows.machines:
        if machine in machines:
            continue
        line = _first_line_on(flows, machine)
        runs = ""
        if line is not None:
            runs = (
                f", which runs {line.request} line {line.index} "
                f"({_shown_path(line.path, root)}:{line.row})"
            )
        # A machine the flows never name is most likely the same one, misspelt.
        unused = [m for m in machines if m not in flows.machines]
        hint = _did_you_mean(machine, unused) or _did_you_mean(machine, machines)
        raise ConfigError(f"{where}: [machines] has no entry for {machine!r}{runs}{hint}")


def check_machine(config: Config, machine: str) -> None:
    """Raise a ConfigError naming ``machine`` when the config has no such machine.

    For commands that take a machine's name (``mesh peer NAME``, ``mesh call --as NAME``),
    before they start anything: a misspelt name gets the closest one suggested.
    """
    if machine in config.machines:
        return
    known = ", ".join(config.machines) or "none"
    hint = _did_you_mean(machine, config.machines)
    raise ConfigError(
        f"{config.path}: machine {machine!r} is not in [machines]{hint or f' (known: {known})'}"
    )


def _first_line_on(flows: FlowSet, machine: str) -> Line | None:
    for request in flows:
        for line in flows[request].lines:
            if line.machine == machine:
                return line
    return None


# --- key checks ----------------------------------------------------------------------------


def _check_placement(where: str, data: Mapping[str, object]) -> None:
    """Catch a top-level key written after a table header, where TOML files it in the table.

    ``timeout = 5`` after ``[machines]`` is read as a machine called timeout, and
    ``token_file`` after ``[tls]`` as a TLS setting; either would otherwise be reported as
    something wrong with that table, which sends the author looking in the wrong place.
    """
    tables: list[tuple[str, object, frozenset[str]]] = [
        ("tls", data.get("tls"), _TLS_KEYS),
        ("journal", data.get("journal"), _JOURNAL_KEYS),
    ]
    machines = data.get("machines")
    if isinstance(machines, dict):
        for name, entry in machines.items():
            if name in _TOP_KEYS and not _looks_like_machine(entry):
                raise ConfigError(f"{where}: {_misplaced(name, entry, 'machines')}")
            if isinstance(entry, dict):
                tables.append((_key(name), entry, _MACHINE_KEYS))
                tables.append((f"{_key(name)}.tls", entry.get("tls"), _TLS_KEYS))
    for table, raw, known in tables:
        if isinstance(raw, dict):
            for k, value in raw.items():
                if k in _TOP_KEYS and k not in known:
                    raise ConfigError(f"{where}: {_misplaced(k, value, table)}")


def _looks_like_machine(entry: object) -> bool:
    """A table, or an address string: what a machine entry under ``[machines]`` can be."""
    if isinstance(entry, dict):
        return True
    return isinstance(entry, str) and (not entry or address_problem(entry) is None)


def _misplaced(key: str, value: object, table: str) -> str:
    return (
        f"{key} = {_show(value)} comes after [{table}], so TOML reads it as {table}.{key};"
        f" {key} is a top-level key: move it above the first [table]"
    )


def _unknown_key(key: str, known: frozenset[str]) -> str:
    """``unknown key 'timout' (did you mean 'timeout'?)``, else the keys there are."""
    hint = _did_you_mean(key, known) or f" (known: {', '.join(sorted(known))})"
    return f"unknown key {key!r}{hint}"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- messages ------------------------------------------------------------------------------


def _key(name: str) -> str:
    """The TOML key path of a machine, quoted when TOML would need quotes."""
    if _BARE_KEY_RE.fullmatch(name):
        return f"machines.{name}"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'machines."{escaped}"'


def _show(value: object) -> str:
    """A value as the TOML author wrote it, short enough for a one-line message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shown_path(path: str, root: Path) -> str:
    """A path as the author wrote it: relative to the config's folder when inside it."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
