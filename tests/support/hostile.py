"""A hostile peer: a hand-written gRPC server of ``mesh.v1.Mesh`` that forges replies.

It serves both ways in: unary ``Continue``, and ``Link`` streams (each request frame
answered by a reply frame, as a peer does). It runs as its own process (``python
hostile.py [--port N]``), prints ``PORT <n>`` once it serves, and answers every call with
the reply the call's own context asks for under the key ``"forge"``, so one process
serves every attack a test tries::

    {"forge": {"outcome": "hand_off", "machine": "client", "line_index": 0, "steps": [1]}}
    {"forge": {"outcome": "done", "steps": [1]}}
    {"forge": {"outcome": "hand_off", ..., "context": "not json"}}   # raw context bytes
    {"forge": {"outcome": "done", "steps": [1], "pad": 100000}}       # a reply that large

``steps`` are the line indexes the reply claims ran below (on this machine); ``context``
defaults to the call's own context. Every call is written to stdout as one JSON line
(``{"call": {"flow_id": ..., "line_index": ..., "via": [...]}}``), so a test can count them.
It serves grpc.health.v1 too, as a real peer does, so gRPC's health-checked balancing
treats it as one. It knows nothing of flow files: it says whatever it is told to.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.v1 import mesh_pb2 as pb

SERVICE = "mesh.v1.Mesh"


def forged(request: pb.ContinueRequest, machine: str) -> bytes:
    """The reply the call's context asks for."""
    context = json.loads(request.context or b"{}")
    spec: dict[str, Any] = context.get("forge", {})
    reply = pb.ContinueReply()
    for index in spec.get("steps", [request.line_index]):
        reply.steps.add(line_index=index, machine=machine, line=f"forged line {index}")
    raw = spec.get("context")
    payload = raw.encode() if isinstance(raw, str) else request.context
    if spec.get("pad"):
        payload = json.dumps({**context, "pad": "x" * int(spec["pad"])}).encode()
    outcome = spec.get("outcome", "done")
    if outcome == "hand_off":
        reply.hand_off.machine = spec["machine"]
        reply.hand_off.line_index = spec["line_index"]
        reply.hand_off.context = payload
    elif outcome == "done":
        reply.done.context = payload
    return bytes(reply.SerializeToString())


class Hostile:
    """A running hostile peer process: its address, the calls it got, and :meth:`stop`."""

    def __init__(self, log: Path, machine: str = "evil") -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--machine", machine],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.port = self._wait_port(30.0)
        self.address = f"127.0.0.1:{self.port}"

    def _wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("PORT "):
                    return int(line.split()[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"hostile peer did not start:\n{self.log_path.read_text()}")

    def calls(self, flow_id: str | None = None) -> list[dict[str, Any]]:
        """The calls it received (of one flow, if given), in order."""
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith('{"call"'):
                call = json.loads(line)["call"]
                if flow_id is None or call["flow_id"] == flow_id:
                    out.append(call)
        return out

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    parser.add_argument("--machine", default="evil", help="the machine name its steps claim")
    args = parser.parse_args(argv)
    lock = threading.Lock()

    def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = pb.ContinueRequest.FromString(raw)
        with lock:
            call = {"flow_id": request.flow_id, "line_index": request.line_index}
            print(json.dumps({"call": {**call, "via": list(request.via)}}), flush=True)
        return forged(request, args.machine)

    def link(messages: Any, context: grpc.ServicerContext) -> Any:
        yield pb.Frames(frames=[pb.Frame(received=0)]).SerializeToString()  # admitted
        for data in messages:
            for frame in pb.Frames.FromString(data).frames:
                if frame.WhichOneof("body") != "request":
                    continue
                request = frame.request
                with lock:
                    call = {"flow_id": request.flow_id, "line_index": request.line_index}
                    print(json.dumps({"call": {**call, "via": list(request.via)}}), flush=True)
                reply = pb.ContinueReply.FromString(forged(request, args.machine))
                answer = pb.Frame(call=frame.call, reply=reply, received=frame.call)
                yield pb.Frames(frames=[answer]).SerializeToString()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    handler = grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=None, response_serializer=None
    )
    streams = grpc.stream_stream_rpc_method_handler(
        link, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Continue": handler, "Link": streams}),)
    )
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    for name in ("", SERVICE):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"PORT {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
