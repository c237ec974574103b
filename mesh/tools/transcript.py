"""Read a run back: merge peers' JSON logs into one transcript per flow, and check it.

Every flow line a peer logs carries ``flow_id``, ``request``, ``line_index``,
``machine`` and a timestamp (``mesh peer --json`` / ``--log-file``, or
``mesh.configure_logging(json=True)``). Put the files of every machine side by
side and each flow reads as one sequence again: the linearized view the flow
file promised, against what really ran. Whatever differs is a problem: a line
that is missing, that ran on another machine than the flow file says, that ran
before a line it should follow, or that ran twice.

The transcript is in flow order, which is the order things happened: a line runs
only after the line before it said ``"next"``, by a call or a reply down the call
chain. Wall clocks are compared only where one clock stamped both lines (one
machine's lines in one file); two machines' clocks may differ, so a line stamped
before the line it follows on another machine is clock skew, reported as a note
with the least skew that explains it, never as a problem.

A flow line is told apart from a handler's own events (which carry the same
fields) by its text: it is its line's template, rendered. A step's duration is
the time from its line to the next line of the flow, so it includes the hop and
reads the clocks of two machines when the flow crossed one.

Pure but for reading the files in :func:`read_logs`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from mesh.errors import MeshError
from mesh.flowfile import Flow, FlowSet

__all__ = ["Entry", "Logs", "Transcript", "format_transcript", "read_logs", "transcripts"]

_FIELDS = ("flow_id", "request", "line_index", "machine")
_PLACEHOLDER = re.compile(r"[:#][A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Entry:
    """One logged event of a flow, and where it was read."""

    flow_id: str
    request: str
    index: int
    machine: str
    text: str
    time: float | None  # epoch seconds
    where: str  # FILE:LINE
    failed: str = ""  # a mesh.step_failed event: the error
    path: str = ""  # the file it was read from
    row: int = 0  # its line number in that file
    skipped: str = ""  # a mesh.line_skipped event: why (its condition, or its empty list)
    elements: int | None = None  # a mesh.fan_out event: how many runs its Each row has

    @property
    def clock(self) -> tuple[str, str]:
        """Whose clock stamped it: one machine writing one file."""
        return self.path, self.machine


@dataclass(slots=True)
class Logs:
    """Everything read from the files: flow events, and the machines that logged at all."""

    entries: list[Entry] = field(default_factory=list)
    machines: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Transcript:
    """One flow as it ran, in flow order, with what differs from its flow file."""

    flow_id: str
    request: str
    steps: list[tuple[Entry, float | None]]  # each line and its duration (seconds)
    failures: list[Entry]
    problems: list[str]
    lines: int  # how many lines the flow file gives the request (0: unknown request)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong: clock skew


def _time(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _json_object(line: str) -> dict[str, object] | None:
    """The JSON object on a log line; ``mesh up`` prefixes lines with ``machine | ``."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(line[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_logs(paths: Sequence[str]) -> Logs:
    """Read JSON log lines from each file; lines that are not JSON objects are skipped."""
    logs = Logs()
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise MeshError(f"{path}: no such log file") from None
        except OSError as exc:
            raise MeshError(f"{path}: cannot read log file: {exc.strerror or exc}") from None
        for number, line in enumerate(lines, 1):
            event = _json_object(line)
            if event is None:
                continue
            machine = event.get("machine")
            if isinstance(machine, str):
                logs.machines.add(machine)
            if not all(k in event for k in _FIELDS):
                continue
            index = event["line_index"]
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            text = str(event.get("event", ""))
            failed = skipped = ""
            elements = None
            if text == "mesh.fan_out":
                count = event.get("elements")
                if not isinstance(count, int) or isinstance(count, bool):
                    continue
                elements = count
            elif text == "mesh.step_failed":
                failed = str(event.get("error", "failed"))
            elif text == "mesh.line_skipped":
                condition = event.get("condition")
                skipped = f"when {condition}" if condition else str(event.get("reason", "skipped"))
                text = f"{event.get('line', '')} (skipped: {skipped})"
            logs.entries.append(
                Entry(
                    str(event["flow_id"]),
                    str(event["request"]),
                    index,
                    str(machine),
                    text,
                    _time(event.get("timestamp")),
                    f"{path}:{number}",
                    failed,
                    path,
                    number,
                    skipped,
                    elements,
                )
            )
    return logs


def _pattern(template: str) -> re.Pattern[str]:
    """A line's template as a regex its renderings match: each placeholder any text."""
    parts = _PLACEHOLDER.split(template)
    return re.compile("(?s)" + ".*".join(re.escape(p) for p in parts))


