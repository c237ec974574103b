"""Network namespaces joined by a veth pair, to cut a real link between two peers."""

from __future__ import annotations

import subprocess


class NetNs:
    """A network namespace joined to this one by a veth pair, each end with its own address."""

    def __init__(self, tag: str) -> None:
        self.name = f"mesh-test-{tag}"
        self.host_if = f"mh{tag}h"
        self.ns_if = f"mh{tag}n"
        subnet = _free_subnet(int(tag) % 250)
        self.host_ip = f"10.231.{subnet}.1"
        self.ns_ip = f"10.231.{subnet}.2"

    @property
    def exec(self) -> list[str]:
        """The prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def link(self, up: bool) -> None:
        """Cut (False) or restore (True) the link, at this namespace's end."""
        _ip("link", "set", self.host_if, "up" if up else "down")

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        inside = ["-n", self.name]
        _ip(*inside, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip(*inside, "link", "set", self.ns_if, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def delete(self) -> None:
        # Deleting the namespace deletes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)


def _free_subnet(start: int) -> int:
    """A 10.231.X.0/30 no interface here uses (another test run may have one)."""
    for i in range(250):
        subnet = (start + i) % 250
        shown = subprocess.run(
            ["ip", "-o", "addr", "show", "to", f"10.231.{subnet}.0/30"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0 and not shown.stdout.strip():
            return subnet
    raise OSError("no free 10.231.X.0/30 subnet")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")
