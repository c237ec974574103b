"""Tests for mesh.config: reading mesh.toml, checking it, finding it, importing services."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.meshdir import config_error

from mesh.config import Config, MachineConfig, find_config, load_config
from mesh.errors import ConfigError, FlowFileError
from mesh.registry import import_services

FLOW_TSV = (
    "Request\tLog\tMachine\n"
    "login\tUser attempted login as :username\tclient\n"
    "login\tReceived request to login as :username\tserver\n"
    "login\tLogin successful\tclient\n"
)

INDEX_CSV = (
    "Request,Log,Machine\n"
    "index,Checking if signed in,server\n"
    "index,Sending sign in email,emailservice\n"
)

MACHINES = '[machines]\nclient = ""\nserver = "127.0.0.1:50052"\n'


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, making its folders; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def mesh_toml(folder: Path, body: str, flow: str = FLOW_TSV) -> Path:
    """A mesh.toml with ``body`` and a flow.tsv beside it; returns the config's path."""
    write(folder / "flow.tsv", flow)
    return write(folder / "mesh.toml", body)


@pytest.fixture
def imports() -> Iterator[None]:
    """Restore sys.path and sys.modules after a test imports service modules."""
    path = list(sys.path)
    modules = set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            del sys.modules[name]


def unique(prefix: str = "svc_cfg") -> str:
    """A module name no other test uses, so imports never hit a cached module."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# --- a good config -------------------------------------------------------------------------


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    """Only flow and machines given: the other keys take their documented defaults."""
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\n' + MACHINES)
    config = load_config(path)
    assert config.path == path
    assert config.root == tmp_path
    assert config.services == ()
    assert config.timeout == 30.0
    assert config.strict is True
    assert config.workers == 256
    assert config.grace == 10.0
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.max_flow_file_bytes == 4 * 1024 * 1024
    assert config.token is None
    assert not config.tls.enabled
    assert list(config.flows) == ["login"]
    assert config.machines["client"] == MachineConfig("client", "", "")
    assert config.machines["server"] == MachineConfig(
        "server", "127.0.0.1:50052", "127.0.0.1:50052"
    )


def test_full_config_reads_every_key(tmp_path: Path) -> None:
    """Every key of the documented example is read, machines kept in file order."""
    write(tmp_path / "auth.tsv", FLOW_TSV)
    write(tmp_path / "index.csv", INDEX_CSV)
    path = write(
        tmp_path / "mesh.toml",
        """\
        flow = ["auth.tsv", "index.csv"]
        services = ["services.auth", "services.index"]
        timeout = 5
        strict = false
        workers = 8
        grace = 2.5
        [machines]
        server = "127.0.0.1:50052"
        emailservice = "127.0.0.1:50053"
        client = ""
        [machines.auth]
        address = "auth.internal:50054"
        listen = "0.0.0.0:50054"
        """,
    )
    config = load_config(path)
    assert config.services == ("services.auth", "services.index")
    assert config.timeout == 5.0
    assert isinstance(config.timeout, float)
    assert config.strict is False
    assert config.workers == 8
    assert config.grace == 2.5
    assert list(config.machines) == ["server", "emailservice", "client", "auth"]
    assert config.machines["auth"] == MachineConfig("auth", "auth.internal:50054", "0.0.0.0:50054")
    assert set(config.flows) == {"login", "index"}


def test_config_is_frozen(tmp_path: Path) -> None:
    """A loaded config cannot be changed, neither its fields nor its machines."""
    config = load_config(mesh_toml(tmp_path, 'flow = "flow.tsv"\n' + MACHINES))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.machines["x"] = MachineConfig("x", "", "")  # type: ignore[index]


def test_config_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative config path is made absolute, so root does not depend on a later chdir."""
    mesh_toml(tmp_path, 'flow = "flow.tsv"\n' + MACHINES)
    monkeypatch.chdir(tmp_path)
    config = load_config("mesh.toml")
    assert config.path == tmp_path / "mesh.toml"
    assert config.root.is_absolute()


