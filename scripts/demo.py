"""Run the demo mesh end to end: start its peers, run a few flows, stop the peers.

``make demo`` runs this from the repo root. It starts ``mesh up`` for ``mesh.toml`` (server and
emailservice), then, as the client, logs in as ada, fetches the feed, loads the index with the
new session, and tries one wrong password, which must fail with a one-line error. The peers'
own log lines are shown after each call, marked ``|``. Data goes to a fresh temporary folder
unless ``$MESH_DATA_DIR`` is set. ``--config PATH`` runs the same against another copy of the
example mesh (the tests do). Exits 0 only when every call did what it should and ``mesh up``
ran throughout: when it fails (a port held by a peer left from an earlier run), when it or
one of its peers exits while the calls run, or when it does not stop cleanly, the demo fails,
since its calls may then have been answered by someone else's peers.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mesh.toml"
READY = "peers healthy"
START_SECONDS = 60.0
CALL_SECONDS = 60.0
STOP_SECONDS = 30.0  # mesh up gives its peers the config's grace (10 s) + 5 s
PASSWORD = "lovelace"
WRONG_PASSWORD = "wrong"

_EOF = None


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


class Up:
    """``mesh up`` as a child process, its output (and its peers') read on a thread."""

    def __init__(self, env: dict[str, str], config: Path) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "up", "-c", str(config)],
            cwd=config.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own process group: the terminal's Ctrl-C is ours
        )
        assert self.proc.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self.reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(_EOF)

    def show(self, wait: float = 0.0) -> bool:
        """Print what it has written so far; False once its output has ended."""
        deadline = time.monotonic() + wait
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return True
            if line is _EOF:
                return False
            self.seen.append(line)
            print(f"  | {line}", flush=True)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while not any(READY in line for line in self.seen):
            if not self.show(wait=0.2):  # its output ended: it is exiting
                try:
                    code = self.proc.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    raise DemoError("mesh up closed its output but did not exit") from None
                said = [line for line in self.seen if line.startswith("mesh up: ")]
                raise DemoError(
                    f"mesh up exited with code {code} before its peers were healthy"
                    + (f": {said[-1].removeprefix('mesh up: ')}" if said else "")
                )
            if time.monotonic() > deadline:
                raise DemoError(f"mesh up did not report {READY!r} in {START_SECONDS:.0f} s")

    def stop(self) -> int:
        """SIGTERM, wait, and kill after a timeout; returns its exit code."""
        if self.proc.poll() is None:
            print(f"\n$ kill -TERM {self.proc.pid}  # mesh up", flush=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                print(f"demo: mesh up did not stop in {STOP_SECONDS:.0f} s; killing it")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(5)
        self.show()
        return self.proc.returncode

    def troubles(self) -> list[str]:
        """What ``mesh up`` said went wrong while it ran: a peer of its own that exited."""
        return [
            line.removeprefix("mesh up: ")
            for line in self.seen
            if re.match(r"mesh up: (peer \S+ .*exited|every peer has exited)", line)
        ]


def call_as_client(
    env: dict[str, str], config: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``mesh call ARGS``, its output captured and then printed as it was."""
    command = [sys.executable, "-m", "mesh", "call", *args, "-c", str(config)]
    print(f"\n$ mesh call {' '.join(args)}", flush=True)
    try:
        done = subprocess.run(
            command,
            cwd=config.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CALL_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"mesh call {args[0]} did not finish in {CALL_SECONDS:.0f} s") from exc
    sys.stderr.write(done.stderr)
    sys.stderr.flush()
    sys.stdout.write(done.stdout)
    sys.stdout.flush()
    return done


def run(env: dict[str, str], up: Up, config: Path) -> list[str]:
    """The calls; returns what went wrong (empty when all is well)."""
    problems: list[str] = []
    call = functools.partial(call_as_client, env, config)

    def expect_ok(done: subprocess.CompletedProcess[str], what: str) -> bool:
        up.show(wait=0.3)  # the peers' lines for this call
        if done.returncode != 0:
            problems.append(f"{what} exited with code {done.returncode}")
            return False
        return True

    login = call("login", "username=ada", f"password={PASSWORD}")
    session = ""
    if expect_ok(login, "login"):
        match = re.search(r'^\s*session = "([^"]+)"$', login.stdout, re.MULTILINE)
        if match is None:
            problems.append("login printed no session")
        else:
            session = match.group(1)

    expect_ok(call("feed"), "feed")

    index_args = ["index", "username=ada"] + ([f"session={session}"] if session else [])
    index = call(*index_args)
    if expect_ok(index, "index") and "signed_in = true" not in index.stdout:
        problems.append("index did not find ada's session")

    wrong = call("login", "username=ada", f"password={WRONG_PASSWORD}")
    up.show(wait=0.3)
    error = wrong.stderr.strip().splitlines()[-1:] or [""]
    if wrong.returncode == 0:
        problems.append("login with a wrong password succeeded")
    elif "invalid credentials" not in error[0]:
        problems.append(f"login with a wrong password failed unexpectedly: {error[0]}")
    else:
        print(f"\nexpected: it exited with code {wrong.returncode}, error: {error[0]}")

    # The passwords must never show: not in the calls' output, not in the peers' logs.
    output = [login.stdout, login.stderr, wrong.stdout, wrong.stderr, *up.seen]
    for password in (PASSWORD, WRONG_PASSWORD):
        if any(password in text for text in output):
            problems.append(f"the password {password!r} appears in the output")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the example mesh end to end.")
    parser.add_argument("--config", type=Path, default=CONFIG, help="default: the repo's mesh.toml")
    config = parser.parse_args(argv).config.resolve()
    env = dict(os.environ)
    made_dir = not env.get("MESH_DATA_DIR")
    data = tempfile.mkdtemp(prefix="mesh-demo-") if made_dir else env["MESH_DATA_DIR"]
    env["MESH_DATA_DIR"] = data
    env.pop("MESH_CONFIG", None)  # -c is given everywhere
    # Unbuffered, print() writes a log line and its newline separately, so the two peers'
    # lines in mesh up's one stdout could interleave mid-line. Buffered, each is one write.
    env.pop("PYTHONUNBUFFERED", None)
    print(f"demo: config {config}, data in {data}")
    print(f"$ mesh up -c {config}", flush=True)
    up: Up | None = None
    problems: list[str] = []
    try:
        up = Up(env, config)
        up.wait_healthy()
        problems = run(env, up, config)
        if up.proc.poll() is not None:
            problems.append(f"mesh up exited with code {up.proc.returncode} while the calls ran")
    except DemoError as exc:
        problems = [str(exc)]
    except KeyboardInterrupt:
        problems = ["interrupted"]
    finally:
        if up is not None:
            running = up.proc.poll() is None
            code = up.stop()
            problems += [t for t in up.troubles() if not any(t in p for p in problems)]
            if running and code != 0:
                problems.append(f"mesh up exited with code {code} when stopped")
        if made_dir:
            shutil.rmtree(data, ignore_errors=True)
    if problems:
        for problem in problems:
            print(f"demo: FAILED: {problem}", file=sys.stderr)
        return 1
    print("\ndemo: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
