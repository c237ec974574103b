"""What TLS, mutual TLS and the token cost a flow, against plaintext, in one run.

Starts one ``server`` peer per mode (separate processes on 127.0.0.1, certificates made
with ``mesh certs`` in a temporary folder) and runs the same two-hop flow from an in-process
``client`` (line 0 here, lines 1-2 on the server, line 3 handed back), interleaving the modes
round by round. Prints the median µs per flow of each mode and its ratio to plaintext. Every
mode includes the guard (access list and input checks): it is always on. Channels are kept
between flows, as a node keeps them, so the TLS handshake is paid once, not per flow.

    .venv/bin/python scripts/bench_security.py [--flows 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mesh
from mesh.config import load_config
from mesh.node import Node
from mesh.peer import wait_serving
from mesh.tools.certs import make_certs
from mesh.transport import Transport

FLOW = """\
Request\tLog\tMachine
hop\tStarting for :user\tclient
hop\tWorking for :user\tserver
hop\tFinishing for :user\tserver
hop\tBack with :user\tclient
"""

TOKEN = "bench-token-" + "0123456789abcdef"

TLS = '[tls]\nca = "certs/ca.pem"\ncert = "certs/{machine}.pem"\nkey = "certs/{machine}.key"\n'
MODES = {
    "plaintext": "",
    "token": 'token_file = "token"\n',
    "tls": TLS,
    "mtls": TLS + "require_client_cert = true\n",
    "mtls+token": 'token_file = "token"\n' + TLS + "require_client_cert = true\n",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(root: Path, mode: str, body: str) -> Path:
    path = root / f"{mode.replace('+', '-')}.toml"
    path.write_text(
        f'flow = "flow.tsv"\n{body}\n[machines]\nclient = ""\nserver = "127.0.0.1:{free_port()}"\n'
    )
    return path


def time_flows(node: Node, flows: int) -> float:
    start = time.perf_counter_ns()
    for i in range(flows):
        node.start("hop", user=f"u{i}")
    return (time.perf_counter_ns() - start) / flows / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    os.environ.pop("MESH_TOKEN", None)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the run
    mesh.configure_logging(level="warning", file=devnull)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "flow.tsv").write_text(FLOW)
        (root / "token").write_text(TOKEN)
        make_certs(root / "certs", ["server", "client"])
        nodes: dict[str, Node] = {}
        try:
            for mode, body in MODES.items():
                path = write_config(root, mode, body)
                config = load_config(path)
                proc = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "mesh", "peer", "server", "-c", str(path)),
                        *("--log-level", "warning"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                procs.append(proc)
                address = config.machines["server"].address
                probe = Transport.of(config, "server")
                if not wait_serving(address, 60, lambda p=proc: p.poll() is not None, probe):
                    print(f"{mode}: the server peer did not start", file=sys.stderr)
                    return 1
                nodes[mode] = Node(config, "client")
            for node in nodes.values():
                time_flows(node, 50)  # warm up: channels, handshakes, caches
            samples: dict[str, list[float]] = {mode: [] for mode in nodes}
            for _ in range(args.rounds):
                for mode, node in nodes.items():
                    samples[mode].append(time_flows(node, args.flows))
        finally:
            for node in nodes.values():
                node.close()
            for proc in procs:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
            for proc in procs:
                proc.wait(30)
    base = statistics.median(samples["plaintext"])
    print(f"median of {args.rounds} rounds of {args.flows} flows (1 call + 1 hand-back each)")
    for mode, values in samples.items():
        median = statistics.median(values)
        print(f"{mode:<12}: {median:9.0f} µs/flow   ratio {median / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