def test_flow_paths_are_relative_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flow files are found beside the config, whatever the working directory."""
    folder = tmp_path / "project"
    write(folder / "flows" / "login.tsv", FLOW_TSV)
    path = write(folder / "mesh.toml", 'flow = ["flows/login.tsv"]\n' + MACHINES)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert list(config.flows) == ["login"]


def test_a_list_of_flow_files_is_merged(tmp_path: Path) -> None:
    """Requests from every listed file end up in one flow set."""
    write(tmp_path / "auth.tsv", FLOW_TSV)
    write(tmp_path / "index.csv", INDEX_CSV)
    path = write(
        tmp_path / "mesh.toml",
        'flow = ["auth.tsv", "index.csv"]\n' + MACHINES + 'emailservice = "127.0.0.1:50053"\n',
    )
    config = load_config(path)
    assert list(config.flows) == ["login", "index"]
    assert config.flows.machines == ("client", "server", "emailservice")


def test_machines_no_flow_names_are_allowed(tmp_path: Path) -> None:
    """An extra machine in [machines] is fine: it may serve flows added later."""
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\n' + MACHINES + 'spare = "127.0.0.1:50060"\n')
    assert "spare" in load_config(path).machines


# --- find_config ---------------------------------------------------------------------------


def test_find_config_prefers_the_explicit_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-c wins over $MESH_CONFIG and ./mesh.toml."""
    explicit = write(tmp_path / "a" / "given.toml", "")
    env = write(tmp_path / "b" / "env.toml", "")
    write(tmp_path / "mesh.toml", "")
    monkeypatch.setenv("MESH_CONFIG", str(env))
    monkeypatch.chdir(tmp_path)
    assert find_config(explicit) == explicit


