"""The mesh, hand-written gRPC chains and a Celery chain, measured side by side.

The same work five ways, every "machine" its own process on 127.0.0.1:

* **mesh**: a flow of N lines on N machines (``chainN``, line i on ``m<i>``),
  started by an originator that owns no line (``client``, no address); each
  handler is a plain function that only logs ``"next"`` (it runs on a peer's
  worker threads). Peers call each other over persistent ``Link`` streams.
* **mesh-async**: the same with ``async def`` handlers (on the peer's event loop).
* **raw**: N grpcio servers chained by nested unary calls, with the mesh's
  ``ContinueRequest`` carrying the same JSON bytes, the same thread pools and
  one structlog line per hop.
* **raw-stream**: N hand-written ``grpc.aio`` servers chained by one persistent
  bidirectional stream per link (the mesh's ``Link`` method and ``Frames``
  messages, no mesh code), calls multiplexed by id, replies relayed back up:
  the best a user could write by hand with grpcio.
* **celery**: a ``chain()`` of N tasks, each on its own queue with its own
  worker process, Redis (Debian's ``redis-server``) as broker and backend.

Drivers: the mesh's originates with ``await node.start_async_with(...)`` on a node of
``mesh.connect_async`` (the driver's own loop) and raw-stream's multiplexes flows over
one stream to the first hop, both asyncio with closed loops as tasks; raw's and
Celery's block a thread per flow in flight.

For N = 4 and 8, at 1, 8, 32 and 128 flows in flight: flows/s, p50/p99
latency, peer CPU seconds per flow (``/proc/PID/stat``), peak RSS per peer
(``VmHWM``) and its growth from idle to 128 in flight. Cells are interleaved
(mesh, mesh-async, raw, raw-stream, celery, ...) and repeated; medians are
shown with min-max. Also: the per-hop marginal cost, one hop's work in process
without the network (a peer's, against the raw handler's: the mesh's own
work), a non-flow structlog event with and without the mesh processors, a
loopback TCP ping-pong as the floor, and a mesh flow's reply path (the last step's
end to the result). The project's performance targets are checked against the
figures of this run and printed PASS/FAIL.

    .venv/bin/python scripts/bench.py [--quick] [--repeats 5] [--seconds 2]
                                      [--systems mesh,raw,...] [--no-celery]
                                      [--out bench-results.json]

Every process it starts is stopped by its pid when it ends, fails or is
interrupted. The machine is shared and noisy: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOPS = (4, 8)
CONCURRENCY = (1, 8, 32, 128)
WORKERS = 256  # the mesh's default pool, used by the raw servers too
CELERY_THREADS = 32
READY_TIMEOUT = 60.0
FLOW_TIMEOUT = 60.0
SELF = Path(__file__).resolve()
REPO = SELF.parent.parent

#: The flow's starting context: about 200 bytes of JSON.
CONTEXT: dict[str, Any] = {
    "user": "ada",
    "order_id": 123456789,
    "items": [{"sku": "A-100", "qty": 2}, {"sku": "B-220", "qty": 1}],
    "note": "leave at the door, ring twice; the dog is friendly but loud",
    "currency": "EUR",
    "total": 42.5,
}


def hop_line(i: int) -> str:
    return f"hop {i} for :user"


# -- processes ---------------------------------------------------------------


class Procs:
    """Every child process this run started, so each is stopped by its pid."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def start(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), **kw)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux, writing 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("MESH_CONFIG", None)
    return env


# -- the three systems -------------------------------------------------------


@dataclass
class System:
    """Peers of one system plus a driver process that originates its flows."""

    name: str
    peers: list[subprocess.Popen[Any]] = field(default_factory=list)
    driver: subprocess.Popen[Any] | None = None
    unavailable: str = ""

    def peer_pids(self) -> list[int]:
        return [p.pid for p in self.peers]

    def run(self, n: int, c: int, seconds: float) -> dict[str, Any]:
        """One cell: warm up, then measure ``c`` closed loops for ``seconds``."""
        assert self.driver is not None and self.driver.stdin and self.driver.stdout
        self._send({"n": n, "c": c, "seconds": seconds})
        self._expect("ready")
        pids = self.peer_pids()
        reset = c == max(CONCURRENCY)  # the growth the issue asks for: idle -> 128
        if reset:
            for pid in pids:
                reset_peak_rss(pid)
        idle = [status_kib(pid, "VmRSS") for pid in pids]
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        self._send("go")
        result: dict[str, Any] = json.loads(self._expect(None))
        cpu1 = sum(cpu_seconds(pid) for pid in pids)
        hwm = [status_kib(pid, "VmHWM") for pid in pids]
        count = max(result["count"], 1)
        result["peer_cpu_ms_per_flow"] = (cpu1 - cpu0) * 1000 / count
        result["peak_rss_mib"] = max(hwm) / 1024
        if reset:
            result["rss_growth_mib"] = max(h - i for h, i in zip(hwm, idle, strict=True)) / 1024
        return result

    def _send(self, message: Any) -> None:
        assert self.driver is not None and self.driver.stdin
        self.driver.stdin.write(json.dumps(message) + "\n")
        self.driver.stdin.flush()

    def _expect(self, what: str | None) -> str:
        assert self.driver is not None and self.driver.stdout
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} driver exited ({self.driver.poll()})")
        if what is not None and json.loads(line) != what:
            raise RuntimeError(f"{self.name} driver said {line.strip()!r}, not {what!r}")
        return line


