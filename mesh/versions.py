"""Whether an edited flow file is safe for the flows in flight on the old one.

A flow runs on the version of its request it started with (its ``digest``). During a
rolling deploy some peers hold the old file and some the new, so a flow in flight may
meet either. What decides whether that is safe is how the rows changed, and that is a
pure comparison of two flow sets, here, which ``mesh check --against OLD_FILE`` prints:

* **safe**: an unchanged request, a new request, lines added at the end of a request
  (a flow in flight on the old version ends where it always did), a line moved to
  another machine (the old version's flows still go where the old file said, to the
  peers that keep it);
* **unsafe**: a request removed, lines removed, reordered or reworded (a flow in flight
  past such a row cannot be continued on the new version: its line numbers mean other
  steps there), named by row so the person deploying sees which.

:class:`VersionStore` is the other half: the flow files a peer has served, kept beside
its journal, so that a peer restarted with a new file goes on serving the flows that
started on an old one (``mesh check --against`` says when that is safe).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import MeshError
from mesh.flowfile import Flow, FlowSet, parse_flows

__all__ = ["VERSION_MISMATCH", "Change", "VersionStore", "compare"]

#: What a peer's refusal of a version it does not hold says (mesh/guard.py): a durable
#: caller waits and sends the call again, as a rolling deploy has yet to reach that peer
#: (mesh/links.py); any other caller fails.
VERSION_MISMATCH = "runs a different version of flow"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between the old and the new version of a request."""

    request: str
    safe: bool
    what: str  # one line, naming rows (PATH:ROW) where there are any

    def __str__(self) -> str:
        return f"{'safe' if self.safe else 'unsafe'}: {self.request}: {self.what}"


def compare(old: FlowSet, new: FlowSet) -> list[Change]:
    """Every change from ``old`` to ``new``, request by request (old order, then new)."""
    changes: list[Change] = []
    for name, before in old.flows.items():
        after = new.flows.get(name)
        if after is None:
            first = before.lines[0]
            changes.append(Change(name, False, f"request removed (was {first.path}:{first.row})"))
        elif after.digest != before.digest:
            changes.extend(_request(before, after))
    for name, after in new.flows.items():
        if name not in old.flows:
            first = after.lines[0]
            changes.append(Change(name, True, f"request added at {first.path}:{first.row}"))
    return changes


def _request(before: Flow, after: Flow) -> list[Change]:
    name = before.name
    old_texts = [line.text for line in before.lines]
    new_texts = [line.text for line in after.lines]
    shared = min(len(old_texts), len(new_texts))
    for i in range(shared):
        if old_texts[i] != new_texts[i]:
            row = after.lines[i]
            if old_texts[i] in new_texts:
                what = f"line {i} {old_texts[i]!r} moved to line {new_texts.index(old_texts[i])}"
            elif new_texts[i] in old_texts:
                what = f"line {i} {old_texts[i]!r} removed or reordered"
            else:
                what = f"line {i} changed from {old_texts[i]!r} to {new_texts[i]!r}"
            return [Change(name, False, f"{row.path}:{row.row}: {what}")]
    if len(new_texts) < len(old_texts):
        gone = before.lines[len(new_texts)]
        return [
            Change(
                name,
                False,
                f"{len(old_texts) - len(new_texts)} line(s) removed from the end, from line"
                f" {gone.index} {gone.text!r} (was {gone.path}:{gone.row})",
            )
        ]
    changes = [
        Change(
            name,
            True,
            f"{after.lines[i].path}:{after.lines[i].row}: line {i} {new_texts[i]!r}"
            f" moved from {before.lines[i].machine} to {after.lines[i].machine}",
        )
        for i in range(shared)
        if before.lines[i].machine != after.lines[i].machine
    ]
    if len(new_texts) > len(old_texts):
        first = after.lines[len(old_texts)]
        changes.append(
            Change(
                name,
                True,
                f"{first.path}:{first.row}: {len(new_texts) - len(old_texts)} line(s) added"
                " at the end",
            )
        )
    if not changes:  # same texts and machines, yet another digest: another column changed
        first = after.lines[0]
        changes.append(
            Change(
                name,
                False,
                f"{first.path}:{first.row}: rows changed in a column other than Log and Machine",
            )
        )
    return changes


# -- the versions a peer keeps --------------------------------------------------------

#: How many flow files a peer keeps beside its journal: the newest, by when last served.
KEEP_FILES = 32


class VersionStore:
    """The flow files this machine has served, kept beside its journal, so that a peer
    started with an edited file still serves flows that started on an earlier one.

    Each flow file is kept as it was written (``<sha256 of its bytes>-<name>``) and parsed
    with the same parser as the config's, so a kept file means what it meant; a request
    is found by its name and digest. Files that no longer parse (a mesh that reads them
    otherwise) are skipped, never fatal: the peer then refuses those versions as before.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_digest: dict[tuple[str, str], Flow] = {}

    def remember(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        """Keep the config's flow files (``paths``) and load every kept version."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            data = Path(path).read_bytes()
            name = f"{hashlib.sha256(data).hexdigest()[:16]}-{Path(path).name}"
            kept = self.folder / name
            if not kept.exists():
                partial = kept.with_suffix(kept.suffix + ".part")
                partial.write_bytes(data)
                partial.replace(kept)
            os.utime(kept)  # newest: the pruning below keeps what was served last
        files = sorted(
            (f for f in self.folder.iterdir() if not f.name.endswith(".part")),
            key=lambda f: f.stat().st_mtime,
            reverse=True,
        )
        for old in files[KEEP_FILES:]:
            old.unlink(missing_ok=True)
        self._by_digest = {}
        for kept in reversed(files[:KEEP_FILES]):
            try:
                flows = parse_flows(kept.read_text(encoding="utf-8"), str(kept))
            except (MeshError, OSError, UnicodeDecodeError):
                continue
            for flow in flows.flows.values():
                self._by_digest[(flow.name, flow.digest)] = flow

    def flow(self, request: str, digest: str) -> Flow | None:
        """The version ``digest`` of ``request``, if this machine has served it."""
        return self._by_digest.get((request, digest))

    def __len__(self) -> int:
        return len(self._by_digest)