class _Matcher:
    """Which line of a request a logged text is, by the templates of the flow file."""

    def __init__(self, flow: Flow) -> None:
        self.patterns = [_pattern(line.text) for line in flow.lines]

    def line_of(self, text: str, claimed: int) -> int | None:
        if 0 <= claimed < len(self.patterns) and self.patterns[claimed].fullmatch(text):
            return claimed
        for i, pattern in enumerate(self.patterns):
            if pattern.fullmatch(text):
                return i
        return None


def transcripts(logs: Logs, flows: FlowSet, flow_id: str | None = None) -> list[Transcript]:
    """One transcript per flow found in ``logs`` (those whose id starts with ``flow_id``)."""
    groups: dict[str, list[Entry]] = {}
    for entry in logs.entries:
        if flow_id is None or entry.flow_id.startswith(flow_id):
            groups.setdefault(entry.flow_id, []).append(entry)
    matchers: dict[str, _Matcher] = {}
    out = []
    for fid, entries in groups.items():
        request = entries[0].request
        flow = flows.flows.get(request)
        if flow is None:
            problem = f"request {request!r} is in no flow file (known: {', '.join(flows)})"
            out.append(Transcript(fid, request, [], [], [problem], 0))
            continue
        matcher = matchers.setdefault(request, _Matcher(flow))
        out.append(_check(fid, flow, entries, matcher, logs.machines, groups=groups))
    out.sort(key=lambda t: min((e.time or 0.0 for e, _ in t.steps), default=0.0))
    return out


#: A fan-out run's flow id ends with its row and its element: ``F/1[7]`` (mesh/control.py).
_ELEMENT = re.compile(r"/(\d+)\[(\d+)\]\Z")


def _check(
    fid: str,
    flow: Flow,
    entries: list[Entry],
    matcher: _Matcher,
    machines: set[str],
    *,
    groups: Mapping[str, object] = MappingProxyType({}),
) -> Transcript:
    """Check one run (a flow, a sub-flow ``F/3`` or a fan-out's run ``F/1[7]``). A row its
    condition skipped is not missing; nor is an ``Each`` row whose runs are logged as runs
    of their own; a fan-out's run has one line, which runs once."""
    problems: list[str] = []
    ran: list[Entry] = []
    failures = [e for e in entries if e.failed]
    skipped = {e.index: e for e in entries if e.skipped}
    element = _ELEMENT.search(fid) if flow.controlled else None
    expected = [flow.lines[int(element.group(1))]] if element else list(flow.lines)
    fanned = {e.index: e.elements for e in entries if e.elements is not None}
    for entry in entries:
        if entry.failed or entry.skipped or entry.elements is not None:
            continue
        index = matcher.line_of(entry.text, entry.index)
        if index is None:
            continue  # a handler's own event
        if index != entry.index:
            problems.append(
                f"{entry.where}: {entry.text!r} is line {index} of {flow.name},"
                f" but was logged as line {entry.index}"
            )
        ran.append(entry if index == entry.index else replace(entry, index=index))
    # Flow order; a line's repeats after its first (by its own clock, else as read).
    seen: dict[int, Entry] = {}
    for entry in sorted(ran, key=lambda e: (e.index, _stamp(e))):
        line = flow.lines[entry.index]
        if entry.index in seen:
            problems.append(
                f"{entry.where}: line {entry.index} {line.text!r} ran twice"
                f" (first at {seen[entry.index].where})"
            )
            continue
        seen[entry.index] = entry
        if entry.machine != line.machine:
            problems.append(
                f"{entry.where}: line {entry.index} {line.text!r} ran on {entry.machine};"
                f" the flow file says {line.machine}"
            )
    problems += _out_of_order(flow, seen)
    failed_at = min((f.index for f in failures), default=None)
    for failure in failures:
        problems.append(
            f"{failure.where}: line {failure.index} {flow.lines[failure.index].text!r}"
            f" failed on {failure.machine}: {failure.failed}"
            if failure.index < len(flow.lines)
            else f"{failure.where}: failed on {failure.machine}: {failure.failed}"
        )
    for line in expected:
        if line.index in seen or line.index in skipped:
            continue
        if line.each is not None and element is None:
            prefix = f"{fid}/{line.index}["
            count = fanned.get(line.index)
            if count is not None:  # the row logged how many runs it has: each must be here
                missing = [k for k in range(count) if f"{prefix}{k}]" not in groups]
                if missing:
                    shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
                    why = (
                        "" if line.machine in machines else f" (no log of {line.machine} was read)"
                    )
                    problems.append(
                        f"line {line.index} {line.text!r} on {line.machine}: {len(missing)} of"
                        f" its {count} runs left no log (elements {shown}){why}"
                    )
                continue
            if any(g.startswith(prefix) for g in groups):
                continue  # its runs are transcripts of their own
        if failed_at is not None and line.index > failed_at:
            why = f" (not reached: the flow failed at line {failed_at})"
        elif line.machine not in machines:
            why = f" (no log of {line.machine} was read: is its file among those given?)"
        else:
            why = ""
        problems.append(f"line {line.index} {line.text!r} on {line.machine} is missing{why}")
    # Flow order, each step timed to the next line that ran.
    ordered = [seen[i] for i in sorted(seen)]
    steps: list[tuple[Entry, float | None]] = []
    for n, entry in enumerate(ordered):
        after = ordered[n + 1] if n + 1 < len(ordered) else None
        duration = None
        if after is not None and after.time is not None and entry.time is not None:
            duration = after.time - entry.time
        steps.append((entry, duration))
    notes = _skew(ordered)
    if skipped:
        steps = sorted([*steps, *((e, None) for e in skipped.values())], key=lambda s: s[0].index)
    return Transcript(fid, flow.name, steps, failures, problems, len(expected), notes)