def test_find_config_uses_the_environment_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without -c, $MESH_CONFIG wins over ./mesh.toml."""
    env = write(tmp_path / "b" / "env.toml", "")
    write(tmp_path / "mesh.toml", "")
    monkeypatch.setenv("MESH_CONFIG", str(env))
    monkeypatch.chdir(tmp_path)
    assert find_config() == env


def test_find_config_falls_back_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without -c or $MESH_CONFIG, ./mesh.toml is used, as an absolute path."""
    local = write(tmp_path / "mesh.toml", "")
    monkeypatch.delenv("MESH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_config() == local


def test_find_config_treats_an_empty_variable_as_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MESH_CONFIG= (empty) falls through to ./mesh.toml."""
    local = write(tmp_path / "mesh.toml", "")
    monkeypatch.setenv("MESH_CONFIG", "")
    monkeypatch.chdir(tmp_path)
    assert find_config() == local


def test_find_config_names_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing found, the error names -c, MESH_CONFIG and the ./mesh.toml it looked for."""
    monkeypatch.delenv("MESH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        find_config()
    message = str(info.value)
    assert "-c" in message
    assert "$MESH_CONFIG" in message
    assert str(tmp_path / "mesh.toml") in message


def test_find_config_does_not_fall_through_a_missing_explicit_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A -c path that does not exist is an error, even with ./mesh.toml present."""
    write(tmp_path / "mesh.toml", "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="-c") as info:
        find_config("typo.toml")
    assert str(tmp_path / "typo.toml") in str(info.value)


def test_find_config_does_not_fall_through_a_missing_env_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $MESH_CONFIG that does not exist is an error, even with ./mesh.toml present."""
    write(tmp_path / "mesh.toml", "")
    monkeypatch.setenv("MESH_CONFIG", str(tmp_path / "gone.toml"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="MESH_CONFIG") as info:
        find_config()
    assert str(tmp_path / "gone.toml") in str(info.value)


def test_find_config_rejects_a_directory(tmp_path: Path) -> None:
    """-c naming a folder says so instead of failing later on read."""
    with pytest.raises(ConfigError, match="is a directory"):
        find_config(tmp_path)


# --- reading the file ----------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    """Loading a path that does not exist names it."""
    message = config_error(tmp_path / "mesh.toml")
    assert "no such config file" in message


def test_toml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error is one line with tomllib's position in it."""
    path = write(tmp_path / "mesh.toml", 'flow = "flow.tsv"\ntimeout = = 3\n')
    message = config_error(path)
    assert "invalid TOML" in message
    assert "line 2" in message
    assert "column" in message


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "mesh.toml"
    path.write_bytes(b'flow = "\xff"\n')
    assert "not UTF-8" in config_error(path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    """A typo in a key is an error that lists the known keys."""
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\ntimout = 5\n' + MACHINES)
    assert config_error(path) == (
        f"{path}: unknown key 'timout' "
        "(known: dedup_age, dedup_bytes, dedup_size, flow, grace, machines, max_flow_file_bytes,"
        " max_message_bytes, services, strict, timeout, tls, token_file, workers)"
    )


# --- flow ----------------------------------------------------------------------------------


def test_flow_missing(tmp_path: Path) -> None:
    """A config without flow names the key."""
    path = mesh_toml(tmp_path, MACHINES)
    assert "missing key flow" in config_error(path)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("3", "flow must be"),
        ("{ a = 1 }", "flow must be"),
        ("[]", "flow is an empty list"),
        ('["flow.tsv", 3]', "flow[1] must be a file name"),
        ('""', "flow is an empty file name"),
        ('["flow.tsv", "./flow.tsv"]', "flow[1] './flow.tsv' is the same file as flow[0]"),
    ],
)
def test_flow_of_the_wrong_shape(tmp_path: Path, value: str, fragment: str) -> None:
    """flow must be a non-empty string or a non-empty list of them, each file once."""
    path = mesh_toml(tmp_path, f"flow = {value}\n" + MACHINES)
    assert fragment in config_error(path)


def test_missing_flow_file_is_named(tmp_path: Path) -> None:
    """A flow file that does not exist is named as written and where it was looked for."""
    path = write(tmp_path / "mesh.toml", 'flow = ["flows/gone.tsv"]\n' + MACHINES)
    message = config_error(path)
    assert "flow[0]" in message
    assert "'flows/gone.tsv' does not exist" in message
    assert str(tmp_path / "flows" / "gone.tsv") in message


def test_flow_file_errors_propagate_unchanged(tmp_path: Path) -> None:
    """A malformed flow file raises the flow file's own PATH:ROW error."""
    bad = "Request\tLog\tMachine\nlogin\tonly two cells\n"
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\n' + MACHINES, flow=bad)
    with pytest.raises(FlowFileError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{tmp_path / 'flow.tsv'}:2: ")


def test_machine_missing_for_a_flow(tmp_path: Path) -> None:
    """A machine that runs a line but has no [machines] entry names the line and its row."""
    write(tmp_path / "index.csv", INDEX_CSV)
    path = write(tmp_path / "mesh.toml", 'flow = "index.csv"\n' + MACHINES)
    assert config_error(path) == (
        f"{path}: [machines] has no entry for 'emailservice', which runs index line 1 (index.csv:3)"
    )


# --- services ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"services.auth"', "services must be a list of module names"),
        ("[1]", "services[0] must be a module name"),
        ('["ok", "services/auth.py"]', "services[1] 'services/auth.py' is not a module name"),
        ('[""]', "services[0] '' is not a module name"),
    ],
)
def test_services_of_the_wrong_shape(tmp_path: Path, value: str, fragment: str) -> None:
    """services must be a list of dotted module names."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\nservices = {value}\n' + MACHINES)
    assert fragment in config_error(path)


# --- numbers and flags ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["timeout", "grace"])
@pytest.mark.parametrize("value", ["0", "-1", '"30"', "true", "inf", "nan", "[1]"])
def test_seconds_must_be_positive_numbers(tmp_path: Path, key: str, value: str) -> None:
    """timeout and grace reject zero, negatives, strings, booleans and non-finite numbers."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\n{key} = {value}\n' + MACHINES)
    assert f"{key} must be a positive number of seconds" in config_error(path)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "true", '"8"'])
