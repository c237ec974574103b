"""``mesh``: the command line, a parser and one thin function per command.

Commands read arguments, call the module that does the work and print its values:
``check`` prints :mod:`mesh.analysis`, ``up`` runs :mod:`mesh.supervisor`, ``peer`` and
``call`` use :class:`mesh.node.Node`, and the tools live in :mod:`mesh.tools`.

Every command finds its config through ``-c PATH``, else ``$MESH_CONFIG``, else
``./mesh.toml``. Errors are one line on stderr and a non-zero exit; a traceback
means a bug in the mesh.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from mesh import analysis, deadlines, supervisor, versions
from mesh.addresses import dialable
from mesh.colour import Palette, palette
from mesh.config import Config, check_machine, find_config, load_config
from mesh.distribution import DISTRIBUTION, install_hint, version
from mesh.errors import MeshError
from mesh.flowfile import Flow, FlowSet, load_flows
from mesh.logconfig import configure_logging
from mesh.node import Node, connect
from mesh.peer import wait_serving
from mesh.processors import install
from mesh.registry import default_registry, import_services
from mesh.result import FlowResult
from mesh.tools import diagram, scaffold, transcript
from mesh.transport import Transport

EXIT_FAILURE = 1
EXIT_USAGE = 2


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="Distribute an application's work across machines by its log lines.",
    )
    parser.add_argument("--version", action="version", version=f"mesh {version()} ({DISTRIBUTION})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "-c",
            "--config",
            metavar="PATH",
            help="mesh.toml (default: $MESH_CONFIG, else ./mesh.toml)",
        )
        return p

    check = add("check", "validate flow files, config and services; print each request's plan")
    check.add_argument(
        "--against",
        metavar="OLD_FILE",
        action="append",
        help="also say whether changing from this flow file (repeat for several) to the"
        " config's is safe for flows in flight: exit 1 if not",
    )

    peer = add("peer", "serve one machine's lines")
    peer.add_argument(
        "machine", metavar="MACHINE", help="the machine to serve, as [machines] names it"
    )
    peer.add_argument(
        "--listen", metavar="HOST:PORT", help="bind here instead of the config's listen"
    )
    peer.add_argument(
        "--replica",
        type=int,
        metavar="K",
        help="serve replica K (1..N) of a machine with replicas: bind its K-th address",
    )
    peer.add_argument("--json", action="store_true", help="log one JSON object a line")
    peer.add_argument(
        "--log-file", metavar="PATH", help="append logs to this file instead of stdout"
    )
    peer.add_argument(
        "--log-level",
        default="info",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default info)",
    )

    up = add("up", "start a peer for every machine with an address; stop them on Ctrl-C")
    up.add_argument(
        "--log-dir",
        metavar="DIR",
        help="also append each peer's JSON log to DIR/MACHINE.log (replicas: MACHINE.K.log),"
        " for mesh logs",
    )

    call = add("call", "start a flow and print its result and timeline")
    call.add_argument(
        "request", metavar="REQUEST", help="the request to start, as the flow file names it"
    )
    call.add_argument("params", nargs="*", metavar="key=value|key:=json", help="initial context")
    call.add_argument("--as", dest="machine", metavar="MACHINE", help="originate as this machine")
    call.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    call.add_argument("--timeout", type=float, metavar="SECONDS", help="the flow's deadline")
    call.add_argument(
        "--diagram", metavar="FILE", help="draw the run (.svg, .html, else Mermaid text)"
    )
    call.add_argument(
        "--log-file", metavar="PATH", help="append JSON logs here (for mesh logs), not stderr"
    )
    health = add("health", "check that a machine's peer serves (gRPC health, with its own TLS)")
    health.add_argument("machine", metavar="MACHINE", help="the machine whose peer to ask")
    health.add_argument(
        "--address", metavar="HOST:PORT", help="the peer to ask (default: where MACHINE binds)"
    )
    health.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after (default 5)"
    )
    _add_tool_commands(add)

    ui = add(
        "ui",
        f"serve a live page of the mesh: machines, flow file, flows (needs {install_hint('ui')})",
    )
    ui.add_argument(
        "--listen",
        default="127.0.0.1:8765",
        metavar="HOST:PORT",
        help="where to serve (default 127.0.0.1:8765); beyond loopback it asks for the token",
    )

    init = sub.add_parser(
        "init",
        help="write a small working project (a flow, mesh.toml, handlers) to start from",
        description="write a small working project to start from: a flow file with one"
        " request over two machines and a client, mesh.toml, a module with the handlers and"
        " a README saying how to run it",
    )
    init.add_argument("directory", nargs="?", default=".", metavar="DIR", help="default: .")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")

    certs = sub.add_parser(
        "certs",
        help=f"make a development CA and a certificate per machine (needs {install_hint('tls')})",
        description="make a development CA and a certificate per machine"
        f" (needs {install_hint('tls')})",
    )
    certs.add_argument(
        "directory", metavar="DIR", help="where to write the files (made if missing)"
    )
    certs.add_argument(
        "--machines", required=True, metavar="A,B,…", help="comma-separated machine names"
    )
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_argument_parser().parse_args(argv)
    command = {
        "check": _check,
        "health": _health,
        "peer": _peer,
        "up": _up,
        "call": _call,
        "certs": _certs,
        "init": _init,
        "ui": _ui,
        **_TOOL_COMMANDS,
    }[args.command]
    try:
        return command(args)
    except MeshError as exc:
        err = palette(sys.stderr)
        print(f"{err.paint(f'mesh {args.command}:', 'bold', 'red')} {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mesh check | head`: the reader has gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


# -- check -----------------------------------------------------------------


def _shown_index(step: dict[str, Any]) -> str:
    """A timeline row's number: ``receipt 1`` for a sub-flow's line, ``1[7]`` for a fan-out's
    run for element 7."""
    index = str(step["index"])
    if "element" in step:
        index += f"[{step['element']}]"
    return f"{step['request']} {index}" if "request" in step else index


def _shown_line(step: dict[str, Any]) -> str:
    return f"{step['line']} (skipped)" if step.get("skipped") else str(step["line"])


def _check(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config))
    import_services(config)
    found = analysis.check(config, default_registry)
    out, err = palette(sys.stdout), palette(sys.stderr)
    print(out.bold(str(config.path)))
    _table(found.machines, indent="  ")
    print()
    for flow in found.plans:
        print(f"{out.bold(flow.name)}  ({flow.path}, digest {flow.digest})")
        heading: tuple[str, ...] = ("#", "line", "machine", "handler", "how")
        if any(len(row) > len(heading) for row in flow.rows):  # conditions, fan-out, sub-flows
            heading = (*heading, "control")
        _table([heading, *flow.rows], "  ", header=out)
        print()
    for warning in found.warnings:
        print(f"{err.yellow('warning:')} {warning}", file=sys.stderr)
    for problem in found.problems:
        print(f"{err.red('error:')} {problem}", file=sys.stderr)
    if not found.ok:
        return EXIT_FAILURE
    print(
        f"{out.green('ok:')} {len(config.flows)} requests, {len(config.machines)} machines,"
        f" {found.handlers} handlers"
    )
    if args.against:
        return _against(load_flows(args.against), config.flows, out)
    return 0


def _against(old: FlowSet, new: FlowSet, out: Palette) -> int:
    """``mesh check --against``: each change from the old file, and whether flows in flight
    on it can go on (mesh.versions)."""
    changes = versions.compare(old, new)
    print()
    print(out.bold(f"against {', '.join(old.paths)}:"))
    for change in changes:
        mark = out.green("safe:  ") if change.safe else out.red("unsafe:")
        print(f"  {mark} {change.request}: {change.what}")
    unsafe = sum(not c.safe for c in changes)
    if unsafe:
        print(
            f"{out.red('unsafe:')} {unsafe} change(s) would stop flows in flight on the old"
            " file; drain them first (mesh flows --state running) or keep the old rows"
        )
        return EXIT_FAILURE
    print(f"{out.green('ok:')} safe for flows in flight" + ("" if changes else " (no changes)"))
    return 0


def _table(
    rows: Sequence[tuple[str, ...]], indent: str = "", *, header: Palette | None = None
) -> None:
    """Print ``rows`` in aligned columns; with ``header``, the first row is its heading."""
    columns = max(len(r) for r in rows)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(columns)]
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        text = "  ".join(cells).rstrip()
        print(indent + (header.bold(text) if header is not None and n == 0 else text))


# -- peer ------------------------------------------------------------------


def _peer_stop_event() -> threading.Event:
    """The event the first SIGTERM or SIGINT sets; a second one ends the process at once.

    Stopping waits up to ``grace`` for steps in progress; whoever sends a second
    signal (Ctrl-C twice) does not want to wait, whatever the handlers are doing.
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():
            stop.set()
            return
        # No logging here: the main thread may be inside a log write, holding its lock.
        os.write(2, f"mesh peer: {signal.Signals(signum).name} again; exiting now\n".encode())
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _peer(args: argparse.Namespace) -> int:
    stop = _peer_stop_event()
    log_file = _open_log(args.log_file) if args.log_file else None
    try:
        configure_logging(json=args.json or bool(log_file), level=args.log_level, file=log_file)
    except ValueError as exc:
        raise MeshError(str(exc)) from None
    # Configured once, before the services are imported: their loggers may bind on
    # first use instead of reassembling themselves on every call (every "next").
    structlog.configure(cache_logger_on_first_use=True)
    log = structlog.get_logger("mesh")
    path = find_config(args.config)
    check_machine(load_config(path), args.machine)  # a misspelt name: the closest suggested
    node = connect(path, machine=args.machine)
    try:
        listen = args.listen or replica_listen(node.config, node.machine, args.replica)
        port = node.serve(listen)
        host, sep, given = listen.rpartition(":")
        bound = f"{host}:{port}" if sep and given.isdigit() else listen  # HOST:0 gets its port
        # What startup made (modules, the flow file, the services) lives as long as the
        # process: moved out of the collector's sight, it is not traversed again by every
        # full collection while flows run.
        gc.freeze()
        _large_blocks_back_to_the_system()
        log.info("mesh.peer_ready", machine=node.machine, listen=listen, port=port)
        # A stable line: parents (tests, scripts) read the bound port and the pid from it.
        print(
            f"mesh peer {node.machine} listening on {bound} (pid {os.getpid()})",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        log.info("mesh.peer_stopping", machine=node.machine, grace=node.config.grace)
        abandoned = node.stop()
        if abandoned:
            log.error(
                "mesh.peer_stopped",
                machine=node.machine,
                abandoned=[str(step) for step in abandoned],
            )
            # Their handlers still run on pool threads, which the interpreter would wait
            # for at exit: leave without them, as promised after grace.
            _exit_now(EXIT_FAILURE, log_file)
        log.info("mesh.peer_stopped", machine=node.machine)
    finally:
        node.close()
        if log_file is not None:
            log_file.close()
    return 0


#: glibc's mallopt parameter: the size from which a block is its own mmap.
_M_MMAP_THRESHOLD = -3


def _large_blocks_back_to_the_system() -> None:
    """Give memory of large messages back when they are freed (glibc, Linux).

    A peer handles contexts of up to ``max_message_bytes``; glibc serves blocks that
    large from its arenas once its adaptive threshold has risen, and keeps them there
    after they are freed, so a burst of 1 MB contexts left a peer 50-90 MiB larger for
    good. A fixed threshold of 256 KiB serves them from mmap, returned at once; small
    blocks, all an ordinary flow has, are unaffected.
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 256 * 1024)


def _exit_now(code: int, log_file: Any) -> None:
    """End the process now, output flushed, without waiting for any thread."""
    for out in (log_file, sys.stdout, sys.stderr):
        if out is not None:
            with contextlib.suppress(OSError, ValueError):
                out.flush()
    os._exit(code)


def replica_listen(config: Config, machine: str, replica: int | None) -> str:
    """Where ``mesh peer MACHINE [--replica K]`` binds; a one-line error if K is wrong."""
    binds = config.machines[machine].binds
    if replica is None:
        if len(binds) > 1:
            raise MeshError(
                f"{machine} has {len(binds)} replicas; pick one with --replica 1..{len(binds)}"
                " (or give --listen)"
            )
        return binds[0] if binds else ""
    if not 1 <= replica <= len(binds):
        raise MeshError(
            f"{machine} has {len(binds)} replica{'s' if len(binds) != 1 else ''};"
            f" --replica {replica} is not in 1..{len(binds)}"
        )
    return binds[replica - 1]


# -- health ----------------------------------------------------------------


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the peer says SERVING: a probe for Kubernetes (exec) or a script."""
    config = load_config(find_config(args.config))
    check_machine(config, args.machine)
    machine = config.machines[args.machine]
    if args.address is None and not machine.binds:
        raise MeshError(f"{args.machine} has no address, so no peer to ask; give --address")
    address = args.address or dialable(machine.binds[0])
    if not wait_serving(address, args.timeout, transport=Transport.of(config, args.machine)):
        raise MeshError(
            f"{args.machine} at {address} is not serving (no SERVING answer in {args.timeout:g} s)"
        )
    print(f"{args.machine} at {address}: SERVING")
    return 0


# -- up --------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    stop = supervisor.stop_event()
    path = find_config(args.config)
    log_dir = Path(args.log_dir) if args.log_dir else None
    return supervisor.run(path, load_config(path), stop, log_dir)


# -- call ------------------------------------------------------------------


def parse_params(params: Sequence[str]) -> dict[str, Any]:
    """httpie-style: ``key=value`` is a string, ``key:=value`` is JSON."""
    context: dict[str, Any] = {}
    for param in params:
        key, sep, raw = param.partition(":=")
        if sep and "=" not in key:
            try:
                context[key] = json.loads(raw)
            except ValueError as exc:
                raise MeshError(f"argument {param!r}: {raw!r} is not JSON ({exc})") from None
        else:
            key, sep, raw = param.partition("=")
            if not sep:
                raise MeshError(f"argument {param!r}: expected key=value or key:=json")
            context[key] = raw
        if not key.strip():
            raise MeshError(f"argument {param!r}: the key is empty")
    return context


def _call(args: argparse.Namespace) -> int:

    context = parse_params(args.params)
    if args.timeout is not None:
        try:
            deadlines.seconds(args.timeout)
        except ValueError:
            raise MeshError(
                f"--timeout must be a positive number of seconds, not {args.timeout:g}"
            ) from None
    if args.diagram and not Path(args.diagram).resolve().parent.is_dir():
        raise MeshError(f"--diagram {args.diagram}: no such folder")  # say so before the run
    log_file = _open_log(args.log_file) if args.log_file else None
    configure_logging(json=log_file is not None, file=log_file or sys.stderr)
    config = load_config(find_config(args.config))
    import_services(config)
    flow = _named_flow(config, args.request)
    if args.machine not in (None, analysis.CALLER):
        check_machine(config, args.machine)
    machine = args.machine or analysis.default_origin(flow, config)
    node = Node(config, machine, outside=machine == analysis.CALLER)
    install(node)
    try:
        result = node.start_with(args.request, context, timeout=args.timeout)
    finally:
        node.close()
        if log_file is not None:
            log_file.close()
    if args.diagram:
        _write_run_diagram(args.diagram, flow, result)
    steps: list[dict[str, Any]] = []
    for s in result.steps:
        step: dict[str, Any] = {
            "index": s.index,
            "line": s.line,
            "machine": s.machine,
            "ms": round(s.ms, 3),
        }
        # Control flow (docs/control-flow.md): only when there is some, so plain output stays.
        if s.request:
            step["request"] = s.request
        if s.element is not None:
            step["element"] = s.element
        if s.skipped:
            step["skipped"] = True
        steps.append(step)
    if args.json:
        out = {"flow_id": result.flow_id, "context": result.masked_context(), "steps": steps}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    total = sum(s.duration for s in result.steps) * 1000
    tty = palette(sys.stdout)
    print(
        f"{tty.bold(result.request)}  flow {result.flow_id}  {tty.green('done')}:"
        f" {len(steps)} steps, {total:.2f} ms in steps"
    )
    print(tty.bold("context:"))
    for key, value in result.masked_context().items():
        print(f"  {key} = {json.dumps(value, ensure_ascii=False)}")
    print(tty.bold("timeline:"))
    rows = [("#", "line", "machine", "ms")]
    rows += [(_shown_index(s), _shown_line(s), str(s["machine"]), f"{s['ms']:.3f}") for s in steps]
    _table(rows, "  ", header=tty)
    return 0


# -- ui --------------------------------------------------------------------


def _ui(args: argparse.Namespace) -> int:
    from mesh.ui.server import serve  # noqa: PLC0415 - checks for the ui extra itself

    return serve(find_config(args.config), args.listen)


# -- init ------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    from mesh.tools.init import write_project  # noqa: PLC0415 - only this command needs it

    for path in write_project(args.directory, force=args.force):
        print(f"wrote {_shown(path)}")
    here = Path(args.directory).resolve() == Path.cwd().resolve()
    go = "" if here else f"cd {_shown(args.directory)} && "
    print(f"next: {go}mesh check && mesh up   (then, in another terminal: see README.md)")
    return 0


# -- certs -----------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    from mesh.tools.certs import config_snippet, make_certs  # noqa: PLC0415 - needs the tls extra

    written = make_certs(args.directory, args.machines.split(","), days=args.days)
    for path in written:
        print(f"wrote {path}")
    print("\nin mesh.toml (paths relative to it):\n")
    print(config_snippet(args.directory.rstrip("/")))
    return 0


# -- scaffold, diagram, logs: tools around the flow file ----------------------


def _add_tool_commands(add: Any) -> None:
    flows = add(
        "flows",
        "list durable flows on every machine, show one, cancel, retry or print its result",
    )
    flows.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "show", "cancel", "retry", "result"],
        help="list (default), or show|cancel|retry|result FLOW_ID",
    )
    flows.add_argument("flow_id", nargs="?", metavar="FLOW_ID", help="the flow, for an action")
    flows.add_argument(
        "--state", choices=["running", "waiting", "failed", "done", "cancelled"], help="list only"
    )
    flows.add_argument("--request", metavar="REQUEST", help="only flows of this request")
    flows.add_argument(
        "--since", metavar="DURATION", help='only flows updated within, e.g. "10m", "2h", "7d"'
    )
    flows.add_argument(
        "--as",
        dest="machine",
        metavar="MACHINE",
        help="whose credentials to ask with (mutual TLS); default: an originator's",
    )
    flows.add_argument("--json", action="store_true", help="print JSON")

    stubs = add("scaffold", "write a services module with a handler for each line of a request")
    stubs.add_argument("request", metavar="REQUEST", help="the request, as the flow file names it")
    stubs.add_argument("--out", metavar="PATH", help="default: services/REQUEST.py")
    stubs.add_argument("--missing", action="store_true", help="only lines that have no handler yet")
    stubs.add_argument("--force", action="store_true", help="overwrite an existing file")

    drawing = add("diagram", "draw requests as sequence diagrams (Mermaid text, SVG or HTML)")
    drawing.add_argument("request", nargs="?", metavar="REQUEST", help="default: every request")
    drawing.add_argument("--format", choices=diagram.FORMATS, help="default: from -o, else mermaid")
    drawing.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    deploy = add("deploy", "write Kubernetes manifests and a Dockerfile from the config")
    deploy.add_argument("target", choices=["k8s"], help="k8s: Kubernetes")
    deploy.add_argument(
        "-o", "--output", metavar="DIR", help="write here (default: k8s/ beside mesh.toml)"
    )
    deploy.add_argument(
        "--image", metavar="IMAGE", help="the peers' image (default: FOLDER:latest)"
    )
    deploy.add_argument(
        "--namespace", default="default", metavar="NS", help="the namespace (default: default)"
    )

    logs = add("logs", "merge peers' JSON logs into one transcript per flow; check each")
    logs.add_argument("files", nargs="+", metavar="FILE", help="JSON log files of the peers")
    logs.add_argument("--flow", metavar="FLOW_ID", help="only this flow (a prefix will do)")


