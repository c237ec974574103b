"""Durable mesh flows against non-durable ones and against DBOS Transact, side by side.

The same 4-step workflow (each step logs one structlog line and passes ~200 bytes of
JSON on) five ways:

* **mesh**: a non-durable flow over 4 peer processes (``m0``..``m3``), started by an
  address-less originator with ``await node.start_async_with(...)``: the baseline.
* **durable-full** / **durable-normal**: the same flow with ``durable = true``, every
  peer journaling each step in its own SQLite file (WAL, ``synchronous`` FULL / NORMAL).
* **dbos-full** / **dbos-normal**: DBOS Transact (PyPI ``dbos``) running the workflow
  as 4 ``@DBOS.step`` functions in one process, its SQLite system database in WAL mode
  with the same ``synchronous`` level; flows started with ``DBOS.start_workflow`` from
  one thread per flow in flight.

For 1 and 32 flows in flight: flows/s, p50/p99 and CPU per flow (the peers' and the
driver's, from ``/proc``). Cells are interleaved and repeated; medians are shown with
min-max, and the issue's targets are printed PASS/FAIL as ratios of this run.

``--recover N`` measures recovery instead: N durable flows held in their last step,
that process killed with SIGKILL and started again; the time from its start to the
first and to the last resumed flow finishing, for the mesh (the last peer restarted)
and for DBOS (its one process restarted).

    .venv/bin/python scripts/bench_durable.py [--quick] [--smoke] [--systems mesh,...]
                                              [--no-dbos] [--recover 1000]

Every process it starts is stopped by its pid. Compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (
    CONTEXT,
    Procs,
    System,
    cpu_seconds,
    env_with_repo,
    free_port,
    say,
    serve_cells,
    serve_cells_async,
    start_driver,
    wait_grpc,
)

N = 4
SELF = Path(__file__).resolve()
FLOW_TIMEOUT = 120.0
SYSTEMS = ("mesh", "durable-full", "durable-normal", "dbos-full", "dbos-normal")

MESH_SERVICE = """
import asyncio
import os
import time
from pathlib import Path

import structlog

import mesh

log = structlog.get_logger()
HOLD = os.environ.get("BENCH_HOLD")


def _hop(i):
    {define} hop(ctx):
        if HOLD and i == {last}:
            # --recover: note the flow as held, then wait to be killed (holding no thread:
            # a thousand flows wait here at once).
            with open(HOLD, "a") as f:
                f.write(mesh.step_id().flow_id + "\\n")
            {hold}
        log.info("next", hop=i)

    hop.__name__ = f"hop{{i}}"
    return hop


for _i in range({n}):
    mesh.handler("chain", "hop {{}} for :user".format(_i))(_hop(_i))