def test_workers_must_be_a_positive_int(tmp_path: Path, value: str) -> None:
    """workers rejects zero, negatives, floats, booleans and strings."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\nworkers = {value}\n' + MACHINES)
    assert "workers must be a positive integer" in config_error(path)


@pytest.mark.parametrize("value", ['"yes"', "1", "0"])
def test_strict_must_be_a_bool(tmp_path: Path, value: str) -> None:
    """strict accepts only true or false."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\nstrict = {value}\n' + MACHINES)
    assert "strict must be true or false" in config_error(path)


@pytest.mark.parametrize("key", ["max_message_bytes", "max_flow_file_bytes"])
@pytest.mark.parametrize("value", ["0", "1000", "2147483648", "4.5", "true", '"4MiB"'])
def test_byte_limits_are_sane_integers(tmp_path: Path, key: str, value: str) -> None:
    """Size limits are whole bytes from 64 KiB up to what gRPC takes (a C int)."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\n{key} = {value}\n' + MACHINES)
    assert f"{key} must be a number of bytes from 65536 to 2147483647" in config_error(path)


def test_byte_limits_are_read(tmp_path: Path) -> None:
    """max_message_bytes and max_flow_file_bytes take the values given."""
    body = 'flow = "flow.tsv"\nmax_message_bytes = 65536\nmax_flow_file_bytes = 100000\n'
    config = load_config(mesh_toml(tmp_path, body + MACHINES))
    assert (config.max_message_bytes, config.max_flow_file_bytes) == (65536, 100000)


def test_flow_file_over_the_size_limit(tmp_path: Path) -> None:
    """A flow file past max_flow_file_bytes is refused before parsing, naming file and limit."""
    big = FLOW_TSV + "".join(f"bulk\tLine {i}\tserver\n" for i in range(5000))
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\nmax_flow_file_bytes = 65536\n' + MACHINES, big)
    with pytest.raises(FlowFileError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{tmp_path / 'flow.tsv'}: flow file is over the 65,536-byte limit"
        " (max_flow_file_bytes in mesh.toml)"
    )


# --- machines ------------------------------------------------------------------------------


def test_machines_missing(tmp_path: Path) -> None:
    """A config without [machines] says so."""
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\n')
    assert "missing [machines] table" in config_error(path)


def test_machines_not_a_table(tmp_path: Path) -> None:
    """machines = "..." is not a table."""
    path = mesh_toml(tmp_path, 'flow = "flow.tsv"\nmachines = "server"\n')
    assert "machines must be a table" in config_error(path)


@pytest.mark.parametrize("value", ["50052", '["127.0.0.1:50052"]', "true"])
def test_machine_entry_of_the_wrong_type(tmp_path: Path, value: str) -> None:
    """A machine is an address string or a table, nothing else."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\n[machines]\nclient = ""\nserver = {value}\n')
    assert "machines.server must be an address string or a table" in config_error(path)


def test_unknown_key_in_a_machine_table(tmp_path: Path) -> None:
    """A typo inside a machine table is caught like a top-level one."""
    body = 'flow = "flow.tsv"\n[machines]\nclient = ""\n[machines.server]\nadress = "h:1"\n'
    path = mesh_toml(tmp_path, body)
    assert (
        "machines.server: unknown key 'adress' (known: address, listen, replicas, tls)"
        in config_error(path)
    )


@pytest.mark.parametrize("key", ["address", "listen"])
def test_machine_table_values_must_be_strings(tmp_path: Path, key: str) -> None:
    """address and listen in a machine table are strings."""
    body = f'flow = "flow.tsv"\n[machines]\nclient = ""\n[machines.server]\n{key} = 50052\n'
    path = mesh_toml(tmp_path, body)
    assert f"machines.server.{key} must be a string" in config_error(path)