def start_driver(
    procs: Procs,
    system: System,
    *args: str,
    env: dict[str, str] | None = None,
    script: Path = SELF,
) -> None:
    """``script _drive SYSTEM ARGS``: the process that originates ``system``'s flows, once
    it says it is up (``script``: a bench of its own, as scripts/bench_durable.py)."""
    system.driver = procs.start(
        [sys.executable, str(script), "_drive", system.name, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env=env_with_repo() if env is None else env,
    )
    system._expect("up")


def wait_grpc(addresses: Sequence[str], procs: Sequence[subprocess.Popen[Any]]) -> None:
    from mesh.peer import wait_serving

    for address, proc in zip(addresses, procs, strict=True):
        if not wait_serving(address, READY_TIMEOUT, lambda p=proc: p.poll() is not None):
            raise RuntimeError(f"peer at {address} did not start (exit {proc.poll()})")


MESH_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


def _hop(i):
    {define} hop(ctx):
        log.info("next", hop=i)

    hop.__name__ = f"hop{{i}}"
    return hop


for _n in {hops}:
    for _i in range(_n):
        mesh.handler(f"chain{{_n}}", "hop {{}} for :user".format(_i))(_hop(_i))
"""

#: How each system's driver originates flows (printed with the table).
DRIVERS = {
    "mesh": "asyncio, mesh.connect_async, await node.start_async_with(...), loops as tasks",
    "mesh-async": "asyncio, mesh.connect_async, await node.start_async_with(...), loops as tasks",
    "raw": "threads, a blocking unary call per flow (one thread per flow in flight)",
    "raw-stream": "asyncio, flows multiplexed by id over one stream to the first hop",
    "celery": "threads, chain.apply_async().get() (one thread per flow in flight)",
}

#: Every system, in the order of the table.
SYSTEMS = tuple(DRIVERS)


def start_mesh(procs: Procs, tmp: Path, name: str = "mesh") -> System:
    """The mesh's peers; ``mesh-async`` gives them ``async def`` handlers."""
    system = System(name)
    folder = tmp / name
    folder.mkdir()
    rows = ["Request\tLog\tMachine"]
    for n in HOPS:
        rows += [f"chain{n}\t{hop_line(i)}\tm{i}" for i in range(n)]
    (folder / "flow.tsv").write_text("\n".join(rows) + "\n")
    define = "async def" if name == "mesh-async" else "def"
    (folder / "bench_hops.py").write_text(MESH_SERVICE.format(hops=tuple(HOPS), define=define))
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(max(HOPS))]
    machines = "\n".join(f'm{i} = "{a}"' for i, a in enumerate(addresses))
    (folder / "mesh.toml").write_text(
        f'flow = "flow.tsv"\nservices = ["bench_hops"]\nworkers = {WORKERS}\n'
        f'timeout = {FLOW_TIMEOUT}\n[machines]\nclient = ""\n{machines}\n'
    )
    cfg = str(folder / "mesh.toml")
    for i in range(max(HOPS)):
        system.peers.append(
            procs.start(
                [sys.executable, "-m", "mesh", "peer", f"m{i}", "-c", cfg, "--json"],
                env=env_with_repo(),
            )
        )
    wait_grpc(addresses, system.peers)
    start_driver(procs, system, cfg)
    return system


def start_mesh_async(procs: Procs, tmp: Path) -> System:
    return start_mesh(procs, tmp, "mesh-async")


def start_raw(procs: Procs, tmp: Path, name: str = "raw") -> System:
    """raw: sync servers, nested unary calls; raw-stream: aio servers, one stream a link."""
    system = System(name)
    role = "_raw_stream" if name == "raw-stream" else "_raw"
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(max(HOPS))]
    for i, address in enumerate(addresses):
        downstream = addresses[i + 1] if i + 1 < len(addresses) else ""
        system.peers.append(
            procs.start(
                [sys.executable, str(SELF), role, str(i), address, downstream],
                env=env_with_repo(),
            )
        )
    wait_grpc(addresses, system.peers)
    start_driver(procs, system, addresses[0])
    return system


def start_raw_stream(procs: Procs, tmp: Path) -> System:
    return start_raw(procs, tmp, "raw-stream")


CELERY_APP = """
import json
import sys

import structlog
from celery import Celery

structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ],
    logger_factory=structlog.WriteLoggerFactory(sys.stdout),
    cache_logger_on_first_use=True,
)
log = structlog.get_logger()

app = Celery("bench_chain", broker="{url}", backend="{url}")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=False,
    result_expires=600,
)


@app.task(name="hop")
def hop(ctx, i):
    log.info(f"hop {{i}} for {{ctx['user']}}", line_index=i, machine=f"q{{i}}")
    ctx["hop"] = i
    return ctx
"""


def start_celery(procs: Procs, tmp: Path) -> System:
    system = System("celery")
    redis = shutil.which("redis-server")
    if redis is None:
        system.unavailable = "redis-server is not installed (apt-get install -y redis-server)"
        return system
    try:
        import celery  # noqa: F401
        import redis as _redis  # noqa: F401
    except ImportError as exc:
        system.unavailable = f"{exc.name} is not installed (make bench installs it)"
        return system
    folder = tmp / "celery"
    folder.mkdir()
    port = free_port()
    broker = procs.start(
        [
            redis,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ]
    )
    system.peers.append(broker)
    _wait_port(port, broker)
    (folder / "bench_chain.py").write_text(CELERY_APP.format(url=f"redis://127.0.0.1:{port}/0"))
    env = env_with_repo()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    logs = []
    for i in range(max(HOPS)):
        log = folder / f"worker{i}.log"
        logs.append(log)
        with log.open("wb") as out:
            system.peers.append(
                procs.start(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "bench_chain",
                        "worker",
                        "-Q",
                        f"q{i}",
                        "-n",
                        f"w{i}@bench",
                        "--pool",
                        "threads",
                        "-c",
                        str(CELERY_THREADS),
                        "--without-heartbeat",
                        "--without-gossip",
                        "--without-mingle",
                        "-l",
                        "warning",
                    ],
                    env=env,
                    cwd=folder,
                    stdout=subprocess.DEVNULL,
                    stderr=out,
                )
            )
    system.driver = None
    try:
        start_driver(procs, system, str(folder), env=env)
    except RuntimeError as exc:
        tails = "".join(p.read_text()[-400:] for p in logs)
        system.unavailable = f"celery did not start: {exc}: {tails.strip()[-400:]}"
    return system


def _wait_port(port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} (exit {proc.poll()})")


# -- child roles -----------------------------------------------------------


def _processors_like_mesh() -> list[Any]:
    """The chain mesh.configure_logging(json=True) installs, without the mesh's processors."""
    import structlog

    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]


