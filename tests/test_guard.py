"""A peer under garbage: raw bytes and malformed requests over a real channel to a real peer.

Each bad call gets a clear gRPC status (never UNKNOWN or INTERNAL, which would mean an
exception of ours escaped), a message short enough to read, and the peer goes on serving
the next valid flow. One ``server`` peer serves the whole module (``login_server``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.meshdir import LOGIN_FLOW, MeshDir, password_of
from support.peers import Peer, Peers

import mesh
from mesh.config import load_config
from mesh.errors import ConfigError
from mesh.guard import CONTINUE, Guard
from mesh.token import Token, load_token
from mesh.v1 import mesh_pb2 as _pb2

Status = grpc.StatusCode

#: Statuses that mean the mesh handled the input on purpose.
EXPECTED = {
    Status.OK,
    Status.INVALID_ARGUMENT,
    Status.NOT_FOUND,
    Status.OUT_OF_RANGE,
    Status.FAILED_PRECONDITION,
    Status.PERMISSION_DENIED,
    Status.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def raw(login_server: tuple[MeshDir, Peer]) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """``raw(bytes) -> bytes``: Continue on the module's server, no serializer either way."""
    _, server = login_server
    with grpc.insecure_channel(server.address) as channel:
        yield channel.unary_unary(CONTINUE, request_serializer=None, response_deserializer=None)


@pytest.fixture(scope="module")
def digest(login_server: tuple[MeshDir, Peer]) -> str:
    return load_config(login_server[0].config).flows["login"].digest


def request(right_digest: str, /, **fields: object) -> bytes:
    """A valid call for login line 1 from client, with ``fields`` changed."""
    values: dict[str, object] = {
        "request": "login",
        "line_index": 1,
        "context": json.dumps({"username": "ada", "password": password_of("ada")}).encode(),
        "flow_id": "f" * 32,
        "digest": right_digest,
        "via": ["client"],
    }
    values.update(fields)
    return bytes(_pb2.ContinueRequest(**values).SerializeToString())  # type: ignore[arg-type]