def test_machine_name_needing_quotes_is_shown_quoted(tmp_path: Path) -> None:
    """A machine key with a dot is shown as TOML would write it."""
    body = 'flow = "flow.tsv"\n' + MACHINES + '"eu.auth" = "localhost"\n'
    path = mesh_toml(tmp_path, body)
    assert 'machines."eu.auth": address' in config_error(path)


def test_table_without_address_is_a_pure_originator(tmp_path: Path) -> None:
    """An empty machine table means no address, like client = ""."""
    body = 'flow = "flow.tsv"\n[machines]\nserver = "127.0.0.1:50052"\n[machines.client]\n'
    config = load_config(mesh_toml(tmp_path, body))
    assert config.machines["client"] == MachineConfig("client", "", "")


# --- addresses -----------------------------------------------------------------------------


def server_is(tmp_path: Path, entry: str) -> Path:
    """A config whose server machine is ``entry`` (a TOML value)."""
    return mesh_toml(tmp_path, f'flow = "flow.tsv"\n[machines]\nclient = ""\nserver = {entry}\n')


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:50052",
        "localhost:1",
        "auth.internal:65535",
        "AUTH-1.example.com.:80",
        "[::1]:50052",
        "[::]:50052",
        "[2001:db8::1]:443",
        "0.0.0.0:8080",
    ],
)
def test_plain_addresses_listen_where_they_are_dialled(tmp_path: Path, address: str) -> None:
    """A plain host:port is both what peers dial and what the peer binds."""
    config = load_config(server_is(tmp_path, f'"{address}"'))
    assert config.machines["server"] == MachineConfig("server", address, address)


@pytest.mark.parametrize(
    "address",
    [
        "dns:///server.internal:50052",
        "dns://8.8.8.8/server.internal:50052",
        "dns:server.internal:50052",
        "ipv4:127.0.0.1:50052,127.0.0.2:50052",
        "ipv6:[::1]:50052",
        "unix:/tmp/mesh.sock",
        "unix:///tmp/mesh.sock",
        "unix-abstract:mesh",
        "xds:///server",
        "custom:///anything",
    ],
)
def test_grpc_targets_need_a_listen(tmp_path: Path, address: str) -> None:
    """A gRPC target with a scheme is dialled as is, and listen says where to bind."""
    entry = f'{{ address = "{address}", listen = "0.0.0.0:50052" }}'
    config = load_config(server_is(tmp_path, entry))
    assert config.machines["server"] == MachineConfig("server", address, "0.0.0.0:50052")


def test_grpc_target_without_listen(tmp_path: Path) -> None:
    """A target that is not a plain host:port cannot be bound, so listen must be given."""
    path = server_is(tmp_path, '"dns:///server.internal:50052"')
    assert config_error(path) == (
        f"{path}: machines.server: address 'dns:///server.internal:50052' is not a plain "
        'host:port, so give listen = "host:port"'
    )


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("localhost", "no :port"),
        ("host:99999", "port '99999' is not a number in 1-65535"),
        ("host:0", "port '0' is not a number in 1-65535"),
        ("host:port", "port 'port' is not a number in 1-65535"),
        ("host:", "no port after the ':'"),
        (":50052", "no host before the :port"),
        ("::1:50052", "an IPv6 host needs brackets"),
        ("[::1]", "no :port after the ']'"),
        ("[::1:50052", "'[' without ']'"),
        ("[server]:50052", "'server' in brackets is not an IPv6 address"),
        ("300.1.1.1:5", "'300.1.1.1' is not an IPv4 address"),
        ("bad_host!:5", "'bad_host!' is not a host name or IP address"),
        ("my host:5", "it contains whitespace"),
        ("dns:", "nothing follows dns:"),
        ("unix:///", "nothing follows unix:"),
    ],
)
def test_malformed_addresses(tmp_path: Path, address: str, reason: str) -> None:
    """An address that is neither host:port nor a gRPC target says what is wrong with it."""
    message = config_error(server_is(tmp_path, f'"{address}"'))
    assert f"machines.server: address {address!r} is malformed: {reason}" in message