def _diagram(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config))
    if args.request is None:
        flows = list(config.flows.flows.values())
    else:
        flows = [_named_flow(config, args.request)]
    fmt = diagram.format_for(args.output or "", args.format)
    title = args.request or f"{config.path.parent.name}/{config.path.name}"
    text = diagram.render([diagram.from_flow(f) for f in flows], fmt, title=title)
    if args.output:
        _write_text(args.output, text)
        print(f"wrote {args.output}: {fmt}, {len(flows)} requests", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _write_run_diagram(path: str, flow: Flow, result: FlowResult) -> None:
    fmt = diagram.format_for(path)
    picture = diagram.from_run(flow, result.steps, result.flow_id)
    _write_text(path, diagram.render([picture], fmt, title=f"{flow.name} {result.flow_id}"))


def _write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MeshError(f"cannot write {path}: {exc.strerror or exc}") from None


def _logs(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config))
    found = transcript.transcripts(transcript.read_logs(args.files), config.flows, args.flow)
    if not found:
        which = f"flow {args.flow}" if args.flow else "flow lines"
        raise MeshError(f"no {which} in {', '.join(args.files)}")
    bad = 0
    out = palette(sys.stdout)
    for n, t in enumerate(found):
        if n:
            print()
        sys.stdout.write(_coloured_transcript(transcript.format_transcript(t), out))
        bad += bool(t.problems)
    if len(found) > 1:
        print(f"\n{len(found)} flows, {bad} with problems")
    return EXIT_FAILURE if bad else 0