def status_of(raw: grpc.UnaryUnaryMultiCallable, data: bytes) -> tuple[Status, str]:
    try:
        raw(data, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return Status.OK, ""


def assert_still_serves(login_server: tuple[MeshDir, Peer], connect: object) -> None:
    """The real originator runs a whole login through the peer afterwards."""
    mesh_dir, server = login_server
    assert server.alive()
    node = connect(mesh_dir.config, "client")  # type: ignore[operator]
    result = node.start("login", username="ada", password=password_of("ada"), timeout=30)
    assert result.context["session"] == "session-ada"


def case(name: str, make, code: Status, fragment: str):  # type: ignore[no-untyped-def]
    return pytest.param((make, code, fragment), id=name)


GARBAGE = [
    case("bytes", lambda d: b"\xff\xfe\xfd garbage", Status.INVALID_ARGUMENT, "not a mesh.v1"),
    case("request", lambda d: request(d, request="nosuch"), Status.NOT_FOUND, "no flow 'nosuch'"),
    case("index", lambda d: request(d, line_index=6), Status.OUT_OF_RANGE, "no line 6"),
    case("max-index", lambda d: request(d, line_index=2**32 - 1), Status.OUT_OF_RANGE, "6 lines"),
    case("json", lambda d: request(d, context=b"{not"), Status.INVALID_ARGUMENT, "bad context"),
    case("list", lambda d: request(d, context=b"[1]"), Status.INVALID_ARGUMENT, "not an object"),
    case("nan", lambda d: request(d, context=b'{"a": NaN}'), Status.INVALID_ARGUMENT, "NaN"),
    case("deep", lambda d: request(d, context=b"[" * 100_000), Status.INVALID_ARGUMENT, "deeply"),
    case(
        "huge-request",
        lambda d: request(d, request="x" * 1_000_000),
        Status.NOT_FOUND,
        "1,000,000 characters",
    ),
    case(
        "huge-flow-id",
        lambda d: request(d, flow_id="f" * 100_000),
        Status.INVALID_ARGUMENT,
        "flow_id of 100,000",
    ),
    case(
        "digest",
        lambda d: request(d, digest="0" * 16),
        Status.FAILED_PRECONDITION,
        "different version",
    ),
    case(
        "no-digest",
        lambda d: request(d, digest=""),
        Status.FAILED_PRECONDITION,
        "the call has none (mesh check prints a flow's digest)",
    ),
    case(
        "digest-before-access",  # another version's line 3 from client: say version, not access
        lambda d: request(d, digest="0" * 16, line_index=3),
        Status.FAILED_PRECONDITION,
        "different version",
    ),
    case("no-flow-id", lambda d: request(d, flow_id=""), Status.INVALID_ARGUMENT, "no flow_id"),
    # A flow_id is in every log line of its flow: no line break, space or non-ASCII in it.
    case(
        "flow-id-newline",
        lambda d: request(d, flow_id="f1\nforged line"),
        Status.INVALID_ARGUMENT,
        "flow_id 'f1\\nforged line' is not 1 to 256 printable ASCII characters",
    ),
    case(
        "flow-id-space",
        lambda d: request(d, flow_id="flow 1"),
        Status.INVALID_ARGUMENT,
        "without spaces",
    ),
    case(
        "flow-id-unicode",
        lambda d: request(d, flow_id="flöw-1"),
        Status.INVALID_ARGUMENT,
        "printable ASCII",
    ),
    case("via-twice", lambda d: request(d, via=["client"] * 2), Status.INVALID_ARGUMENT, "via"),
    case(
        "via-long",
        lambda d: request(d, via=[f"m{i}" for i in range(7)] + ["client"]),
        Status.INVALID_ARGUMENT,
        "longer than flow login has lines (6)",
    ),
    case("owner", lambda d: request(d, line_index=0), Status.FAILED_PRECONDITION, "client does"),
    case(
        "over-limit",
        lambda d: request(d, context=b" " * (5 * 1024 * 1024)),
        Status.RESOURCE_EXHAUSTED,
        "",
    ),
]


@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_gets_a_clear_status_and_the_peer_serves_on(
    case, raw, digest, login_server, connect
) -> None:
    """Each bad call gets its status and a short message; a valid login works after it."""
    make, code, fragment = case
    got, details = status_of(raw, make(digest))
    assert got == code, details
    assert fragment in details
    assert len(details) < 400
    assert_still_serves(login_server, connect)


def test_refusals_are_logged_with_their_reason(raw, digest, login_server) -> None:
    """The peer logs each refusal as a mesh.refused warning with code and reason."""
    status_of(raw, request(digest, request="logged-refusal"))
    _, server = login_server
    refused = [e for e in server.events() if e.get("event") == "mesh.refused"]
    assert any(
        e["code"] == "NOT_FOUND" and "logged-refusal" in e["reason"] and e["level"] == "warning"
        for e in refused
    )


_ANY_REQUEST = st.builds(
    dict,
    request=st.one_of(st.sampled_from(["login", "feed"]), st.text(max_size=30)),
    line_index=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    context=st.one_of(
        st.binary(max_size=64),
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8)).map(
            lambda d: json.dumps(d).encode()
        ),
    ),
    flow_id=st.text(max_size=40),
    digest=st.sampled_from(["", "right", "0" * 16]),
    via=st.lists(st.sampled_from(["client", "server", "", "x"]) | st.text(max_size=5), max_size=8),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fields=_ANY_REQUEST, junk=st.binary(max_size=200))
def test_fuzzed_calls_never_crash_the_peer(fields, junk, raw, digest) -> None:
    """Generated requests and random bytes get one of the statuses the mesh means to send."""
    if fields["digest"] == "right":
        fields["digest"] = digest
    for data in (request(digest, **fields), junk):
        got, details = status_of(raw, data)
        assert got in EXPECTED, (got, details)


def test_peer_serves_after_the_fuzz(login_server, connect) -> None:
    """After everything above, the shared peer still runs a whole login."""
    assert_still_serves(login_server, connect)


# --- limits --------------------------------------------------------------------------------

GROWING_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Setting session for :username")
def set_session(ctx):
    log.info("next", session="s" * 100_000)
"""


def test_a_reply_over_the_limit_is_a_step_error(mesh_dir: MeshDir, peers: Peers, connect) -> None:
    """A context that grows past max_message_bytes on a peer fails the flow with a
    ContextError naming size and limit, not a RESOURCE_EXHAUSTED read as "busy"."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(GROWING_SERVICE)
    mesh_dir.write_config({"client": False, "server": True}, extra="max_message_bytes = 65536")
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    with pytest.raises(mesh.ContextError) as info:
        node.start("login", username="ada", password="pw")
    assert isinstance(info.value, mesh.FlowError)
    assert info.value.machine == "server"
    assert "over the 65,536-byte limit (max_message_bytes in mesh.toml)" in str(info.value)
    assert server.alive()