def test_listen_differs_from_address(tmp_path: Path) -> None:
    """listen overrides where a plain-addressed peer binds."""
    entry = '{ address = "server.internal:50052", listen = "0.0.0.0:50052" }'
    config = load_config(server_is(tmp_path, entry))
    assert config.machines["server"].listen == "0.0.0.0:50052"


@pytest.mark.parametrize("listen", ["unix:/tmp/mesh.sock", "dns:///x:1", "0.0.0.0", "h:70000"])
def test_listen_must_be_a_plain_host_port(tmp_path: Path, listen: str) -> None:
    """What a peer binds is a host:port, never a target."""
    entry = f'{{ address = "server.internal:50052", listen = "{listen}" }}'
    message = config_error(server_is(tmp_path, entry))
    assert f"machines.server: listen {listen!r} is not a plain host:port" in message


def test_listen_without_address(tmp_path: Path) -> None:
    """A machine with no address never listens, so a listen there is a mistake."""
    message = config_error(server_is(tmp_path, '{ listen = "0.0.0.0:50052" }'))
    assert "machines.server: listen '0.0.0.0:50052' given but the address is empty" in message


def test_two_machines_on_one_port(tmp_path: Path) -> None:
    """Two peers that would bind the same host and port are refused."""
    body = (
        'flow = "flow.tsv"\n[machines]\nclient = ""\n'
        'server = "127.0.0.1:50052"\n'
        'other = { address = "other.internal:1", listen = "127.0.0.1:50052" }\n'
    )
    message = config_error(mesh_toml(tmp_path, body))
    assert "machines.other: listen '127.0.0.1:50052'" in message
    assert "machines.server" in message


@pytest.mark.parametrize(
    ("first", "second"),
    [("LocalHost:7000", "localhost.:7000"), ("[::0]:7000", "[0:0::]:7000")],
)
def test_same_port_is_recognised_however_spelled(tmp_path: Path, first: str, second: str) -> None:
    """Host names compare without case or trailing dot, IPv6 addresses by value."""
    body = f'flow = "flow.tsv"\n[machines]\nclient = ""\nserver = "{first}"\nb = "{second}"\n'
    assert "the same host and port" in config_error(mesh_toml(tmp_path, body))


def test_same_port_on_different_hosts_is_fine(tmp_path: Path) -> None:
    """Only an identical host and port clash."""
    body = (
        'flow = "flow.tsv"\n[machines]\nclient = ""\n'
        'server = "127.0.0.1:50052"\nb = "127.0.0.2:50052"\nc = "127.0.0.1:50053"\n'
    )
    assert len(load_config(mesh_toml(tmp_path, body)).machines) == 4


# --- import_services -----------------------------------------------------------------------


def with_services(tmp_path: Path, *modules: str) -> Config:
    """A loaded config in ``tmp_path`` whose services are ``modules``."""
    names = ", ".join(f'"{m}"' for m in modules)
    return load_config(mesh_toml(tmp_path, f'flow = "flow.tsv"\nservices = [{names}]\n' + MACHINES))