def _structlog_like_mesh(out: Any) -> None:
    """structlog configured as the mesh configures it, without the mesh's processors."""
    import logging

    import structlog

    structlog.configure(
        processors=_processors_like_mesh(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def role_raw(index: str, listen: str, downstream: str) -> int:
    """One hand-written server of the raw chain: log, add a key, call the next."""
    from concurrent import futures

    import grpc
    import structlog
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from mesh.v1 import mesh_pb2 as pb
    from mesh.v1 import mesh_pb2_grpc as pb_grpc

    _structlog_like_mesh(sys.stdout)
    log = structlog.get_logger()
    i = int(index)
    machine = f"s{i}"
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    stub = pb_grpc.MeshStub(grpc.insecure_channel(downstream, options)) if downstream else None

    class Hop(pb_grpc.MeshServicer):  # type: ignore[misc]
        def Continue(self, request: Any, context: Any) -> Any:
            ctx = json.loads(request.context)
            log.info(
                f"hop {i} for {ctx['user']}",
                flow_id=request.flow_id,
                request=request.request,
                line_index=i,
                machine=machine,
            )
            ctx["hop"] = i
            body = encoder.encode(ctx).encode()
            if stub is not None and i + 1 < int(request.request[len("chain") :]):
                forward = pb.ContinueRequest(
                    request=request.request,
                    line_index=i + 1,
                    context=body,
                    flow_id=request.flow_id,
                )
                return stub.Continue(forward, timeout=context.time_remaining())
            return pb.ContinueReply(done=pb.Done(context=body))

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS),
        maximum_concurrent_rpcs=WORKERS,
        options=[("grpc.so_reuseport", 0), *options],
    )
    pb_grpc.add_MeshServicer_to_server(Hop(), server)
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(listen)
    server.start()
    checker.set("mesh.v1.Mesh", health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C reaches the whole group
    stop.wait()
    server.stop(0).wait()
    return 0


def role_raw_stream(index: str, listen: str, downstream: str) -> int:
    """One hand-written grpc.aio server of the raw-stream chain (no mesh code).

    Every caller keeps one ``Link`` stream open to it, and it keeps one open to the
    next server, opened on first use; calls travel as ``Frames`` of one ``Frame``
    each, multiplexed by call id. A call is logged and its context gets a key, as
    in the raw chain; then it goes down the next link under an id of this server's
    own, or, on the chain's last hop, its reply goes back up the stream it came in
    on. A reply from below is relayed up the same way, under the caller's id. One
    reader task per stream dispatches by id: nothing waits per call. (Ported from
    the shared transport variants' ``v_d_aio_stream.py``.)
    """
    import asyncio
    import itertools

    import grpc
    import structlog
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from mesh.v1 import mesh_pb2 as pb
    from mesh.v1 import mesh_pb2_grpc as pb_grpc

    _structlog_like_mesh(sys.stdout)
    log = structlog.get_logger()
    i = int(index)
    machine = f"s{i}"
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    ids = itertools.count(1)
    # A call sent down -> the stream it came in on (its outgoing queue) and its id there.
    pending: dict[int, tuple[asyncio.Queue[Any], int]] = {}

    async def drain(queue: asyncio.Queue[Any]) -> Any:
        while True:
            yield await queue.get()

    class Hop(pb_grpc.MeshServicer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.down: asyncio.Queue[Any] | None = None
            self.lock = asyncio.Lock()

        async def _downstream(self) -> asyncio.Queue[Any]:
            if self.down is None:
                async with self.lock:
                    if self.down is None:
                        queue: asyncio.Queue[Any] = asyncio.Queue()
                        channel = grpc.aio.insecure_channel(downstream, options)
                        call = pb_grpc.MeshStub(channel).Link(drain(queue))
                        asyncio.get_running_loop().create_task(self._relay(call))
                        self.down = queue
            return self.down

        async def _relay(self, call: Any) -> None:
            async for message in call:
                for frame in message.frames:
                    up, frame.call = pending.pop(frame.call)
                up.put_nowait(message)  # one frame a message: the same message goes up

        async def Link(self, request_iterator: Any, context: Any) -> Any:
            out: asyncio.Queue[Any] = asyncio.Queue()
            down = await self._downstream() if downstream else None

            async def reader() -> None:
                async for message in request_iterator:
                    for frame in message.frames:
                        step(frame, out, down)
                out.put_nowait(None)

            task = asyncio.get_running_loop().create_task(reader())
            try:
                while (message := await out.get()) is not None:
                    yield message
            finally:
                task.cancel()

    def step(frame: Any, out: asyncio.Queue[Any], down: asyncio.Queue[Any] | None) -> None:
        """One hop's work (the raw chain's), then the call goes down or its reply up."""
        request = frame.request
        ctx = json.loads(request.context)
        log.info(
            f"hop {i} for {ctx['user']}",
            flow_id=request.flow_id,
            request=request.request,
            line_index=i,
            machine=machine,
        )
        ctx["hop"] = i
        body = encoder.encode(ctx).encode()
        if down is not None and i + 1 < int(request.request[len("chain") :]):
            call = next(ids)
            pending[call] = (out, frame.call)
            forward = pb.ContinueRequest(
                request=request.request, line_index=i + 1, context=body, flow_id=request.flow_id
            )
            down.put_nowait(pb.Frames(frames=[pb.Frame(call=call, request=forward)]))
        else:
            reply = pb.ContinueReply(done=pb.Done(context=body))
            out.put_nowait(pb.Frames(frames=[pb.Frame(call=frame.call, reply=reply)]))

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *options])
        pb_grpc.add_MeshServicer_to_server(Hop(), server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        server.add_insecure_port(listen)
        await server.start()
        await checker.set("mesh.v1.Mesh", health_pb2.HealthCheckResponse.SERVING)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C reaches the whole group
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(serve())
    return 0


def _flow_caller(system: str, args: Sequence[str]) -> Callable[[int], None]:
    """A function that runs one flow of N hops end to end and checks its result,
    blocking its thread (the raw and Celery drivers)."""
    if system == "raw":
        import grpc

        from mesh.v1 import mesh_pb2 as pb
        from mesh.v1 import mesh_pb2_grpc as pb_grpc

        stub = pb_grpc.MeshStub(grpc.insecure_channel(args[0]))
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

        def call_raw(n: int) -> None:
            request = pb.ContinueRequest(
                request=f"chain{n}",
                line_index=0,
                context=encoder.encode(CONTEXT).encode(),
                flow_id=uuid.uuid4().hex,
            )
            reply = stub.Continue(request, timeout=FLOW_TIMEOUT)
            if json.loads(reply.done.context).get("hop") != n - 1:
                raise RuntimeError(f"raw chain ended with {reply!r}")

        return call_raw
    if system == "celery":
        sys.path.insert(0, args[0])
        from bench_chain import hop  # type: ignore[import-not-found]
        from celery import chain

        def call_celery(n: int) -> None:
            flow = chain(
                hop.s(dict(CONTEXT), 0).set(queue="q0"),
                *(hop.s(i).set(queue=f"q{i}") for i in range(1, n)),
            )
            result = flow.apply_async().get(timeout=FLOW_TIMEOUT)
            if result.get("hop") != n - 1:
                raise RuntimeError(f"celery chain ended with {result!r}")

        return call_celery
    raise SystemExit(f"unknown system {system!r}")


async def _async_flow(system: str, args: Sequence[str]) -> Callable[[int], Awaitable[None]]:
    """A coroutine function that runs one flow of N hops and checks its result, on the
    driver's event loop (the mesh's and raw-stream's drivers)."""
    if system in ("mesh", "mesh-async"):
        import mesh

        devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the driver
        mesh.configure_logging(json=True, file=devnull)
        # An asyncio application's node: its flows run on this loop (mesh.connect_async).
        node = await mesh.connect_async(args[0], machine="client")

        reply_path: list[float] = []

        async def call_mesh(n: int) -> None:
            result = await node.start_async_with(f"chain{n}", CONTEXT, timeout=FLOW_TIMEOUT)
            # From the end of the last step to the result here: the reply relayed up the
            # chain, which a direct return would shorten to one hop (same host's clock).
            last = result.steps[-1]
            reply_path.append(time.time() - (last.start + last.duration))
            if result.context.get("hop") != n - 1:
                raise RuntimeError(f"mesh flow ended with {result.context!r}")

        call_mesh.reply_path = reply_path  # type: ignore[attr-defined]
        return call_mesh
    if system == "raw-stream":
        import itertools

        import grpc

        from mesh.v1 import mesh_pb2 as pb
        from mesh.v1 import mesh_pb2_grpc as pb_grpc

        loop = asyncio.get_running_loop()
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
        ids = itertools.count(1)
        pending: dict[int, asyncio.Future[Any]] = {}
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def drain() -> Any:
            while True:
                yield await queue.get()

        stub = pb_grpc.MeshStub(grpc.aio.insecure_channel(args[0]))
        link = stub.Link(drain())

        async def read() -> None:
            async for message in link:
                for frame in message.frames:
                    future = pending.pop(frame.call, None)
                    if future is not None and not future.done():  # else: timed out
                        future.set_result(frame.reply)
            say("raw-stream driver: the stream to the first hop ended")

        reading = loop.create_task(read())

        async def call_raw_stream(n: int) -> None:
            call = next(ids)
            request = pb.ContinueRequest(
                request=f"chain{n}",
                line_index=0,
                context=encoder.encode(CONTEXT).encode(),
                flow_id=uuid.uuid4().hex,
            )
            future = pending[call] = loop.create_future()
            queue.put_nowait(pb.Frames(frames=[pb.Frame(call=call, request=request)]))
            try:
                reply = await asyncio.wait_for(future, FLOW_TIMEOUT)
            finally:
                pending.pop(call, None)
            if json.loads(reply.done.context).get("hop") != n - 1:
                raise RuntimeError(f"raw-stream chain ended with {reply!r}")

        call_raw_stream.reading = reading  # type: ignore[attr-defined] # kept alive
        return call_raw_stream
    raise SystemExit(f"unknown system {system!r}")


def _cell_result(lat: list[float], errors: list[str], elapsed: float, cpu: float) -> dict[str, Any]:
    lat.sort()
    return {
        "count": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "flows_per_s": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50) * 1000,
        "p99_ms": _pct(lat, 99) * 1000,
        "driver_cpu_ms_per_flow": cpu * 1000 / max(len(lat), 1),
    }


