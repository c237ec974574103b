"""Run the code blocks of any Markdown file as written, against real peers where they need them.

A page's examples are promises like any other: a reader copies a block and runs it. This
module finds every fenced block of a Markdown file (``` or ~~~, indented or not) and runs
those whose info string names Python (``python``, ``py``) or a shell (``sh``, ``shell``,
``bash``), each as a reader would, in a fresh copy of the project. ``tests/test_readme.py``
uses it for the README; any other page can be checked the same way::

    for block in docblocks.blocks(page):
        if block.runs:
            with docblocks.Sandbox(block, tmp_path) as box:
                done = box.run()
            assert done.returncode == 0, box.explain(done)

Markers
-------
A marker is an HTML comment (invisible when the page is rendered) on the last non-blank line
before a fence; it applies to that block alone.

``<!-- run -->``
    Run the block. This is the default for Python and shell blocks, so it is only needed to
    be explicit.

``<!-- run: peers=server,emailservice -->``
    Run it while a real ``mesh peer`` serves each machine named, started in the order
    given, each on a port of its own (so list a machine before the machines that call it).
    Options, separated by spaces:

    ``peers=A,B``      the machines whose peers must serve while the block runs;
    ``config=PATH``    the ``mesh.toml`` they serve (default ``mesh.toml``), relative to the
                       project's top;
    ``timeout=S``      seconds the block may take (default 60).

``<!-- no-run: REASON -->``
    Never run the block; ``REASON`` (required) says why, for instance ``output sample``,
    ``installs from PyPI``, ``a synopsis, not commands``. It may mark a block of any
    language (it documents intent); ``run`` may mark only Python and shell blocks.

A marker that is malformed, has no block after it, names an unknown option, or says
``no-run`` without a reason is a :class:`MarkerError` naming the file and line.

How a block runs
----------------
The project is the nearest folder above the Markdown file that has a ``pyproject.toml`` or
a ``.git`` (else the file's own folder). It is copied for each block, leaving out dot
folders, virtualenvs, caches and build output, so a block that writes files (``mesh certs
certs …``) changes only its copy. The block runs from the copy's top, as a reader in a
checkout would: Python with this interpreter (``python README.md-L193.py``, so a traceback
names the page and the line of the fence), a shell block with ``bash -e -o pipefail``
(stopping at the first command that fails), with this interpreter's ``bin`` folder first on
``PATH`` (``mesh``, ``python``), ``$MESH_DATA_DIR`` inside the copy, and no
``$MESH_CONFIG`` or ``$MESH_TOKEN`` from the caller.

In the copy, every machine of the config with an address gets a port of its own: the
config's fixed ports (50052, …) may be held by anything else on this host. A machine whose
peer the marker starts gets the port that peer bound (``mesh peer --listen 127.0.0.1:0``,
read back from the line it prints); any other holds a placeholder port that refuses
connections. Peers are stopped by process id when the block is done, and a peer that does
not exit cleanly fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from support.cli import mesh_env
from support.peers import Peer, bound_address

__all__ = ["Block", "MarkerError", "Sandbox", "blocks", "project_root"]

PYTHON = frozenset({"python", "py", "python3"})
SHELL = frozenset({"sh", "shell", "bash"})
DEFAULT_TIMEOUT = 60.0

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<verb>run|no-run)\b(?P<rest>.*?)-->\s*$")
_ANY_MARKER = re.compile(r"^\s*<!--\s*(run|no-run)\b")
_SKIPPED = shutil.ignore_patterns(
    ".*", "__pycache__", "*.egg-info", "build", "dist", "node_modules", "test-artifacts", "venv"
)


class MarkerError(ValueError):
    """A marker this module cannot follow; the message starts ``FILE:LINE:``."""


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file, and what its marker says about running it."""

    path: Path
    line: int  # the opening fence's line, from 1
    info: str  # the info string's first word, lower case ("" for none)
    code: str
    runs: bool  # a Python or shell block that is to run
    reason: str = ""  # why it is not run (no-run markers)
    peers: tuple[str, ...] = ()
    config: str = "mesh.toml"
    timeout: float = DEFAULT_TIMEOUT

    @property
    def kind(self) -> str | None:
        """``"python"``, ``"shell"``, or None for a block that is not code to run."""
        if self.info in PYTHON:
            return "python"
        if self.info in SHELL:
            return "shell"
        return None

    @property
    def name(self) -> str:
        """``README.md:193``: where the block starts, as a test id."""
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of the Markdown file ``path``, with its marker applied."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    pending: tuple[int, str] | None = None  # a marker not yet followed by its block
    n = 0
    while n < len(lines):
        text = lines[n]
        opening = _FENCE.match(text)
        if opening is None:
            if _ANY_MARKER.match(text):
                if pending is not None:
                    _fail(path, pending[0], "a marker must be followed by a fenced block")
                pending = (n + 1, text)
            elif text.strip() and pending is not None:
                _fail(path, pending[0], "a marker must be followed by a fenced block")
            n += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        info = (
            opening["info"].strip().split(maxsplit=1)[0].lower() if opening["info"].strip() else ""
        )
        body: list[str] = []
        n += 1
        while n < len(lines):
            closing = lines[n].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(_dedent(lines[n], indent))
            n += 1
        n += 1  # past the closing fence (or the end of an unclosed block)
        block = Block(path, n - len(body) - 1, info, "\n".join(body) + "\n", runs=False)
        found.append(_apply(block, pending))
        pending = None
    if pending is not None:
        _fail(path, pending[0], "a marker must be followed by a fenced block")
    return found