# --- the token -----------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_other_mesh_methods_need_the_token_too(streaming: bool) -> None:
    """A method added to mesh.v1.Mesh later (served here by a stand-in) is token-checked by
    the guard as well: without the token it is UNAUTHENTICATED and never runs."""
    from concurrent import futures

    from mesh.flowfile import parse_flows

    ran: list[bytes] = []

    def other(request: bytes, context: grpc.ServicerContext) -> bytes:
        ran.append(request)
        return b"ran"

    def other_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        ran.append(request)
        yield b"ran"

    kind = (
        grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    )
    token = Token("the-right-token-0123", "test")
    guard = Guard("server", parse_flows(LOGIN_FLOW), token, 4 << 20)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handlers = guard.method_handlers({"Other": kind(other_stream if streaming else other)})
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("mesh.v1.Mesh", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = (channel.unary_stream if streaming else channel.unary_unary)(
                "/mesh.v1.Mesh/Other"
            )
            with pytest.raises(grpc.RpcError) as info:
                reply = call(b"x", timeout=30)
                if streaming:
                    list(reply)  # a stream's status arrives as it is read
            assert info.value.code() == Status.UNAUTHENTICATED
            assert ran == []
            reply = call(b"y", timeout=30, metadata=[token.header()])
            assert (list(reply) if streaming else [reply]) == [b"ran"]
            assert ran == [b"y"]
    finally:
        server.stop(None).wait()


def test_token_never_shows_itself() -> None:
    """repr and str of a token name where it came from, never the value."""
    token = Token("s3cret-token-value-0123", "$MESH_TOKEN")
    assert "s3cret" not in repr(token)
    assert "s3cret" not in str(token)
    assert "MESH_TOKEN" in repr(token)


def test_token_file_relative_to_the_config(tmp_path: Path, monkeypatch) -> None:
    """token_file is read relative to the config's folder, stripped of its newline."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    (tmp_path / "token").write_text("a-token-long-enough-1234\n")
    token = load_token("mesh.toml", tmp_path, {"token_file": "token"})
    assert token is not None
    assert token.header() == ("authorization", "Bearer a-token-long-enough-1234")


def test_env_token_wins_over_the_file(tmp_path: Path, monkeypatch) -> None:
    """$MESH_TOKEN is used when set, so a deployment can inject it."""
    monkeypatch.setenv("MESH_TOKEN", "from-the-environment-0123")
    token = load_token("mesh.toml", tmp_path, {"token_file": "missing"})
    assert token is not None
    assert token.header()[1].endswith("from-the-environment-0123")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "the token is empty"),
        ("tiny-tok", "shorter than 16"),
        ("has a space in the middle!", "printable ASCII"),
    ],
)
def test_bad_token_files(tmp_path: Path, monkeypatch, content: str, fragment: str) -> None:
    """A token file that is empty, short or not one word: ConfigError naming token_file,
    without quoting the token."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    (tmp_path / "token").write_text(content)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_token("/x/mesh.toml", tmp_path, {"token_file": "token"})
    assert "/x/mesh.toml: token_file" in str(info.value)
    if content:
        assert content not in str(info.value)


def test_missing_token_file(tmp_path: Path, monkeypatch) -> None:
    """A token file that does not exist is named, with the key."""
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"/x/mesh.toml: token_file: no such file .*nope"):
        load_token("/x/mesh.toml", tmp_path, {"token_file": "nope"})


def test_config_repr_hides_the_token(login_mesh: MeshDir, monkeypatch) -> None:
    """Printing a loaded Config never shows the token."""
    monkeypatch.setenv("MESH_TOKEN", "do-not-print-this-token")
    config = load_config(login_mesh.config)
    assert config.token is not None
    assert "do-not-print" not in repr(config)
    assert isinstance(mesh.MeshError(), Exception)


# --- the call chain (via) at the door ---------------------------------------------------------

CHAIN_FLOW = (
    "Request\tLog\tMachine\n"
    "chain\tChain started for :n\tserver\n"
    "chain\tChain audited for :n\taudit\n"
    "chain\tChain done for :n\tserver\n"
)

CHAIN_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("chain", "Chain started for :n")
def started(ctx):
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"started {ctx['n']}\\n")
    log.info("next", started=True)


@mesh.handler("chain", "Chain audited for :n")
def audited(ctx):
    with open(ctx["ledger"], "a", encoding="utf-8") as ledger:
        ledger.write(f"audited {ctx['n']}\\n")
    log.info("next", audited=True)