def _coloured_transcript(text: str, out: Palette) -> str:
    """A transcript's heading status green or red, its table heading bold, problems red."""
    if not out.on:
        return text
    lines = text.splitlines()
    head, _, status = lines[0].rpartition("  ")
    lines[0] = f"{out.bold(head)}  {out.green(status) if status == 'ok' else out.red(status)}"
    for i, line in enumerate(lines[1:], 1):
        stripped = line.lstrip()
        if stripped.startswith("problem:"):
            lines[i] = out.red(line)
        elif stripped.startswith("#  "):
            lines[i] = out.bold(line)
        elif stripped.startswith("note:"):
            lines[i] = out.yellow(line)
    return "\n".join(lines) + "\n"


def _shown(path: str | Path) -> str:
    """``path`` relative to the current folder when it is inside it: shorter to read."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _named_flow(config: Config, name: str) -> Flow:
    """The flow called ``name``, or a one-line error listing the flows there are."""
    flow = config.flows.flows.get(name)
    if flow is None:
        known = ", ".join(config.flows) or "none"
        raise MeshError(f"no flow {name!r} in the flow files (known: {known})")
    return flow


def _open_log(path: str) -> Any:
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise MeshError(f"cannot open log file {path}: {exc.strerror}") from None


def _scaffold(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config))
    flow = _named_flow(config, args.request)
    only = None
    if args.missing:
        import_services(config)
        registered = default_registry.registered()
        only = {
            ln.index
            for ln in flow.lines
            if (flow.name, ln.text) not in registered and not ln.sub  # a sub-flow row has none
        }
        if not only:
            print(f"mesh scaffold: every line of {flow.name} has a handler; nothing to write")
            return 0
    out = Path(args.out) if args.out else scaffold.default_out(flow, config.root)
    if args.missing and not args.out and out.exists():
        # That is most likely the module holding the handlers that exist already.
        raise MeshError(f"{_shown(out)} exists; with --missing, name a new module with --out")
    text = scaffold.render_module(
        flow,
        only=only,
        source=Path(flow.lines[0].path).name,
        mesh_is_local=scaffold.mesh_is_local(config.root),
    )
    scaffold.write_module(out, text, force=args.force)
    count = len(only) if only is not None else len([ln for ln in flow.lines if not ln.sub])
    print(f"wrote {_shown(out)}: {count} handlers for {flow.name} ({_shown(flow.lines[0].path)})")
    module = scaffold.module_name(out, config.root)
    if module is None:
        print(f"note: {out} is not importable from {config.root}; move it there to use it")
    elif module not in config.services:
        print(f'next: add "{module}" to services in {config.path}, then run mesh check')
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from mesh.tools import deploy  # noqa: PLC0415 - only this command needs it

    config = load_config(find_config(args.config))
    out = Path(args.output) if args.output else config.root / "k8s"
    made = deploy.k8s(config, namespace=args.namespace, image=args.image)
    for path in deploy.write(made, out):
        print(f"wrote {_shown(path)}")
    print(f"\nnext, from {_shown(config.root)} (Secrets are referenced, not written):")
    for step in made.steps:
        print(f"  {step.replace('OUT', _shown(out))}")
    return 0


def _ago(at: float) -> str:
    seconds = max(time.time() - at, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _flows(args: argparse.Namespace) -> int:
    from mesh.config import duration  # noqa: PLC0415
    from mesh.tools import flows as tool  # noqa: PLC0415 - only this command needs it

    config = load_config(find_config(args.config))
    if args.action != "list" and not args.flow_id:
        raise MeshError(f"mesh flows {args.action} needs a FLOW_ID")
    out = palette(sys.stdout)
    if args.action == "list":
        since = None
        if args.since:
            since = duration(args.since)
            if since is None:
                raise MeshError(
                    f'--since must be a duration like "10m", "2h", "7d", not {args.since!r}'
                )
        found = tool.list_flows(
            config, state=args.state, request=args.request, since=since, as_machine=args.machine
        )
        if args.json:
            print(json.dumps([dataclasses.asdict(f) for f in found], ensure_ascii=False))
            return 0
        rows: list[tuple[str, ...]] = [("flow", "request", "state", "where", "updated", "why")]
        for f in found:
            why = f.waiting or f.error or ""
            rows.append(
                (f.flow_id, f.request, f.state, f"{f.machine} line {f.line}", _ago(f.updated), why)
            )
        if found:
            _table(rows, header=out)
        sizes = ", ".join(f"{k} {_size(v)}" for k, v in sorted(found.journal_bytes.items()))
        print(f"{len(found)} flows; journals: {sizes or 'none'}")
        for problem in found.unreachable:
            print(f"{palette(sys.stderr).yellow('unreachable:')} {problem}", file=sys.stderr)
        return 0
    if args.action == "show":
        detail = tool.show_flow(config, args.flow_id, as_machine=args.machine)
        if args.json:
            print(json.dumps(dataclasses.asdict(detail), ensure_ascii=False))
            return 0
        s = detail.summary
        print(f"{out.bold(s.request)}  flow {s.flow_id}  {s.state}")
        print(f"  started {_ago(s.started)}, last record {_ago(s.updated)}")
        print(f"  now: {s.machine} line {s.line}")
        if s.waiting:
            print(f"  {out.yellow(s.waiting)}")
        if s.error:
            print(f"  {out.red('error:')} {s.error}")
        print(out.bold("timeline:"))
        rows = [("#", "machine", "state", "line", "at", "")]
        rows += [
            (str(p.line), p.machine, p.state, p.error or p.log, _ago(p.at), "")
            for p in detail.steps
        ]
        _table(rows, "  ", header=out)
        print(out.bold("context:"))
        for key, value in detail.context.items():
            print(f"  {key} = {json.dumps(value, ensure_ascii=False)}")
        return 0
    if args.action == "result":
        detail = tool.show_flow(config, args.flow_id, as_machine=args.machine)
        s = detail.summary
        if s.state == "done" and detail.result is not None:
            if args.json:
                print(json.dumps({"flow_id": s.flow_id, "context": detail.result}))
            else:
                print(f"{out.bold(s.request)}  flow {s.flow_id}  {out.green('done')}")
                for key, value in detail.result.items():
                    print(f"  {key} = {json.dumps(value, ensure_ascii=False)}")
            return 0
        why = s.error or s.waiting or f"at {s.machine} line {s.line}"
        raise MeshError(f"flow {s.flow_id} is {s.state}: {why}")
    steer = tool.cancel_flow if args.action == "cancel" else tool.retry_flow
    summary = steer(config, args.flow_id, as_machine=args.machine)
    print(f"flow {summary.flow_id}: {summary.state} ({summary.machine} line {summary.line})")
    return 0


_TOOL_COMMANDS = {
    "scaffold": _scaffold,
    "diagram": _diagram,
    "logs": _logs,
    "deploy": _deploy,
    "flows": _flows,
}