def _dedent(line: str, indent: int) -> str:
    stripped = len(line) - len(line.lstrip(" "))
    return line[min(stripped, indent) :]


def _apply(block: Block, marker: tuple[int, str] | None) -> Block:
    """``block`` as its marker (or the default for its language) says it runs."""
    code = block.kind is not None
    if marker is None:
        return replace(block, runs=code)
    where, text = marker
    parsed = _MARKER.match(text)
    if parsed is None:
        _fail(block.path, where, f"cannot read the marker {text.strip()!r}")
    verb, rest = parsed["verb"], parsed["rest"].strip()
    if verb == "no-run":
        reason = rest.removeprefix(":").strip()
        if not rest.startswith(":") or not reason:
            _fail(block.path, where, "no-run needs a reason: <!-- no-run: REASON -->")
        return replace(block, runs=False, reason=reason)
    if not code:
        _fail(
            block.path,
            where,
            f"only Python and shell blocks run, not {block.info or 'a block without a language'}",
        )
    options: dict[str, str] = {}
    if rest:
        if not rest.startswith(":"):
            _fail(block.path, where, f"expected <!-- run: OPTIONS -->, not {text.strip()!r}")
        for word in rest[1:].split():
            key, sep, value = word.partition("=")
            if not sep or key not in ("peers", "config", "timeout") or not value:
                _fail(
                    block.path,
                    where,
                    f"unknown run option {word!r} (known: peers=A,B config=PATH timeout=S)",
                )
            options[key] = value
    try:
        timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        _fail(block.path, where, f"timeout={options['timeout']} is not a number of seconds")
    peers = tuple(p for p in options.get("peers", "").split(",") if p)
    return replace(
        block,
        runs=True,
        peers=peers,
        config=options.get("config", "mesh.toml"),
        timeout=timeout,
    )


def _fail(path: Path, line: int, message: str) -> None:
    raise MarkerError(f"{path}:{line}: {message}")


def project_root(path: Path) -> Path:
    """The nearest folder above ``path`` with a ``pyproject.toml`` or a ``.git``."""
    for folder in path.resolve().parents:
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return path.resolve().parent