"""


def mesh_folder(tmp: Path, name: str, synchronous: str | None, *, define: str = "def") -> Path:
    folder = tmp / name
    folder.mkdir()
    rows = ["Request\tLog\tMachine"] + [f"chain\thop {i} for :user\tm{i}" for i in range(N)]
    (folder / "flow.tsv").write_text("\n".join(rows) + "\n")
    (folder / "bench_hops.py").write_text(
        MESH_SERVICE.format(
            n=N,
            last=N - 1,
            define=define,
            hold="await asyncio.sleep(3600)" if define == "async def" else "time.sleep(3600)",
        )
    )
    machines = "\n".join(f'm{i} = "127.0.0.1:{free_port()}"' for i in range(N))
    durable = f'durable = true\n[journal]\nsynchronous = "{synchronous}"\n' if synchronous else ""
    (folder / "mesh.toml").write_text(
        f'flow = "flow.tsv"\nservices = ["bench_hops"]\ntimeout = {FLOW_TIMEOUT}\n'
        f'{durable}[machines]\nclient = ""\n{machines}\n'
    )
    return folder


def mesh_addresses(folder: Path) -> list[str]:
    text = (folder / "mesh.toml").read_text()
    return [line.split('"')[1] for line in text.splitlines() if line.startswith("m")]


def start_peer(
    procs: Procs, folder: Path, i: int, env: dict[str, str], **kw: Any
) -> subprocess.Popen[Any]:
    cfg = str(folder / "mesh.toml")
    return procs.start(
        [sys.executable, "-m", "mesh", "peer", f"m{i}", "-c", cfg, "--json"],
        env=env,
        cwd=folder,
        **kw,
    )


def listened_at(proc: subprocess.Popen[Any]) -> dict[str, float]:
    """When ``proc`` (a ``mesh peer`` with its stderr piped) says it listens, filled in by a
    thread reading its stderr."""
    seen: dict[str, float] = {}

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening on" in line and "at" not in seen:
                seen["at"] = time.time()

    threading.Thread(target=read, daemon=True).start()
    return seen


def start_mesh(procs: Procs, tmp: Path, name: str) -> System:
    synchronous = name.split("-")[1] if name.startswith("durable") else None
    folder = mesh_folder(tmp, name, synchronous)
    system = System(name)
    env = env_with_repo()
    system.peers = [start_peer(procs, folder, i, env) for i in range(N)]
    wait_grpc(mesh_addresses(folder), system.peers)
    start_driver(procs, system, str(folder / "mesh.toml"), script=SELF)
    return system


def start_dbos(procs: Procs, tmp: Path, name: str) -> System:
    folder = tmp / name
    folder.mkdir()
    system = System(name)
    start_driver(procs, system, str(folder / "dbos.sqlite"), name.split("-")[1], script=SELF)
    return system


# -- DBOS ----------------------------------------------------------------------


def dbos_app(path: str, synchronous: str, *, launch: bool = True) -> Callable[..., Any]:
    """DBOS with a SQLite system database in WAL mode at the given ``synchronous``; returns
    the 4-step workflow function."""
    import sqlalchemy as sa
    import structlog
    from dbos import DBOS

    engine = sa.create_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = "IMMEDIATE"  # as DBOS sets its own engine
        dbapi_conn.execute("PRAGMA busy_timeout=30000")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute(f"PRAGMA synchronous={synchronous.upper()}")

    DBOS(
        config={
            "name": "bench-durable",
            "system_database_url": f"sqlite:///{path}",
            "system_database_engine": engine,
            "run_admin_server": False,
            "log_level": "WARNING",
        }
    )
    log = structlog.get_logger()
    hold = os.environ.get("BENCH_HOLD")

    def make_step(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        @DBOS.step(name=f"hop{i}")
        def step(ctx: dict[str, Any]) -> dict[str, Any]:
            if hold and i == N - 1:
                with open(hold, "a") as f:
                    f.write(str(DBOS.workflow_id) + "\n")
                time.sleep(3600)
            log.info("hop", hop=i, user=ctx["user"])
            return {**ctx, "hop": i}

        return step

    steps = [make_step(i) for i in range(N)]

    @DBOS.workflow(name="chain")
    def chain(ctx: dict[str, Any]) -> dict[str, Any]:
        for step in steps:
            ctx = step(ctx)
        return ctx

    if launch:
        DBOS.launch()
    return chain


def quiet_structlog() -> None:
    import structlog

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(devnull),
    )


def role_drive(system: str, args: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if system.startswith("dbos"):
        return drive_dbos(args[0], args[1])
    return asyncio.run(drive_mesh(args[0]))


def drive_dbos(path: str, synchronous: str) -> int:
    from dbos import DBOS

    quiet_structlog()
    chain = dbos_app(path, synchronous)

    def call(_n: int) -> None:
        result = DBOS.start_workflow(chain, dict(CONTEXT)).get_result()
        if result.get("hop") != N - 1:
            raise RuntimeError(f"dbos workflow ended with {result!r}")

    code = serve_cells(call, (N,))
    DBOS.destroy()
    return code


async def drive_mesh(cfg: str) -> int:
    import mesh

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the driver
    mesh.configure_logging(json=True, file=devnull)
    os.chdir(Path(cfg).parent)
    node = mesh.connect(cfg, machine="client")

    async def flow(_n: int) -> None:
        result = await node.start_async_with("chain", CONTEXT, timeout=FLOW_TIMEOUT)
        if result.context.get("hop") != N - 1:
            raise RuntimeError(f"mesh flow ended with {result.context!r}")

    code = await serve_cells_async(flow, (N,))
    node.close()
    return code


# -- throughput and latency -----------------------------------------------------


def run_cell(system: System, c: int, seconds: float) -> dict[str, Any]:
    assert system.driver is not None
    system._send({"n": N, "c": c, "seconds": seconds})
    system._expect("ready")
    pids = [*system.peer_pids(), system.driver.pid]
    cpu0 = sum(cpu_seconds(pid) for pid in pids)
    system._send("go")
    result: dict[str, Any] = json.loads(system._expect(None))
    cpu1 = sum(cpu_seconds(pid) for pid in pids)
    result["cpu_ms_per_flow"] = (cpu1 - cpu0) * 1000 / max(result["count"], 1)
    return result


def measure(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    systems: dict[str, System] = {}
    for name in args.systems:
        say(f"starting {name}")
        start = start_dbos if name.startswith("dbos") else start_mesh
        systems[name] = start(procs, tmp, name)
    cells: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for c in args.concurrency:
            for name, system in systems.items():
                result = run_cell(system, c, args.seconds)
                result.update(system=name, c=c, repeat=repeat)
                cells.setdefault(f"{name} c={c}", []).append(result)
                say(
                    f"  {name:15} c={c:<3} {result['flows_per_s']:8.1f}/s  "
                    f"p50 {result['p50_ms']:7.2f} ms  errors {result['errors']}"
                )
                if result["errors"]:
                    say(f"    first error: {result['first_error']}")
    return cells


def med(cells: dict[str, list[dict[str, Any]]], name: str, c: int, key: str) -> float | None:
    values = [cell[key] for cell in cells.get(f"{name} c={c}", [])]
    return statistics.median(values) if values else None


def summarize(cells: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    lines = [
        f"{'system':15} {'c':>3} {'flows/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/flow':>12}"
    ]
    for name in args.systems:
        for c in args.concurrency:
            rows = cells.get(f"{name} c={c}", [])
            if not rows:
                continue
            fps = [r["flows_per_s"] for r in rows]
            lines.append(
                f"{name:15} {c:>3} {statistics.median(fps):9.1f} "
                f"{med(cells, name, c, 'p50_ms'):8.2f} {med(cells, name, c, 'p99_ms'):8.2f} "
                f"{med(cells, name, c, 'cpu_ms_per_flow'):12.2f}   "
                f"(flows/s {min(fps):.0f}-{max(fps):.0f})"
            )
    lines.append("")
    lines += targets(cells, args)
    return lines


def targets(cells: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    out = ["targets (ratios of this run's medians):"]
    hi = max(args.concurrency)

    def ratio(a: str, b: str, c: int, key: str) -> float | None:
        x, y = med(cells, a, c, key), med(cells, b, c, key)
        return x / y if x is not None and y else None

    def check(label: str, value: float | None, op: str, bound: float) -> None:
        if value is None:
            return
        ok = value >= bound if op == ">=" else value <= bound
        out.append(f"  {label:55} {value:6.2f}x  target {op} {bound}x  {'PASS' if ok else 'FAIL'}")

    for level in ("full", "normal"):
        durable = f"durable-{level}"
        check(
            f"{durable}/mesh throughput, c={hi}",
            ratio(durable, "mesh", hi, "flows_per_s"),
            ">=",
            0.7,
        )
        check(f"{durable}/mesh sequential p50", ratio(durable, "mesh", 1, "p50_ms"), "<=", 1.4)
        dbos = f"dbos-{level}"
        check(
            f"{durable}/{dbos} throughput, c={hi}",
            ratio(durable, dbos, hi, "flows_per_s"),
            ">=",
            3.0,
        )
        check(f"{durable}/{dbos} sequential p50", ratio(durable, dbos, 1, "p50_ms"), "<=", 0.5)
        r = ratio(durable, dbos, hi, "cpu_ms_per_flow")
        if r is not None:
            out.append(f"  {durable}/{dbos} CPU per flow, c={hi}{'':24} {r:6.2f}x  (reported)")
    return out


# -- recovery ------------------------------------------------------------------


def wait_lines(path: Path, count: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        have = len(path.read_text().splitlines()) if path.exists() else 0
        if have >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: only {have} of {count} flows reached the held step")
        time.sleep(0.05)


def recover_mesh(procs: Procs, tmp: Path, count: int) -> dict[str, float]:
    """``count`` durable flows held in the last step on m3; kill -9 m3; restart it; time the
    first and the last flow's result at the originator from the restart."""
    folder = mesh_folder(tmp, "recover-mesh", "normal", define="async def")
    held = folder / "held.txt"
    env = env_with_repo()
    peers = [start_peer(procs, folder, i, env) for i in range(N - 1)]
    peers.append(start_peer(procs, folder, N - 1, {**env, "BENCH_HOLD": str(held)}))
    wait_grpc(mesh_addresses(folder), peers)
    driver = procs.start(
        [sys.executable, str(SELF), "_recover_mesh", str(folder / "mesh.toml"), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_lines(held, count, 120.0, "mesh")
    os.kill(peers[-1].pid, signal.SIGKILL)
    peers[-1].wait()
    restarted = time.time()
    again = start_peer(procs, folder, N - 1, env, stderr=subprocess.PIPE, text=True)
    listening = listened_at(again)
    assert driver.stdin and driver.stdout
    driver.stdin.write(f"{restarted}\n")
    driver.stdin.flush()
    result: dict[str, float] = json.loads(driver.stdout.readline())
    if "at" in listening:
        result["listening_s"] = listening["at"] - restarted
    return result


def role_recover_mesh(cfg: str, count: str) -> int:
    """The originator of --recover: starts the flows, then reports when results arrive."""
    import mesh

    devnull = open(os.devnull, "w")  # noqa: SIM115
    mesh.configure_logging(json=True, file=devnull)
    os.chdir(Path(cfg).parent)
    node = mesh.connect(cfg, machine="client")

    async def run() -> dict[str, float]:
        tasks = [
            asyncio.ensure_future(node.start_async_with("chain", CONTEXT, timeout=FLOW_TIMEOUT))
            for _ in range(int(count))
        ]
        loop = asyncio.get_running_loop()
        restarted = float(await loop.run_in_executor(None, sys.stdin.readline))
        done_at = []
        for task in asyncio.as_completed(tasks):
            await task
            done_at.append(time.time())
        return {"first_s": min(done_at) - restarted, "all_s": max(done_at) - restarted}

    print(json.dumps(asyncio.run(run())), flush=True)
    node.close()
    return 0


def recover_dbos(procs: Procs, tmp: Path, count: int) -> dict[str, float]:
    folder = tmp / "recover-dbos"
    folder.mkdir()
    db, held = folder / "dbos.sqlite", folder / "held.txt"
    env = env_with_repo()
    first = procs.start(
        [sys.executable, str(SELF), "_recover_dbos", str(db), str(count), "start"],
        env={**env, "BENCH_HOLD": str(held)},
    )
    wait_lines(held, count, 120.0, "dbos")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    restarted = time.time()
    second = procs.start(
        [sys.executable, str(SELF), "_recover_dbos", str(db), str(count), "recover"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert second.stdout
    times = json.loads(second.stdout.readline())
    return {"first_s": times["first"] - restarted, "all_s": times["all"] - restarted}


def role_recover_dbos(db: str, count: str, phase: str) -> int:
    from dbos import DBOS

    quiet_structlog()
    chain = dbos_app(db, "normal", launch=False)
    if phase == "start":
        DBOS.launch()
        for _ in range(int(count)):
            DBOS.start_workflow(chain, dict(CONTEXT))
        time.sleep(3600)
        return 0
    DBOS.launch()  # recovers the pending workflows of this executor
    handles = [DBOS.retrieve_workflow(w.workflow_id) for w in DBOS.list_workflows()]
    done_at: list[float] = []
    lock = threading.Lock()

    def wait(handle: Any) -> None:
        handle.get_result()
        with lock:
            done_at.append(time.time())

    threads = [threading.Thread(target=wait, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"first": min(done_at), "all": max(done_at)}), flush=True)
    DBOS.destroy()
    return 0


# -- main ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_drive":
        return role_drive(argv[1], argv[2:])
    if argv and argv[0] == "_recover_mesh":
        return role_recover_mesh(*argv[1:])
    if argv and argv[0] == "_recover_dbos":
        return role_recover_dbos(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of 1 s")
    parser.add_argument("--smoke", action="store_true", help="one short cell each: a check")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    parser.add_argument("--seconds", type=float, help="seconds per cell (default 2)")
    parser.add_argument("--systems", help=f"comma-separated (default {','.join(SYSTEMS)})")
    parser.add_argument("--no-dbos", action="store_true", help="leave DBOS out")
    parser.add_argument("--recover", type=int, metavar="N", help="measure recovery of N flows")
    args = parser.parse_args(argv)
    args.systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: no system {unknown[0]!r} (known: {', '.join(SYSTEMS)})")
    if args.no_dbos or not dbos_installed():
        if not args.no_dbos:
            say("dbos is not installed (pip install 'structlog-mesh[bench]'): leaving it out")
        args.systems = [s for s in args.systems if not s.startswith("dbos")]
    args.concurrency = (1, 32)
    args.repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    args.seconds = args.seconds or (0.3 if args.smoke else 1.0 if args.quick else 2.0)
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="mesh-bench-durable-") as tmp:
        try:
            if args.recover:
                lines = [
                    f"recovery of {args.recover} flows held in the last step (kill -9, restart):"
                ]
                for name, fn in (("mesh", recover_mesh), ("dbos", recover_dbos)):
                    if not any(
                        s.startswith(name if name == "dbos" else "durable") for s in args.systems
                    ):
                        continue
                    figures = fn(procs, Path(tmp), args.recover)
                    procs.stop_all()
                    lines.append(
                        f"  {name:5} first resumed flow done {figures['first_s']:6.2f} s, "
                        f"all {figures['all_s']:6.2f} s after the process started"
                        + ("  (target for the mesh: first <= 0.5 s)" if name == "mesh" else "")
                    )
                    if "listening_s" in figures:
                        lines.append(
                            f"  {'':5} of which {figures['listening_s']:.2f} s until it listened"
                            " (interpreter, imports, journal open, recovery started)"
                        )
            else:
                lines = summarize(measure(args, procs, Path(tmp)), args)
        except (RuntimeError, OSError) as exc:
            say(f"bench_durable failed: {exc}")
            return 1
        finally:
            procs.stop_all()
    print("\n".join(lines))
    return 0


def dbos_installed() -> bool:
    try:
        import dbos  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
