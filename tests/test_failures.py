"""What a failed flow reports: every field filled, the right line, the right cause.

Real peers in separate processes; the originator is ``mesh.connect`` in the test, or a raw
gRPC channel where the test reads the ``Failure`` message a peer sends up the chain.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.meshdir import LOGIN_FLOW, MeshDir, free_port
from support.peers import Peers

import mesh
from mesh.config import load_config
from mesh.v1 import mesh_pb2 as pb

# -- values JSON cannot carry --------------------------------------------------------------


def test_the_originator_refuses_a_value_json_cannot_carry(
    login_mesh: MeshDir, peers: Peers, connect
) -> None:
    """node.start with a lone surrogate or a 5,000-digit int in the context: ContextError
    naming the key, before anything is sent (before: a bare UnicodeEncodeError or ValueError
    out of node.start)."""
    server = peers.start(login_mesh, "server")
    node = connect(login_mesh.config, "client")
    for bad in ("\ud83d", 10**5000):
        with pytest.raises(mesh.ContextError, match=r"context key 'password'"):
            node.start("login", username="ada", password=bad, timeout=10)
    assert not [e for e in server.events() if e.get("request") == "login"]


BAD_VALUE_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Testing password for :username")
def test_password(ctx):
    if ctx["username"] == "next":
        log.info("next", verified="\\ud83d")  # through "next": checked there
    else:
        ctx["sneaky"] = 10 ** 5000  # behind "next"'s back: caught when the reply is made
        log.info("next", verified=True)
"""


@pytest.mark.parametrize(("username", "line"), [("next", 2), ("direct", 4)])
def test_a_handler_putting_a_value_json_cannot_carry_fails_its_step(
    mesh_dir: MeshDir, peers: Peers, connect, username: str, line: int
) -> None:
    """A handler that puts a lone surrogate in the context through "next", or a huge int
    straight into the dict: the flow fails with a ContextError step failure on server naming
    the key (before: UNKNOWN "Exception calling application", read at the originator as a
    refusal naming the line the call was for, with nothing in the peer's log)."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(BAD_VALUE_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    server = peers.start(mesh_dir, "server")
    node = connect(mesh_dir.config, "client")
    with pytest.raises(mesh.ContextError) as info:
        node.start("login", username=username, password="pw", timeout=10)
    error = info.value
    assert isinstance(error, mesh.FlowError)
    assert (error.machine, error.line_index, error.error_type) == ("server", line, "ContextError")
    key = "verified" if username == "next" else "sneaky"
    assert f"context key {key!r}" in str(error)
    failed = [e for e in server.events() if e.get("event") == "mesh.step_failed"]
    assert [e["line_index"] for e in failed] == [line]
    assert server.alive()


# -- a reply over the originator's own limit ----------------------------------------------

GROWING_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("login", "Setting session for :username")
def set_session(ctx):
    log.info("next", session="s" * 100_000)
"""


def test_a_reply_over_the_originators_limit_says_so(
    mesh_dir: MeshDir, peers: Peers, connect
) -> None:
    """The server (default 4 MiB limit) replies with a 100 kB context to a client whose
    max_message_bytes is 64 KiB: a ContextError saying the reply exceeded the limit, with both
    sizes (before: 'server … is busy'). The client says its limit when its link opens, so
    the server refuses to send it, failing the line that grew the context."""
    mesh_dir.flow(LOGIN_FLOW)
    mesh_dir.service(GROWING_SERVICE)
    mesh_dir.write_config({"client": False, "server": True})
    small = mesh_dir.write_config(
        {"client": False, "server": True}, name="small.toml", extra="max_message_bytes = 65536"
    )
    peers.start(mesh_dir, "server")
    node = connect(small, "client")
    with pytest.raises(mesh.ContextError) as info:
        node.start("login", username="ada", password="pw", timeout=10)
    message = str(info.value)
    assert "busy" not in message
    assert "the reply to the caller" in message
    assert "over the caller's 65,536-byte limit (max_message_bytes in its mesh.toml)" in message
    assert re.search(r"was 100,\d{3} bytes", message)  # 100 kB of session and the rest
    assert isinstance(info.value, mesh.FlowError)
    assert (info.value.machine, info.value.line_index) == ("server", 4)  # the last it ran


# -- every field of a Failure, for every kind ---------------------------------------------

FIELDS_FLOW = (
    "Request\tLog\tMachine\n"
    "fields\tStarting :n\tclient\n"
    "fields\tServer first :n\tserver\n"
    "fields\tServer second :n\tserver\n"
    "fields\tAuditing :n\taudit\n"
    "fields\tFinished :n\tclient\n"
)


def _raw_failure(address: str, config: Path) -> pb.Failure:
    """The Failure server sends up for line 1 (as client would call it)."""
    request = pb.ContinueRequest(
        request="fields",
        line_index=1,
        context=b'{"n":1}',
        flow_id="e" * 32,
        digest=load_config(config).flows["fields"].digest,
        via=["client"],
    )
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(
            "/mesh.v1.Mesh/Continue",
            request_serializer=pb.ContinueRequest.SerializeToString,
            response_deserializer=pb.ContinueReply.FromString,
        )
        reply = stub(request, timeout=30)
    assert reply.WhichOneof("outcome") == "failed", reply
    return reply.failed


@pytest.mark.parametrize("kind", ["UNAVAILABLE", "REFUSED"])
def test_a_failure_further_down_names_its_line_and_type(
    mesh_dir: MeshDir, peers: Peers, connect, kind: str
) -> None:
    """server's call to audit for line 3 fails: audit is down (UNAVAILABLE), or runs another
    version of the flow (REFUSED). The Failure server sends up names line 3 and the error's
    type, and the originator's PeerError carries request, flow id and line 3 (before: line 0,
    and no error_type for UNAVAILABLE)."""
    mesh_dir.flow(FIELDS_FLOW)
    audit_port = free_port()
    mesh_dir.write_config({"client": False, "server": True, "audit": f"127.0.0.1:{audit_port}"})
    server = peers.start(mesh_dir, "server")
    if kind == "REFUSED":
        mesh_dir.flow(FIELDS_FLOW.replace("Auditing :n", "Auditing :n again"), name="other.tsv")
        other = mesh_dir.write_config(
            {"client": False, "server": True, "audit": True}, flow="other.tsv", name="other.toml"
        )
        peers.start(mesh_dir, "audit", config=other)
    expected: dict[str, Any] = {
        "UNAVAILABLE": ("PeerUnavailable", mesh.PeerUnavailable),
        "REFUSED": ("PeerRefused", mesh.PeerRefused),
    }
    error_type, cls = expected[kind]

    failure = _raw_failure(server.address, mesh_dir.config)
    assert pb.Failure.Kind.Name(failure.kind) == kind
    assert (failure.machine, failure.line_index, failure.error_type) == ("audit", 3, error_type)
    assert failure.address == f"127.0.0.1:{audit_port}"
    assert "line 3" in failure.message

    node = connect(mesh_dir.config, "client")
    with pytest.raises(cls) as info:
        node.start("fields", n=1, timeout=10)
    error = info.value
    assert (error.machine, error.request, error.line_index) == ("audit", "fields", 3)
    assert len(error.flow_id) == 32
    assert error.address == f"127.0.0.1:{audit_port}"
    assert json.dumps(str(error))  # one readable line