async def _drive_async(system: str, args: Sequence[str]) -> int:
    """role_drive for the asyncio drivers: closed loops as tasks on one event loop."""
    return await serve_cells_async(await _async_flow(system, args), HOPS)


async def serve_cells_async(flow: Callable[[int], Awaitable[None]], hops: Sequence[int]) -> int:
    """A driver's life on its event loop: one flow of each length in ``hops`` (a wrong
    set-up fails there, before any figure is taken), "up", then a measured cell per
    command ({"n", "c", "seconds"} -> "ready", "go" -> its figures) until stdin ends."""
    loop = asyncio.get_running_loop()
    for n in hops:
        await flow(n)
    out = sys.stdout
    print(json.dumps("up"), file=out, flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        n, c, seconds = int(cmd["n"]), int(cmd["c"]), float(cmd["seconds"])
        await _async_loops(flow, n, c, deadline=time.perf_counter() + min(0.3, seconds / 4))
        print(json.dumps("ready"), file=out, flush=True)
        if json.loads(await loop.run_in_executor(None, sys.stdin.readline)) != "go":
            return 1
        reply_path: list[float] | None = getattr(flow, "reply_path", None)
        if reply_path is not None:
            reply_path.clear()
        cpu0 = time.process_time()
        start = time.perf_counter()
        lat, errors = await _async_loops(flow, n, c, deadline=start + seconds)
        elapsed = time.perf_counter() - start
        result = _cell_result(lat, errors, elapsed, time.process_time() - cpu0)
        if reply_path:
            result["reply_path_ms"] = statistics.median(reply_path) * 1000
        print(json.dumps(result), file=out, flush=True)
    return 0


async def _async_loops(
    flow: Callable[[int], Awaitable[None]], n: int, c: int, deadline: float
) -> tuple[list[float], list[str]]:
    """``c`` tasks each running flows one after another until ``deadline``."""
    lat: list[float] = []
    errors: list[str] = []
    clock = time.perf_counter

    async def loop() -> None:
        mine = []
        while clock() < deadline:
            t0 = clock()
            try:
                await flow(n)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            mine.append(clock() - t0)
        lat.extend(mine)

    await asyncio.gather(*(loop() for _ in range(c)))
    return lat, errors


def role_drive(system: str, args: Sequence[str]) -> int:
    """Originate flows on command: {"n", "c", "seconds"} -> "ready", "go" -> result."""
    # Ctrl-C reaches the whole process group; the orchestrator reports it, quietly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if system in ("mesh", "mesh-async", "raw-stream"):
        return asyncio.run(_drive_async(system, args))
    return serve_cells(_flow_caller(system, args), HOPS)


def serve_cells(call: Callable[[int], None], hops: Sequence[int]) -> int:
    """:func:`serve_cells_async` for a blocking ``call``, run from ``c`` threads a cell."""
    for n in hops:
        call(n)  # a wrong set-up fails here, before any figure is taken
    out = sys.stdout
    print(json.dumps("up"), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        n, c, seconds = int(cmd["n"]), int(cmd["c"]), float(cmd["seconds"])
        _loops(call, n, c, deadline=time.perf_counter() + min(0.3, seconds / 4))  # warm-up
        print(json.dumps("ready"), file=out, flush=True)
        if json.loads(sys.stdin.readline()) != "go":
            return 1
        cpu0 = time.process_time()
        start = time.perf_counter()
        lat, errors = _loops(call, n, c, deadline=start + seconds)
        elapsed = time.perf_counter() - start
        result = _cell_result(lat, errors, elapsed, time.process_time() - cpu0)
        print(json.dumps(result), file=out, flush=True)
    return 0


def _loops(
    call: Callable[[int], None], n: int, c: int, deadline: float
) -> tuple[list[float], list[str]]:
    """``c`` threads each running flows one after another until ``deadline``."""
    lat: list[float] = []
    errors: list[str] = []
    gate = threading.Barrier(c)

    def loop() -> None:
        mine = []
        gate.wait()
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                call(n)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            mine.append(time.perf_counter() - t0)
        lat.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors


def _pct(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(pct / 100 * len(values) + 0.5) - 1))
    return values[k]


def role_echo(port: str) -> int:
    """The far end of the TCP ping-pong: send back what arrives."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", int(port)))
        srv.listen(1)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)
    return 0


def ping_pong(procs: Procs, rounds: int) -> float:
    """Median round trip (µs) of a 200-byte message between two Python processes."""
    port = free_port()
    echo = procs.start([sys.executable, str(SELF), "_echo", str(port)])
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline or echo.poll() is not None:
                    raise
                time.sleep(0.02)
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = json.dumps(CONTEXT).encode().ljust(200)[:200]
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                sock.sendall(msg)
                got = 0
                while got < len(msg):
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("the ping-pong echo process closed the connection")
                    got += len(data)
                times.append(time.perf_counter() - t0)
    finally:
        procs.stop(echo)
    return statistics.median(times) * 1e6


EVENT_FLOW = "Request\tLog\tMachine\nlogin\tUser logged in as :username\tclient\n"


HOP_FLOW = (
    "Request\tLog\tMachine\n"
    "chain2\thop 0 for :user\tm0\nchain2\thop 1 for :user\tm1\n"
    "achain2\thop 0 for :user\tm0\nachain2\thop 1 for :user\tm1\n"
)
HOP_SERVICE = """
import structlog

import mesh

log = structlog.get_logger()


@mesh.handler("chain2", "hop 1 for :user")
def hop1(ctx):
    log.info("next", hop=1)


@mesh.handler("achain2", "hop 1 for :user")
async def ahop1(ctx):
    log.info("next", hop=1)
"""


def role_hop(calls: str, rounds: str) -> int:
    """The mesh's own work in one hop, without the network: µs per call, mesh and raw.

    What a peer does for the last line of a chain once gRPC has handed it the
    request (decode, route, log the line, run the handler, its "next", the reply),
    against the raw chain's handler (decode, log a line, encode, reply), each
    logging through the same structlog chain to /dev/null. The mesh's hop is timed
    with a plain handler (handed to a worker thread and back, one call at a time:
    the hand-off's full cost) and with an ``async def`` one (on the loop). Rounds
    alternate.
    """
    import structlog

    import mesh
    from mesh import runtime
    from mesh.v1 import mesh_pb2 as pb
    from mesh.wire import load_context

    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as this process
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "flow.tsv").write_text(HOP_FLOW)
        Path(tmp, "bench_hop1.py").write_text(HOP_SERVICE)
        Path(tmp, "mesh.toml").write_text(
            'flow = "flow.tsv"\nservices = ["bench_hop1"]\n[machines]\nclient = ""\n'
            'm0 = "127.0.0.1:1"\nm1 = "127.0.0.1:2"\n'
        )
        mesh.configure_logging(json=True, file=sink)
        structlog.configure(cache_logger_on_first_use=True)  # as `mesh peer` does
        node = mesh.connect(Path(tmp, "mesh.toml"), machine="m1")
    requests = {
        name: pb.ContinueRequest(
            request=name,
            line_index=1,
            context=json.dumps(CONTEXT).encode(),
            flow_id=uuid.uuid4().hex,
            digest=node.flows.flows[name].digest,
            via=["client", "m0"],
        )
        for name in ("chain2", "achain2")
    }
    request = requests["chain2"]

    async def serve_many(count: int, request: Any) -> Any:  # on the node's loop, as a peer
        reply = None
        for _ in range(count):
            context = load_context(request.context)
            reply = await runtime.serve(node, request, context, time.monotonic() + 30)
        return reply

    def mesh_hop(count: int = 1) -> Any:  # a peer's serve, from the decode to the reply's bytes
        return node.run_on_loop(serve_many(count, requests["chain2"]))

    def mesh_async_hop(count: int = 1) -> Any:  # the same with an async def handler
        return node.run_on_loop(serve_many(count, requests["achain2"]))

    raw_log = structlog.wrap_logger(
        structlog.WriteLogger(sink),
        processors=_processors_like_mesh(),
        wrapper_class=structlog.make_filtering_bound_logger(20),
    )
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

    def raw_hop() -> Any:  # role_raw's Hop.Continue, last server of the chain
        ctx = json.loads(request.context)
        raw_log.info(
            f"hop 1 for {ctx['user']}",
            flow_id=request.flow_id,
            request=request.request,
            line_index=1,
            machine="s1",
        )
        ctx["hop"] = 1
        reply = pb.ContinueReply(done=pb.Done(context=encoder.encode(ctx).encode()))
        return reply.SerializeToString()  # as gRPC does it, and the mesh's peer itself

    for hop in (mesh_hop, mesh_async_hop):
        if json.loads(pb.ContinueReply.FromString(hop()).done.context).get("hop") != 1:
            raise RuntimeError("the in-process mesh hop did not run its handler")
    times: dict[str, list[float]] = {"mesh_us": [], "mesh_async_us": [], "raw_us": []}
    n = int(calls)

    def raw_many(count: int) -> None:
        for _ in range(count):
            raw_hop()

    for r in range(int(rounds)):
        order = [("mesh_us", mesh_hop), ("mesh_async_us", mesh_async_hop), ("raw_us", raw_many)]
        for key, fn in order if r % 2 == 0 else order[::-1]:
            fn(n // 10)  # warm
            start = time.perf_counter()
            fn(n)
            times[key].append((time.perf_counter() - start) / n * 1e6)
    node.close()
    print(json.dumps(times))
    return 0


def role_events(events: str, rounds: str) -> int:
    """ns per non-flow structlog event, with and without the mesh processors."""
    import structlog

    import mesh

    def configure(with_mesh: bool, sink: Any) -> None:
        tail: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ]
        renderer = structlog.processors.JSONRenderer()
        procs = (
            [mesh.processor, *tail, mesh.mask_secrets, renderer] if with_mesh else [*tail, renderer]
        )
        structlog.configure(
            processors=procs,
            logger_factory=structlog.WriteLoggerFactory(sink),
            cache_logger_on_first_use=True,
        )

    def run(with_mesh: bool, count: int, sink: Any) -> float:
        configure(with_mesh, sink)
        log = structlog.get_logger()
        start = time.perf_counter_ns()
        for i in range(count):
            log.info("user clicked", user_id=i, page="home")
        return (time.perf_counter_ns() - start) / count

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "flow.tsv").write_text(EVENT_FLOW)
        Path(tmp, "mesh.toml").write_text('flow = "flow.tsv"\n[machines]\nclient = ""\n')
        structlog.configure(processors=[mesh.processor])
        node = mesh.connect(Path(tmp, "mesh.toml"), machine="client")  # the processor is live
        with open(os.devnull, "w") as sink:
            run(True, 2000, sink)
            run(False, 2000, sink)
            base, meshed = [], []
            for r in range(int(rounds)):  # paired rounds, the order alternating
                if r % 2:
                    meshed.append(run(True, int(events), sink))
                    base.append(run(False, int(events), sink))
                else:
                    base.append(run(False, int(events), sink))
                    meshed.append(run(True, int(events), sink))
        node.close()
    print(json.dumps({"without_ns": base, "with_ns": meshed}))
    return 0


# -- the run -------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    if not values:
        return "-"
    m = med(values)
    if len(values) == 1:
        return format(m, fmt)
    return f"{m:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def collect(cells: list[dict[str, Any]], system: str, n: int, c: int, key: str) -> list[float]:
    return [
        x[key] for x in cells if x["system"] == system and x["n"] == n and x["c"] == c and key in x
    ]


def measure(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()},"
        f" Python {platform.python_version()}",
        "load_before": os.getloadavg(),
        "settings": {
            "repeats": args.repeats,
            "seconds": args.seconds,
            "hops": HOPS,
            "concurrency": args.concurrency,
            "systems": args.systems,
        },
        "drivers": {name: DRIVERS[name] for name in args.systems},
        "cells": [],
        "unavailable": {},
    }
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as folder:
        tmp = Path(folder)
        every: dict[str, Callable[[Procs, Path], System]] = {
            "mesh": start_mesh,
            "mesh-async": start_mesh_async,
            "raw": start_raw,
            "raw-stream": start_raw_stream,
            "celery": start_celery,
        }
        starters = [(name, every[name]) for name in args.systems]
        systems = []
        for name, starter in starters:
            say(f"starting {name} ...")
            system = starter(procs, tmp)
            if system.unavailable:
                say(f"  {name} left out: {system.unavailable}")
                results["unavailable"][name] = system.unavailable
                continue
            say(f"  {name}: {len(system.peers)} processes, idle RSS {idle_rss(system):.1f} MiB max")
            systems.append(system)
        results["idle_rss_mib"] = {s.name: idle_rss(s) for s in systems}
        results["pids"] = {s.name: [p.pid for p in procs.started if p in s.peers] for s in systems}
        results["pids"]["all"] = [p.pid for p in procs.started]
        events: dict[str, list[float]] = {"without_ns": [], "with_ns": []}
        pings: list[float] = []
        hops: dict[str, list[float]] = {}
        for r in range(args.repeats):
            say(f"repeat {r + 1}/{args.repeats}")
            pings.append(ping_pong(procs, args.pings))
            ev = subprocess.run(
                [sys.executable, str(SELF), "_events", str(args.events), str(args.rounds)],
                capture_output=True,
                text=True,
                env=env_with_repo(),
                check=True,
            )
            got = json.loads(ev.stdout)
            for key, values in events.items():
                values.extend(got[key])
            hop = subprocess.run(
                [sys.executable, str(SELF), "_hop", str(args.hop_calls), str(args.rounds)],
                capture_output=True,
                text=True,
                env=env_with_repo(),
                check=True,
            )
            for key, values in json.loads(hop.stdout).items():
                hops.setdefault(key, []).extend(values)
            for n in HOPS:
                for c in args.concurrency:
                    # Interleaved cell by cell: drift on a shared machine hits all alike.
                    order = systems[r % len(systems) :] + systems[: r % len(systems)]
                    for system in order:
                        cell = system.run(n, c, args.seconds)
                        cell.update(system=system.name, n=n, c=c, repeat=r)
                        results["cells"].append(cell)
                        if cell["errors"]:
                            say(
                                f"  {system.name} N={n} c={c}: {cell['errors']} errors,"
                                f" e.g. {cell['first_error']}"
                            )
        results["ping_pong_us"] = pings
        results["events"] = events
        results["hop_in_process_us"] = hops
    results["load_after"] = os.getloadavg()
    return results


def idle_rss(system: System) -> float:
    return max((status_kib(pid, "VmRSS") for pid in system.peer_pids()), default=0) / 1024


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def summarize(results: dict[str, Any]) -> list[str]:
    """The table and the PASS/FAIL lines; also fills results["summary"]."""
    cells = results["cells"]
    conc = tuple(results["settings"]["concurrency"])

    def m(s: str, n: int, c: int, key: str) -> float:
        return med(collect(cells, s, n, c, key))

    systems = [s for s in SYSTEMS if any(x["system"] == s for x in cells)]
    out = [
        f"mesh benchmark {results['date']} on {results['machine']};"
        f" load {results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after",
        f"{results['settings']['repeats']} interleaved repeats of"
        f" {results['settings']['seconds']} s per cell; median (min-max)",
        "drivers (what originates the flows):",
        *(f"  {s:<11}{results.get('drivers', DRIVERS).get(s, '?')}" for s in systems),
        "handlers: mesh plain functions (on worker threads), mesh-async `async def` (on the"
        " event loop)",
        "",
        f"{'system':<11}{'N':>3}{'c':>5}  {'flows/s':<16}{'p50 ms':<24}{'p99 ms':<24}"
        f"{'peer CPU ms/flow':<20}{'peak RSS MiB'}",
    ]
    for n in HOPS:
        for c in conc:
            for s in systems:

                def col(key: str, fmt: str = ".2f", s: str = s, c: int = c, n: int = n) -> str:
                    return spread(collect(cells, s, n, c, key), fmt)

                ms = ".1f" if m(s, n, c, "p50_ms") >= 100 else ".2f"
                out.append(
                    f"{s:<11}{n:>3}{c:>5}  {col('flows_per_s', '.0f'):<16}{col('p50_ms', ms):<24}"
                    f"{col('p99_ms', ms):<24}{col('peer_cpu_ms_per_flow'):<20}"
                    f"{med(collect(cells, s, n, c, 'peak_rss_mib')):.1f}"
                )
        out.append("")

    summary: dict[str, Any] = {}
    for s in systems:
        if s == "celery":
            continue
        per_repeat = [
            (a - b) / (HOPS[1] - HOPS[0])
            for a, b in zip(
                collect(cells, s, HOPS[1], 1, "p50_ms"),
                collect(cells, s, HOPS[0], 1, "p50_ms"),
                strict=False,
            )
        ]
        summary[f"{s}_per_hop_ms"] = per_repeat
        out.append(f"per-hop marginal cost, {s}: {spread(per_repeat, '.3f')} ms")
    for s in ("mesh", "mesh-async"):
        for n in HOPS if s in systems else ():
            path = collect(cells, s, n, 1, "reply_path_ms")
            if path:
                share = [
                    r / p for r, p in zip(path, collect(cells, s, n, 1, "p50_ms"), strict=False)
                ]
                summary[f"{s}_reply_path_share_{n}"] = share
                out.append(
                    f"reply path, {s}, N={n}, one flow at a time: {spread(path, '.2f')} ms"
                    f" from the last step's end to the result, {spread(share, '.2f')} of the"
                    " p50 (what a direct return could shorten to one hop)"
                )
    growth = {s: collect_all(cells, s, "rss_growth_mib") for s in systems}
    for s in systems:
        out.append(
            f"peer RSS growth idle -> {max(conc)} in flight, {s}:"
            f" {spread(growth[s], '.1f')} MiB (idle {results['idle_rss_mib'][s]:.1f} MiB)"
        )
    ev = results["events"]
    without, with_ = med(ev["without_ns"]), med(ev["with_ns"])
    # Each round measures both chains back to back: the ratio within a round is
    # what load on a shared machine disturbs least.
    event_ratios = [w / wo for w, wo in zip(ev["with_ns"], ev["without_ns"], strict=True)]
    summary["event_ratios"] = event_ratios
    out.append(
        f"non-flow structlog event: {without:.0f} ns without, {with_:.0f} ns with the mesh"
        f" processors; ratio per round {spread(event_ratios, '.3f')}"
    )
    out.append(f"loopback TCP ping-pong, 200 bytes: {spread(results['ping_pong_us'], '.1f')} µs")
    hop = results["hop_in_process_us"]
    own = [m - r for m, r in zip(hop["mesh_us"], hop["raw_us"], strict=True)]
    summary["mesh_own_work_us"] = own
    out.append(
        f"one hop in process, no network: mesh {spread(hop['mesh_us'], '.0f')} µs, raw"
        f" {spread(hop['raw_us'], '.0f')} µs; the mesh's own work {spread(own, '.0f')} µs"
        f" (best rounds {min(hop['mesh_us']):.0f} vs {min(hop['raw_us']):.0f} µs)"
    )
    if hop.get("mesh_async_us"):  # runs before this key was measured have none
        own_async = [m - r for m, r in zip(hop["mesh_async_us"], hop["raw_us"], strict=True)]
        summary["mesh_async_own_work_us"] = own_async
        out.append(
            f"  with an async def handler (no worker thread): mesh"
            f" {spread(hop['mesh_async_us'], '.0f')} µs; the mesh's own work"
            f" {spread(own_async, '.0f')} µs"
        )
    out.append("")
    out.append(
        "targets (X/raw, X/raw-stream: the median of each repeat's ratio, its cells run back to"
        " back; others: medians of this run). Judged on mesh (sync handlers); [mesh-async:"
        " the same ratio with async def handlers]:"
    )

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    def paired(a: list[float], b: list[float]) -> float:
        """The median of per-repeat ratios: drift on a shared machine between repeats
        cancels out, since each repeat ran both cells within seconds of each other."""
        ratios = [ratio(x, y) for x, y in zip(a, b, strict=False)]
        return med(ratios) if ratios else float("nan")

    def vs(mesh: str, other: str, n: int, c: int, key: str) -> float:
        return paired(collect(cells, mesh, n, c, key), collect(cells, other, n, c, key))

    # label (with "mesh" where the variant's name goes), value of a variant, limit,
    # lower-is-better, and whether mesh-async gets its own ratio beside it.
    checks: list[tuple[str, Callable[[str], float], float, bool, bool]] = []
    fast = [c for c in (32, 128) if c in conc]
    for n in HOPS:
        if "raw" in systems:
            for c in fast:
                checks.append(
                    (
                        f"mesh/raw throughput at c={c}, N={n}",
                        lambda v, n=n, c=c: vs(v, "raw", n, c, "flows_per_s"),
                        1.6,
                        False,
                        True,
                    )
                )
            checks.append(
                (
                    f"mesh/raw sequential p50 latency, N={n}",
                    lambda v, n=n: vs(v, "raw", n, 1, "p50_ms"),
                    0.75,
                    True,
                    True,
                )
            )
            checks.append(
                (
                    f"mesh/raw peers' CPU per flow at c=32, N={n}",
                    lambda v, n=n: vs(v, "raw", n, 32, "peer_cpu_ms_per_flow"),
                    0.65,
                    True,
                    True,
                )
            )
        if "raw-stream" in systems:
            for c in fast:
                checks.append(
                    (
                        f"mesh/raw-stream throughput at c={c}, N={n}",
                        lambda v, n=n, c=c: vs(v, "raw-stream", n, c, "flows_per_s"),
                        0.85,
                        False,
                        True,
                    )
                )
            checks.append(
                (
                    f"mesh/raw-stream sequential p50 latency, N={n}",
                    lambda v, n=n: vs(v, "raw-stream", n, 1, "p50_ms"),
                    1.2,
                    True,
                    True,
                )
            )
    if 32 in conc and 128 in conc:
        for n in HOPS:
            checks.append(
                (
                    f"mesh throughput c=128 / c=32, N={n}",
                    lambda v, n=n: ratio(m(v, n, 128, "flows_per_s"), m(v, n, 32, "flows_per_s")),
                    0.8,
                    False,
                    True,
                )
            )
    if "celery" in systems:
        for n in HOPS:
            checks.append(
                (
                    f"celery/mesh sequential p50 latency, N={n}",
                    lambda v, n=n: ratio(m("celery", n, 1, "p50_ms"), m(v, n, 1, "p50_ms")),
                    3.0,
                    False,
                    True,
                )
            )
            checks.append(
                (
                    f"mesh at c=32 / celery's best throughput, N={n}",
                    lambda v, n=n: ratio(
                        m(v, n, 32, "flows_per_s"),
                        max(m("celery", n, c, "flows_per_s") for c in conc),
                    ),
                    3.0,
                    False,
                    True,
                )
            )
    checks.append(
        (
            "non-flow event with/without mesh processors",
            lambda v: med(event_ratios),
            1.05,
            True,
            False,
        )
    )
    checks.append(
        (
            f"mesh peer RSS growth to {max(conc)} in flight, MiB",
            lambda v: med(growth.get(v, [])),
            50.0,
            True,
            True,
        )
    )
    summary["targets"] = []
    judged = "mesh" if "mesh" in systems else "mesh-async"
    for label, value_of, limit, lower, beside in checks:
        sign = "<=" if lower else ">="

        def verdict(value: float) -> bool:
            return value <= limit if lower else value >= limit  # noqa: B023 - used at once

        value = value_of(judged)
        shown = label if judged == "mesh" else label.replace("mesh", judged, 1)
        if math.isnan(value):  # a cell this run did not measure
            out.append(f"  n/a   {shown}: not measured in this run (target {sign} {limit})")
            continue
        ok = verdict(value)
        line = f"  {'PASS' if ok else 'FAIL'}  {shown}: {value:.3f} (target {sign} {limit})"
        target: dict[str, Any] = {
            "label": shown,
            "system": judged,
            "value": value,
            "limit": limit,
            "pass": ok,
        }
        if beside and judged == "mesh" and "mesh-async" in systems:
            other = value_of("mesh-async")
            if not math.isnan(other):
                line += f"  [mesh-async: {other:.3f} {'PASS' if verdict(other) else 'FAIL'}]"
                target["mesh_async"] = {"value": other, "pass": verdict(other)}
        out.append(line)
        summary["targets"].append(target)
    if results["unavailable"]:
        for name, why in results["unavailable"].items():
            out.append(f"  (left out: {name}: {why})")
    results["summary"] = summary
    return out


def collect_all(cells: list[dict[str, Any]], system: str, key: str) -> list[float]:
    return [x[key] for x in cells if x["system"] == system and key in x]


@contextlib.contextmanager
def interrupts_stop() -> Iterator[None]:
    """SIGTERM behaves as Ctrl-C, so the finally that stops the children runs."""

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("_"):
        roles: dict[str, Callable[..., int]] = {
            "_raw": role_raw,
            "_raw_stream": role_raw_stream,
            "_echo": role_echo,
            "_events": role_events,
            "_hop": role_hop,
        }
        if argv[0] == "_drive":
            return role_drive(argv[1], argv[2:])
        return roles[argv[0]](*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="about a minute: 2 repeats of 0.3 s, c = 1, 32, 128"
    )
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    parser.add_argument("--seconds", type=float, help="seconds per cell (default 2)")
    parser.add_argument(
        "--systems",
        help=f"which systems to run, comma-separated (default all: {','.join(SYSTEMS)})",
    )
    parser.add_argument("--no-celery", action="store_true", help="leave the Celery chain out")
    parser.add_argument(
        "--concurrency",
        help="flows in flight per cell, comma-separated (default 1,8,32,128; --quick: 1,32,128)",
    )
    parser.add_argument("--out", default="bench-results.json", help="where the JSON goes")
    parser.add_argument(
        "--summarize", metavar="JSON", help="print the table of an earlier run's JSON; run nothing"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        try:
            print("\n".join(summarize(json.loads(Path(args.summarize).read_text()))))
        except (OSError, ValueError, KeyError) as exc:
            say(f"bench: cannot summarize {args.summarize}: {exc!r}")
            return 1
        return 0
    args.systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: no system {unknown[0]!r} (known: {', '.join(SYSTEMS)})")
    if args.no_celery and "celery" in args.systems:
        args.systems.remove("celery")
    if args.concurrency is None:
        args.concurrency = "1,32,128" if args.quick else ",".join(map(str, CONCURRENCY))
    try:
        args.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: give numbers like 1,8,32")
    # --quick: about a minute, for a look; the figures worth quoting come without it.
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.seconds = args.seconds or (0.3 if args.quick else 2.0)
    args.events = 5000 if args.quick else 20000
    args.rounds = 5 if args.quick else 7
    args.hop_calls = 1000 if args.quick else 3000
    args.pings = 2000 if args.quick else 10000
    procs = Procs()
    try:
        with interrupts_stop():
            results = measure(args, procs)
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        say(f"bench failed: {exc}")
        return 1
    finally:
        procs.stop_all()
    lines = summarize(results)
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