@dataclass
class Sandbox:
    """A copy of the project where one block runs, with the peers its marker asks for.

    A context manager: entering copies the project and starts the peers; leaving stops
    them by process id (and fails the test if one does not exit cleanly).
    """

    block: Block
    tmp_path: Path
    top: Path = field(init=False)
    peers: list[Peer] = field(default_factory=list)
    #: each addressed machine's address in the copy: its peer's, or a placeholder's
    addresses: dict[str, str] = field(default_factory=dict)
    _held: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.top = self.tmp_path / "project"

    def __enter__(self) -> Sandbox:
        shutil.copytree(project_root(self.block.path), self.top, ignore=_SKIPPED)
        (self.top / ".mesh-data").mkdir(exist_ok=True)
        config = self.top / self.block.config
        if config.exists():
            self._own_ports(config)
        elif self.block.peers:
            raise MarkerError(
                f"{self.block.path}:{self.block.line}: peers={','.join(self.block.peers)}"
                f" but there is no {self.block.config} in {project_root(self.block.path)}"
            )
        try:
            for machine in self.block.peers:
                self._start(config, machine)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def env(self) -> dict[str, str]:
        env = mesh_env()
        env.pop("MESH_TOKEN", None)
        env["MESH_DATA_DIR"] = str(self.top / ".mesh-data")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def run(self) -> subprocess.CompletedProcess[str]:
        """Run the block from the copy's top; its output is captured."""
        block = self.block
        script = self.tmp_path / f"{block.path.name}-L{block.line}"
        if block.kind == "python":
            script = script.with_name(script.name + ".py")
            command = [sys.executable, str(script)]
        elif block.kind == "shell":
            script = script.with_name(script.name + ".sh")
            command = ["bash", "-e", "-o", "pipefail", str(script)]
        else:
            raise MarkerError(f"{block.name}: a {block.info or 'plain'} block does not run")
        script.write_text(block.code, encoding="utf-8")
        out_path, err_path = script.with_suffix(".out"), script.with_suffix(".err")
        # Its own session, and output to files (not pipes a leftover child would hold open),
        # so that whatever the block leaves running (a `mesh up &` it never stopped, because
        # a command after it failed) is stopped here, by process group, not left holding
        # ports for the next test.
        with out_path.open("w") as out, err_path.open("w") as err:
            proc = subprocess.Popen(
                command,
                cwd=self.top,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
            )
            try:
                proc.wait(block.timeout)
            except subprocess.TimeoutExpired:
                _stop_group(proc.pid)
                raise
            finally:
                _stop_group(proc.pid)
        return subprocess.CompletedProcess(
            command,
            proc.returncode,
            out_path.read_text(encoding="utf-8", errors="replace"),
            err_path.read_text(encoding="utf-8", errors="replace"),
        )

    def explain(self, done: subprocess.CompletedProcess[str]) -> str:
        """What a failed block printed, and what its peers logged, for the failure message."""
        out = [
            f"{self.block.name} ({self.block.kind}) exited with {done.returncode}:",
            self.block.code,
            "--- stdout ---",
            done.stdout,
            "--- stderr ---",
            done.stderr,
        ]
        for peer in self.peers:
            out += [f"--- peer {peer.machine} ---", peer.log_text()]
        return "\n".join(out)

    # -- the copy's config and its peers -------------------------------------------------

    def _own_ports(self, config: Path) -> None:
        """Give each addressed machine of the copy's config a placeholder port of its own."""
        machines = tomllib.loads(config.read_text(encoding="utf-8")).get("machines", {})
        for name, value in machines.items():
            address = value.get("address", "") if isinstance(value, dict) else value
            if not isinstance(address, str) or not address:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))  # bound, never listening: calls to it are refused
            self._held.append(sock)
            self.addresses[name] = f"127.0.0.1:{sock.getsockname()[1]}"
            self._settle(config, address, self.addresses[name])

    @staticmethod
    def _settle(config: Path, old: str, new: str) -> None:
        text = config.read_text(encoding="utf-8")
        quoted = re.compile(r"""(["'])""" + re.escape(old) + r"\1")
        config.write_text(quoted.sub(lambda m: m[1] + new + m[1], text), encoding="utf-8")

    def _start(self, config: Path, machine: str) -> None:
        placeholder = self.addresses.get(machine)
        if placeholder is None:
            raise MarkerError(
                f"{self.block.name}: peers={machine}, but {self.block.config} gives {machine}"
                " no address"
            )
        log = self.tmp_path / f"peer-{machine}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mesh", "peer", machine, "-c", str(config)),
                    *("--listen", "127.0.0.1:0", "--json"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                cwd=self.top,
            )
        peer = Peer(machine, config, placeholder, proc, log)
        self.peers.append(peer)
        peer.address = bound_address(peer)
        self._settle(config, placeholder, peer.address)
        self.addresses[machine] = peer.address
        peer.wait_ready()

    def _stop(self) -> None:
        try:
            for peer in reversed(self.peers):
                peer.stop()
        finally:
            for sock in self._held:
                sock.close()
            self._held.clear()


def _stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM every process left in a block's session, then SIGKILL what outlives grace."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _running_in_group(pgid):
                return
            time.sleep(0.05)


def _running_in_group(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie waiting for a parent that
    does not reap it has stopped, whatever ``killpg(pgid, 0)`` says)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