"""


@pytest.fixture
def chain(mesh_dir: MeshDir, peers: Peers) -> Iterator[tuple[Peer, Peer, Any]]:
    """server → audit → back to server, both real peers; (server, audit, raw Continue)."""
    mesh_dir.flow(CHAIN_FLOW)
    mesh_dir.service(CHAIN_SERVICE)
    mesh_dir.write_config({"server": True, "audit": True})
    audit = peers.start(mesh_dir, "audit")  # first: server's config needs its port
    server = peers.start(mesh_dir, "server")
    with grpc.insecure_channel(server.address) as channel:
        yield (
            server,
            audit,
            channel.unary_unary(CONTINUE, request_serializer=None, response_deserializer=None),
        )


def chain_call(mesh_dir: MeshDir, ledger: Path, **fields: object) -> bytes:
    values: dict[str, object] = {
        "request": "chain",
        "line_index": 0,
        "context": json.dumps({"n": 1, "ledger": str(ledger)}).encode(),
        "flow_id": "c" * 32,
        "digest": load_config(mesh_dir.config).flows["chain"].digest,
        "via": [],
    }
    values.update(fields)
    return bytes(_pb2.ContinueRequest(**values).SerializeToString())  # type: ignore[arg-type]


def test_a_call_with_no_via_is_a_caller_from_outside(
    chain, mesh_dir: MeshDir, tmp_path: Path
) -> None:
    """Line 0 with an empty via (a hand-written client that names no machine) runs the flow
    and gets its reply, like ``mesh call``; a retry gets the same reply and runs nothing again
    (before: every line ran, then the call failed UNKNOWN "Exception calling application",
    nothing in the peer's log, and a retry ran the lines again)."""
    server, audit, raw = chain
    ledger = tmp_path / "ledger.txt"
    data = chain_call(mesh_dir, ledger)
    first = _pb2.ContinueReply.FromString(raw(data, timeout=30))
    again = _pb2.ContinueReply.FromString(raw(data, timeout=30))
    assert first.WhichOneof("outcome") == "done", first
    assert json.loads(first.done.context)["audited"] is True
    assert [(s.line_index, s.machine) for s in first.steps] == [
        (0, "server"),
        (1, "audit"),
        (2, "server"),
    ]
    assert again == first
    assert ledger.read_text(encoding="utf-8").splitlines() == ["started 1", "audited 1"]
    assert server.alive() and audit.alive()


@pytest.mark.parametrize(
    "via", [["server"], ["client", "server"]], ids=["itself", "itself-after-another"]
)
def test_a_via_naming_the_receiver_is_refused_at_the_door(
    chain, mesh_dir: MeshDir, tmp_path: Path, via: list[str]
) -> None:
    """A call whose via names the machine it is sent to cannot come from a flow: refused
    INVALID_ARGUMENT, saying so, before any line runs (before: lines ran, and the flow failed
    two hops later with a confusing message)."""
    server, _, raw = chain
    ledger = tmp_path / "ledger.txt"
    got, details = status_of(raw, chain_call(mesh_dir, ledger, via=via))
    assert got == Status.INVALID_ARGUMENT, details
    assert "names server itself" in details
    assert not ledger.exists()
    assert [e["code"] for e in server.events() if e.get("event") == "mesh.refused"] == [
        "INVALID_ARGUMENT"
    ]


# --- values JSON cannot carry -----------------------------------------------------------------

UNENCODABLE = [
    pytest.param(b'{"n": 1, "bad": "\\ud83d"}', "'bad'", id="lone-surrogate-escaped"),
    pytest.param(b'{"n": 1, "bad": "\xed\xa0\xbd"}', "UTF-8", id="lone-surrogate-bytes"),
    pytest.param(b'{"n": 1, "bad": 1e400}', "'bad'", id="float-overflow"),
    pytest.param(b'{"n": 1, "bad": ' + b"7" * 5000 + b"}", "digits", id="int-of-5000-digits"),
    pytest.param(b'{"n": 1, "bad": [{"deep": "\\udead"}]}', "'bad'", id="nested-surrogate"),
    pytest.param(b'{"n": 1, "\\ud83d": 1}', "\\ud83d", id="surrogate-key"),
]


@pytest.mark.parametrize(("context", "fragment"), UNENCODABLE)
def test_a_context_json_cannot_carry_on_is_refused_at_the_door(
    chain, mesh_dir: MeshDir, tmp_path: Path, context: bytes, fragment: str
) -> None:
    """A context with a value that could not be sent on (a lone surrogate, a float that
    overflows to infinity, an int too long to print): INVALID_ARGUMENT naming the key before
    any handler runs (before: the handler ran, and the reply failed as UNKNOWN "Exception
    calling application", with nothing in the peer's log)."""
    server, audit, raw = chain
    ledger = tmp_path / "ledger.txt"
    context = context.replace(b'"n": 1', b'"n": 1, "ledger": ' + json.dumps(str(ledger)).encode())
    got, details = status_of(raw, chain_call(mesh_dir, ledger, context=context, via=["outside"]))
    assert got == Status.INVALID_ARGUMENT, details
    assert "bad context" in details
    assert fragment in details
    assert not ledger.exists()
    assert server.alive() and audit.alive()