def _stamp(entry: Entry) -> tuple[float, str, int]:
    return (entry.time if entry.time is not None else float("inf"), entry.path, entry.row)


def _out_of_order(flow: Flow, seen: dict[int, Entry]) -> list[str]:
    """Lines one clock saw in another order than the flow file's: each machine's lines in
    each file, by their stamps (a stable sort keeps the file's order for equal ones)."""
    by_clock: dict[tuple[str, str], list[Entry]] = {}
    for entry in seen.values():
        by_clock.setdefault(entry.clock, []).append(entry)
    problems = []
    for entries in by_clock.values():
        latest = -1
        for entry in sorted(entries, key=_stamp):
            if entry.index < latest:
                problems.append(
                    f"{entry.where}: line {entry.index} {flow.lines[entry.index].text!r} ran"
                    f" after line {latest} {flow.lines[latest].text!r}; the flow file has it"
                    " before"
                )
            latest = max(latest, entry.index)
    return problems


def _skew(ordered: list[Entry]) -> list[str]:
    """A note for each clock stamped behind another's: the largest amount by which a line
    on it is stamped before an earlier line of the flow on the other, the least skew that
    explains what the stamps say."""
    worst: dict[tuple[tuple[str, str], tuple[str, str]], tuple[float, Entry, Entry]] = {}
    for n, first in enumerate(ordered):
        for later in ordered[n + 1 :]:
            if first.clock == later.clock or first.time is None or later.time is None:
                continue
            gap = first.time - later.time
            key = (later.clock, first.clock)
            if gap > 0 and gap > worst.get(key, (0.0,))[0]:
                worst[key] = (gap, first, later)
    notes = []
    for (behind, ahead), (gap, first, later) in worst.items():
        if behind[1] == ahead[1]:  # one machine's lines in two files
            slow, fast = f"{behind[1]} ({behind[0]})", f"{ahead[1]} ({ahead[0]})"
        else:
            slow, fast = behind[1], ahead[1]
        notes.append(
            f"clock skew: {slow}'s clock is at least {gap * 1000:.3f} ms behind {fast}'s"
            f" (line {later.index} is stamped before line {first.index}, which runs first);"
            " times across them are off by as much"
        )
    return notes


def _clock(t: float | None) -> str:
    if t is None:
        return "?"
    return datetime.fromtimestamp(t).astimezone().strftime("%H:%M:%S.%f")


def format_transcript(t: Transcript) -> str:
    """A transcript as text: a heading, the table of steps, then each problem."""
    status = "ok" if not t.problems else f"{len(t.problems)} problems"
    head = f"{t.request}  flow {t.flow_id}  {len(t.steps)} of {t.lines} lines  {status}"
    rows = [("#", "line", "machine", "at", "ms")]
    for entry, duration in t.steps:
        ms = f"{duration * 1000:.3f}" if duration is not None else ""
        rows.append((str(entry.index), entry.text, entry.machine, _clock(entry.time), ms))
    out = [head]
    if t.steps:
        out += _table(rows, "  ")
    out += [f"  problem: {p}" for p in t.problems]
    out += [f"  note: {n}" for n in t.notes]
    return "\n".join(out) + "\n"


def _table(rows: Iterable[tuple[str, ...]], indent: str) -> list[str]:
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
