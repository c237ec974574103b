"""gRPC server reflection: what grpcurl and similar tools ask a peer to find its services.

A real peer, asked the way grpcurl asks (the reflection stream, ``v1`` first, then
``v1alpha``), through grpcio-reflection's own client: the services it lists, and the
messages of ``mesh.v1.Mesh`` described field by field. With a token configured, reflection
is behind it like the mesh service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as _refl
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support.meshdir import MeshDir
from support.peers import Peer, Peers

TOKEN = "tok-" + "5e1f0a" * 5


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _Token(grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer`` to every streaming call, as grpcurl's ``-H`` does."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, requests: Any
    ) -> Any:
        return continuation(_Details(details, [*(details.metadata or ()), self._pair]), requests)


def _channel(address: str, token: str | None = None) -> grpc.Channel:
    channel = grpc.insecure_channel(address)
    return channel if token is None else grpc.intercept_channel(channel, _Token(token))


def list_services(channel: grpc.Channel, version: str) -> list[str]:
    """The services a raw reflection stream of ``version`` (``v1`` or ``v1alpha``) lists."""
    info = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=_refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=_refl.ServerReflectionResponse.FromString,
    )
    (reply,) = info(iter([_refl.ServerReflectionRequest(list_services="")]), timeout=30)
    return [s.name for s in reply.list_services_response.service]


def assert_describes_the_mesh(channel: grpc.Channel) -> None:
    """What `grpcurl list` and `grpcurl describe mesh.v1.Mesh` would show."""
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "mesh.v1.Mesh" in set(database.get_services())
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("mesh.v1.Mesh")
    methods = {m.name: m for m in service.methods}
    assert {"Continue", "Link"} <= set(methods)  # and any method added to the service later
    assert methods["Continue"].input_type.full_name == "mesh.v1.ContinueRequest"
    assert methods["Continue"].output_type.full_name == "mesh.v1.ContinueReply"
    assert methods["Link"].input_type.full_name == "mesh.v1.Frames"
    request = pool.FindMessageTypeByName("mesh.v1.ContinueRequest")
    assert [(f.name, f.number) for f in request.fields] == [
        ("request", 1),
        ("line_index", 2),
        ("context", 3),
        ("flow_id", 4),
        ("digest", 5),
        ("via", 6),
    ]
    reply = pool.FindMessageTypeByName("mesh.v1.ContinueReply")
    assert [f.name for f in reply.oneofs_by_name["outcome"].fields] == [
        "done",
        "hand_off",
        "failed",
    ]
    kinds = pool.FindEnumTypeByName("mesh.v1.Failure.Kind")
    assert [v.name for v in kinds.values] == ["STEP", "UNAVAILABLE", "REFUSED", "TIMEOUT"]


def test_a_peer_lists_and_describes_its_services(login_server: tuple[MeshDir, Peer]) -> None:
    """Without a token, any caller can list the peer's services over reflection v1 and
    v1alpha (grpcurl asks for v1 first) and read every message of mesh.v1.Mesh."""
    _, server = login_server
    with _channel(server.address) as channel:
        for version in ("v1", "v1alpha"):
            assert set(list_services(channel, version)) == {
                "mesh.v1.Mesh",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            }
        assert_describes_the_mesh(channel)


@pytest.fixture
def token_server(login_mesh: MeshDir, peers: Peers) -> Iterator[Peer]:
    (login_mesh.root / "token").write_text(TOKEN + "\n")
    login_mesh.write_config({"client": False, "server": True}, extra='token_file = "token"')
    yield peers.start(login_mesh, "server")


def test_reflection_is_behind_the_token(token_server: Peer) -> None:
    """With a token configured, reflection without it is UNAUTHENTICATED (the peer logs the
    refusal), and with it lists and describes the mesh service; health needs none."""
    with _channel(token_server.address) as channel:
        for version in ("v1", "v1alpha"):
            with pytest.raises(grpc.RpcError) as info:
                list_services(channel, version)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "missing or wrong token" in (info.value.details() or "")
    with _channel(token_server.address, "x" * 20 + TOKEN) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list_services(channel, "v1")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _channel(token_server.address, TOKEN) as channel:
        assert "mesh.v1.Mesh" in list_services(channel, "v1")
        assert_describes_the_mesh(channel)
    refused = [e for e in token_server.events() if e.get("event") == "mesh.refused"]
    assert len(refused) == 3
    assert TOKEN not in token_server.log_text()