@pytest.mark.usefixtures("imports")
def test_import_services_imports_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules beside the config import whatever the working directory, package ones too."""
    plain, package = unique(), unique()
    write(tmp_path / f"{plain}.py", "LOADED = True\n")
    write(tmp_path / package / "__init__.py", "")
    write(tmp_path / package / "auth.py", "LOADED = 'auth'\n")
    config = with_services(tmp_path, plain, f"{package}.auth")
    monkeypatch.chdir(tmp_path.parent)
    import_services(config)
    assert sys.modules[plain].LOADED is True
    assert sys.modules[f"{package}.auth"].LOADED == "auth"


@pytest.mark.usefixtures("imports")
def test_import_services_puts_the_root_first_once(tmp_path: Path) -> None:
    """The config folder is first on sys.path, and only there once, however often it runs."""
    config = with_services(tmp_path)
    sys.path.append(str(tmp_path))
    import_services(config)
    import_services(config)
    assert sys.path[0] == str(tmp_path)
    assert sys.path.count(str(tmp_path)) == 1


@pytest.mark.usefixtures("imports")
def test_import_services_missing_module(tmp_path: Path) -> None:
    """A module that does not exist names the config, the key and the module."""
    name = unique()
    config = with_services(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        import_services(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{config.path}: services: cannot import {name!r}, no such module")
    assert f"ModuleNotFoundError: No module named {name!r}" in message


@pytest.mark.usefixtures("imports")
def test_import_services_module_that_raises(tmp_path: Path) -> None:
    """A module failing on import gives the cause's type, message and where it was raised."""
    name = unique()
    write(tmp_path / f"{name}.py", "x = 1\nraise ValueError('boom\\nsecond line')\n")
    config = with_services(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        import_services(config)
    assert str(info.value) == (
        f"{config.path}: services: importing {name!r} failed: "
        f"ValueError: boom second line (at {name}.py:2)"
    )
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.usefixtures("imports")
def test_import_services_module_missing_a_dependency(tmp_path: Path) -> None:
    """A service importing a missing module is a failed import, not a missing service."""
    name, dependency = unique(), unique("not_installed")
    write(tmp_path / f"{name}.py", f"import {dependency}\n")
    config = with_services(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        import_services(config)
    message = str(info.value)
    assert f"importing {name!r} failed: ModuleNotFoundError" in message
    assert dependency in message


@pytest.mark.usefixtures("imports")
def test_import_services_syntax_error(tmp_path: Path) -> None:
    """A service with a syntax error is reported in one line with its file and line."""
    name = unique()
    write(tmp_path / f"{name}.py", "def broken(:\n")
    config = with_services(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        import_services(config)
    message = str(info.value)
    assert "\n" not in message
    assert f"importing {name!r} failed: SyntaxError" in message
    assert "line 1" in message


@pytest.mark.usefixtures("imports")
def test_import_services_module_that_exits(tmp_path: Path) -> None:
    """A module calling sys.exit on import is reported, not allowed to end the process."""
    name = unique()
    write(tmp_path / f"{name}.py", "import sys\nsys.exit(3)\n")
    config = with_services(tmp_path, name)
    with pytest.raises(ConfigError, match="SystemExit: 3"):
        import_services(config)


def test_paths_in_messages_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors name the config by absolute path even when loaded by a relative one."""
    write(tmp_path / "mesh.toml", "flow = 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("mesh.toml")
    assert str(info.value).startswith(f"{tmp_path / 'mesh.toml'}: ")
    assert os.path.isabs(str(info.value).split(": ")[0])


# --- exactly-once record and replicas --------------------------------------------------------


def test_dedup_keys_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    """dedup_size and dedup_age default to 20000 entries and 300 s, and can be changed."""
    default = load_config(mesh_toml(tmp_path / "a", 'flow = "flow.tsv"\n' + MACHINES))
    assert (default.dedup_size, default.dedup_age) == (20_000, 300.0)
    body = 'flow = "flow.tsv"\ndedup_size = 50\ndedup_age = 1.5\n' + MACHINES
    config = load_config(mesh_toml(tmp_path / "b", body))
    assert (config.dedup_size, config.dedup_age) == (50, 1.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("dedup_size = 0", "dedup_size must be a positive integer, not 0"),
        ("dedup_size = 2.5", "dedup_size must be a positive integer, not 2.5"),
        ('dedup_size = "10"', "dedup_size must be a positive integer, not '10'"),
        ("dedup_age = -1", "dedup_age must be a positive number of seconds, not -1"),
        ("dedup_age = true", "dedup_age must be a positive number of seconds, not true"),
    ],
)
def test_dedup_keys_are_checked(tmp_path: Path, line: str, message: str) -> None:
    """A bad dedup_size or dedup_age is a one-line error naming the key and the value."""
    path = mesh_toml(tmp_path, f'flow = "flow.tsv"\n{line}\n' + MACHINES)
    assert config_error(path) == f"{path}: {message}"


def test_replicas_count_ports_up_from_the_address(tmp_path: Path) -> None:
    """replicas = 3 listens on three ports from the address's and dials all three."""
    config = load_config(server_is(tmp_path, '{ address = "127.0.0.1:50052", replicas = 3 }'))
    server = config.machines["server"]
    assert server.address == "ipv4:127.0.0.1:50052,127.0.0.1:50053,127.0.0.1:50054"
    assert server.binds == ("127.0.0.1:50052", "127.0.0.1:50053", "127.0.0.1:50054")
    assert server.listen == "127.0.0.1:50052"


def test_replicas_from_an_address_list(tmp_path: Path) -> None:
    """An ipv4: target listing host:ports is one replica per address, each bound there."""
    config = load_config(server_is(tmp_path, '"ipv4:127.0.0.1:50052,127.0.0.1:50062"'))
    server = config.machines["server"]
    assert server.address == "ipv4:127.0.0.1:50052,127.0.0.1:50062"
    assert server.binds == ("127.0.0.1:50052", "127.0.0.1:50062")


def test_replicas_listed_behind_a_dns_name(tmp_path: Path) -> None:
    """A dns: target with a listen list: one replica per listen address."""
    entry = (
        '{ address = "dns:///server.internal:50052", listen = ["0.0.0.0:50052", "0.0.0.0:50062"] }'
    )
    config = load_config(server_is(tmp_path, entry))
    assert config.machines["server"].binds == ("0.0.0.0:50052", "0.0.0.0:50062")
    assert config.machines["server"].address == "dns:///server.internal:50052"


def test_one_replica_is_a_plain_machine(tmp_path: Path) -> None:
    """replicas = 1 changes nothing: the address is dialled and bound as written."""
    config = load_config(server_is(tmp_path, '{ address = "127.0.0.1:50052", replicas = 1 }'))
    assert config.machines["server"] == MachineConfig(
        "server", "127.0.0.1:50052", "127.0.0.1:50052"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            '{ address = "127.0.0.1:50052", replicas = 0 }',
            "machines.server.replicas must be a positive integer, not 0",
        ),
        (
            '{ address = "127.0.0.1:65534", replicas = 3 }',
            "machines.server: replicas = 3 counted up from address '127.0.0.1:65534'"
            " would pass port 65535",
        ),
        (
            '{ address = "server.internal:50052", replicas = 2 }',
            "machines.server: replicas = 2 needs an IP address to count ports up from,"
            " not 'server.internal'",
        ),
        (
            '{ address = "ipv4:127.0.0.1:1,127.0.0.1:2", replicas = 3 }',
            "machines.server: replicas = 3 but address 'ipv4:127.0.0.1:1,127.0.0.1:2'"
            " lists 2 addresses",
        ),
        (
            '{ address = "dns:///s:1", listen = ["0.0.0.0:1"], replicas = 2 }',
            "machines.server: replicas = 2 but listen names 1 addresses",
        ),
        (
            '{ address = "dns:///s:1", listen = ["0.0.0.0:1", 5] }',
            "machines.server.listen[1] must be a string, not 5",
        ),
        (
            '{ address = "dns:///s:1", listen = [] }',
            "machines.server.listen is an empty list; name one address per replica",
        ),
        (
            '{ address = "", replicas = 2 }',
            "machines.server: replicas given but the address is empty",
        ),
    ],
)
def test_bad_replicas(tmp_path: Path, entry: str, message: str) -> None:
    """Each mistake in replicas is one line naming the machine's key."""
    path = server_is(tmp_path, entry)
    assert message in config_error(path)


def test_replicas_may_not_share_a_port_with_another_machine(tmp_path: Path) -> None:
    """A counted-up replica port that another machine binds is caught."""
    body = (
        'flow = "flow.tsv"\n[machines]\nclient = ""\n'
        'server = { address = "127.0.0.1:50052", replicas = 2 }\n'
        'other = "127.0.0.1:50053"\n'
    )
    message = config_error(mesh_toml(tmp_path, body))
    assert "machines.other: listen '127.0.0.1:50053' is the same host and port" in message
