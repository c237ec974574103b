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
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.flowfile import Flow, FlowSet

__all__ = ["Change", "compare"]


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
