"""Sequence diagrams of flows, and of runs: Mermaid text, or SVG drawn here.

A flow file already is a sequence: lines in order, each on a machine. The
diagram shows it the way people draw such things: one participant per machine
(in order of first appearance), each line a note on its machine, each hop
between machines an arrow labelled with the line it hands to (a solid arrow
for a call, a dashed one for handing the flow back up the call chain).
A *run* is drawn the same way from a finished flow's steps, each labelled with
its duration, the slowest one marked, so a slow hop stands out.

Mermaid text renders on GitHub and in most docs tools. SVG and HTML are drawn
by this module itself, so a page is self-contained and renders offline: no
JavaScript, no fonts or scripts fetched from anywhere. Pure: strings in,
strings out.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import count
from typing import Literal

from mesh.flowfile import Flow
from mesh.result import Step
from mesh.routing import plan

__all__ = [
    "FORMATS",
    "Diagram",
    "Event",
    "format_for",
    "from_flow",
    "from_run",
    "render",
    "to_html",
    "to_mermaid",
    "to_svg",
]

FORMATS = ("mermaid", "html", "svg")
Kind = Literal["note", "call", "back"]


@dataclass(frozen=True, slots=True)
class Event:
    """One row of a diagram: a line as a note on its machine, or a hop to it."""

    kind: Kind
    index: int
    source: str  # the machine the flow comes from (== target for a note)
    target: str  # the machine that runs the line
    label: str
    ms: float | None = None  # runs only: the step's own time
    slowest: bool = False
    hop_ms: float | None = None  # runs only: from the previous step's end to this one's start
    #: Control flow (flow diagrams): the row's condition, its fan-out list, the request it
    #: runs as a sub-flow; Mermaid draws them as ``opt``/``alt``, ``loop`` and a call.
    when: str = ""
    each: str = ""
    sub: str = ""

    @property
    def total_ms(self) -> float:
        """The time this row stands for: the hop to it, and the step itself."""
        return (self.ms or 0.0) + (self.hop_ms or 0.0)


@dataclass(frozen=True, slots=True)
class Diagram:
    """What to draw, whatever the format."""

    title: str
    participants: tuple[str, ...]
    events: tuple[Event, ...]


def from_flow(flow: Flow) -> Diagram:
    """The flow file's picture of ``flow``: lines as written, placeholders and ``#secrets``."""
    hops = plan(flow, flow.lines[0].machine)
    events = []
    previous = flow.lines[0].machine
    for line, hop in zip(flow.lines, hops, strict=True):
        kind: Kind = "note"
        if line.machine != previous:
            kind = "back" if hop.how == "hand back" else "call"
        when = line.when.text if line.when is not None else ""
        each = line.each.key if line.each is not None else ""
        events.append(
            Event(
                kind,
                line.index,
                previous,
                line.machine,
                line.text,
                when=when,
                each=each,
                sub=line.sub,
            )
        )
        if hop.how != "fan-out":  # a fan-out's runs come back: the flow stays where it was
            previous = line.machine
    return Diagram(flow.name, flow.machines, tuple(events))


def from_run(flow: Flow, steps: Sequence[Step], flow_id: str = "") -> Diagram:
    """A finished flow as it ran: rendered lines (secrets masked), machines, durations.

    A hop's time is the gap between the step before it ending and its own start,
    by two machines' clocks; the row with the most time (hop and step) is marked.
    """
    hops = plan(flow, flow.lines[0].machine)
    events: list[Event] = []
    steps = [s for s in steps if not s.skipped]  # the path taken: a skipped row ran nothing
    previous = steps[0].machine if steps else ""
    for i, step in enumerate(steps):
        kind: Kind = "note"
        hop_ms = None
        if step.machine != previous:
            how = hops[step.index].how if step.index < len(hops) and not step.request else "call"
            kind = "back" if how == "hand back" else "call"
            before = steps[i - 1]
            hop_ms = max(step.start - (before.start + before.duration), 0.0) * 1000.0
        label = step.line
        if step.element is not None:
            label = f"[{step.element}] {label}"
        if step.request:
            label = f"{step.request}: {label}"
        events.append(
            Event(kind, step.index, previous, step.machine, label, step.ms, hop_ms=hop_ms)
        )
        previous = step.machine
    if events:
        slow = max(range(len(events)), key=lambda i: events[i].total_ms)
        events[slow] = replace(events[slow], slowest=True)
    machines = tuple(dict.fromkeys(s.machine for s in steps))
    end = steps[-1].start + steps[-1].duration if steps else 0.0
    total = (end - steps[0].start) * 1000.0 if steps else 0.0
    title = f"{flow.name} {flow_id[:8]} ({len(steps)} steps, {total:.2f} ms end to end)"
    title = title.replace("  ", " ")
    return Diagram(title, machines, tuple(events))


def _label(event: Event, control: bool = True) -> str:
    """A row's text; with ``control`` (SVG, HTML), its condition, fan-out and sub-flow in
    brackets (Mermaid draws them as blocks instead)."""
    text = f"{event.index}. {event.label}"
    if control:
        if event.sub:
            text += f" [runs {event.sub}: see its diagram]"
        if event.when:
            text += f" [when {event.when}]"
        if event.each:
            text += f" [each item of {event.each}]"
    if event.ms is not None:
        hop = f" + {event.hop_ms:.2f} ms hop" if event.hop_ms is not None else ""
        text += f" ({event.ms:.2f} ms{hop}{', slowest' if event.slowest else ''})"
    return text


# -- Mermaid -------------------------------------------------------------------

#: Mermaid's sequence lexer takes the first rule that matches, not the longest, so
#: a machine whose name merely *starts* with one of its keywords ("endpoint",
#: "parser", "notifier") would be misread; such names get an alias.
# fmt: off
_MERMAID_WORDS = (
    "sequencediagram", "participant", "actor", "create", "destroy", "box", "loop", "rect",
    "opt", "option", "alt", "else", "par", "and", "critical", "break", "end", "left", "right",
    "links", "link", "properties", "details", "over", "note", "activate", "deactivate",
    "title", "autonumber", "off", "acctitle", "accdescr",
)
# fmt: on
_MERMAID_CODES = {"#": "#35;", ";": "#59;", "<": "#lt;", ">": "#gt;"}
_MERMAID_SPECIAL = re.compile(r"[#;<>]|[\r\n]+")
_PLAIN_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def mermaid_text(text: str) -> str:
    """``text`` safe in a Mermaid message or note: entity codes for the characters it parses.

    ``#`` starts an entity code and ``;`` ends a statement, so both are written as
    codes; ``<``/``>`` would be taken for HTML; a newline would end the statement.
    """
    return _MERMAID_SPECIAL.sub(lambda m: _MERMAID_CODES.get(m.group(), " "), text)


def _ids(participants: Sequence[str]) -> dict[str, str]:
    """Mermaid ids: the machine name where it is a plain word, else an alias."""
    ids = {}
    for n, name in enumerate(participants):
        plain = _PLAIN_ID.fullmatch(name) and not name.lower().startswith(_MERMAID_WORDS)
        ids[name] = name if plain else f"m{n}"
    return ids


def to_mermaid(diagram: Diagram) -> str:
    """A Mermaid ``sequenceDiagram`` (the slowest step of a run in a shaded box)."""
    ids = _ids(diagram.participants)
    out = ["sequenceDiagram", f"    title {mermaid_text(diagram.title)}"]
    for name in diagram.participants:
        pid = ids[name]
        out.append(f"    participant {pid}" + (f" as {name}" if pid != name else ""))
    events = diagram.events
    for n, event in enumerate(events):
        label = mermaid_text(_label(event, control=False))
        if event.sub:
            label += mermaid_text(f" (calls {event.sub}: its own diagram)")
        if event.kind == "note":
            row = f"Note over {ids[event.target]}: {label}"
        else:
            arrow = "->>" if event.kind == "call" else "-->>"
            row = f"{ids[event.source]}{arrow}{ids[event.target]}: {label}"
        rows = [f"{row}"]
        if event.each:
            rows = [f"loop each item of {mermaid_text(event.each)}", *(f"    {r}" for r in rows)]
            rows.append("end")
        if event.slowest:
            rows = ["rect rgb(255, 224, 214)", *(f"    {r}" for r in rows), "end"]
        before = events[n - 1] if n else None
        after = events[n + 1] if n + 1 < len(events) else None
        if event.when:
            if before is not None and _opposite(before.when, event.when):
                rows = [f"else {mermaid_text(event.when)}", *(f"    {r}" for r in rows), "end"]
            elif after is not None and _opposite(event.when, after.when):
                rows = [f"alt {mermaid_text(event.when)}", *(f"    {r}" for r in rows)]
            else:
                rows = [f"opt {mermaid_text(event.when)}", *(f"    {r}" for r in rows), "end"]
        out.extend(f"    {r}" for r in rows)
    return "\n".join(out) + "\n"


def _opposite(first: str, second: str) -> bool:
    """Whether two rows in a row are an if and its else: ``X`` then ``not X`` (either way)."""
    if not first or not second:
        return False
    return second == f"not {first}" or first == f"not {second}"


def to_markdown(diagrams: Sequence[Diagram]) -> str:
    """Several diagrams as Markdown: a heading and a fenced ``mermaid`` block each."""
    parts = [f"### {d.title}\n\n```mermaid\n{to_mermaid(d)}```\n" for d in diagrams]
    return "\n".join(parts)


# -- SVG -----------------------------------------------------------------------

_CHAR = 7.4  # px per character of 13px sans-serif, a generous average
_PAD = 12
_BOX_H = 32
_ROW = 40
_TOP = 44
_GAP = 150
_BAR = 140  # the widest duration bar of a run
_ids_made = count()


def _width(text: str) -> float:
    return len(text) * _CHAR


def _layout(diagram: Diagram) -> tuple[dict[str, float], float, float]:
    """Column centres, then the leftmost and rightmost x anything reaches."""
    names = diagram.participants
    pos = {name: i for i, name in enumerate(names)}
    # The gap between neighbouring columns must fit the widest arrow label that
    # spans them (a label over k gaps needs 1/k of its width from each).
    gaps = [float(_GAP)] * max(len(names) - 1, 0)
    for event in diagram.events:
        if event.kind == "note":
            continue
        a, b = sorted((pos[event.source], pos[event.target]))
        need = (_width(_label(event)) + 2 * _PAD) / max(b - a, 1)
        for g in range(a, b):
            gaps[g] = max(gaps[g], need)
    xs: dict[str, float] = {}
    x = 0.0
    for i, name in enumerate(names):
        if i:
            x += gaps[i - 1]
        xs[name] = x
    left = min((xs[n] - (_width(n) + 2 * _PAD) / 2 for n in names), default=0.0)
    right = max((xs[n] + (_width(n) + 2 * _PAD) / 2 for n in names), default=0.0)
    for event in diagram.events:
        if event.kind == "note":
            half = (_width(_label(event)) + 2 * _PAD) / 2
            left = min(left, xs[event.target] - half)
            right = max(right, xs[event.target] + half)
    return xs, left, right


#: What neither XML 1.0 nor HTML may carry, even as a character reference: C0 controls but
#: tab, newline and carriage return; DEL and the C1 controls; surrogates (never valid UTF-8);
#: noncharacters. A context value may hold any of them (``"\u0001"`` from JSON, a
#: surrogate from bytes in argv that are not UTF-8), so they are drawn as visible escapes.
_NOT_MARKUP = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(
        f"{chr(plane | 0xFFFE)}{chr(plane | 0xFFFF)}" for plane in range(0, 0x110000, 0x10000)
    )
    + "]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def _attr(value: object) -> str:
    """``value`` as text for an SVG or HTML attribute or element: markup escaped, and what
    markup cannot carry at all written as a visible escape, so the file is well-formed."""
    return html.escape(_NOT_MARKUP.sub(_escape, str(value)), quote=True)


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def to_svg(diagram: Diagram, *, standalone: bool = True) -> str:
    """The diagram as one ``<svg>`` element, every text XML-escaped.

    Each machine is a ``<g class="participant" data-machine="…">``; each line a
    ``<g class="note">`` or ``<g class="message">`` with ``data-line``.
    """
    xs, left, right = _layout(diagram)
    timed = any(e.ms is not None for e in diagram.events)
    bar_x = right + 24
    if timed:
        right = bar_x + _BAR + 90
    left -= 20
    right += 20
    title_w = _width(diagram.title) * 1.2 + 40
    right = max(right, left + title_w)
    height = _TOP + _BOX_H + 16 + _ROW * len(diagram.events) + 16 + _BOX_H + 20
    width = right - left
    uid = f"mesh{next(_ids_made)}"
    most = max((e.total_ms for e in diagram.events), default=0.0) or 1.0
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out = [
        f'<svg{ns} class="mesh-diagram" width="{_fmt(width)}" height="{_fmt(height)}"'
        f' viewBox="{_fmt(left)} 0 {_fmt(width)} {_fmt(height)}" role="img"'
        f' aria-label="{_attr("sequence diagram of " + diagram.title)}"'
        ' font-family="Helvetica, Arial, sans-serif" font-size="13">',
        f"<title>{_attr(diagram.title)}</title>",
        "<defs>",
        f'<marker id="{uid}-head" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="9"'
        ' markerHeight="9" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#333"/></marker>',
        "</defs>",
        f'<rect x="{_fmt(left)}" y="0" width="{_fmt(width)}" height="{_fmt(height)}"'
        ' fill="#ffffff"/>',
        f'<text x="{_fmt(left + 20)}" y="26" font-size="16" font-weight="bold"'
        f' fill="#222">{_attr(diagram.title)}</text>',
    ]
    foot = height - 20 - _BOX_H
    for name in diagram.participants:
        x = xs[name]
        w = _width(name) + 2 * _PAD
        out.append(
            f'<line class="lifeline" x1="{_fmt(x)}" y1="{_TOP + _BOX_H}" x2="{_fmt(x)}"'
            f' y2="{_fmt(foot)}" stroke="#999" stroke-dasharray="4,4"/>'
        )
        for cls, y in (("participant", _TOP), ("participant-foot", foot)):
            out.append(
                f'<g class="{cls}" data-machine="{_attr(name)}">'
                f'<rect x="{_fmt(x - w / 2)}" y="{_fmt(y)}" width="{_fmt(w)}" height="{_BOX_H}"'
                ' rx="4" fill="#eaf1fb" stroke="#4a6fa5"/>'
                f'<text x="{_fmt(x)}" y="{_fmt(y + 21)}" text-anchor="middle"'
                f' fill="#1b2a41">{_attr(name)}</text></g>'
            )
    y = _TOP + _BOX_H + 16
    for event in diagram.events:
        label = _attr(_label(event))
        mid = y + _ROW / 2
        if event.when or event.each:  # a frame, as Mermaid's opt and loop blocks
            tag = " ".join(
                [f"opt {event.when}"] * bool(event.when) + [f"loop {event.each}"] * bool(event.each)
            )
            out.append(
                f'<g class="frame" data-line="{event.index}">'
                f'<rect x="{_fmt(left + 8)}" y="{_fmt(y + 1)}" width="{_fmt(width - 16)}"'
                f' height="{_ROW - 2}" fill="none" stroke="#8e44ad" stroke-dasharray="3,3"/>'
                f'<text x="{_fmt(left + 12)}" y="{_fmt(y + 12)}" font-size="10"'
                f' fill="#8e44ad">{_attr(tag)}</text></g>'
            )
        slow = ' data-slowest="true"' if event.slowest else ""
        if event.kind == "note":
            x = xs[event.target]
            w = _width(_label(event)) + 2 * _PAD
            fill = "#ffd9cc" if event.slowest else "#fff8d6"
            out.append(
                f'<g class="note" data-line="{event.index}"'
                f' data-machine="{_attr(event.target)}"{slow}>'
                f'<rect x="{_fmt(x - w / 2)}" y="{_fmt(mid - 13)}" width="{_fmt(w)}" height="26"'
                f' fill="{fill}" stroke="#c9a227"/>'
                f'<text x="{_fmt(x)}" y="{_fmt(mid + 4.5)}" text-anchor="middle"'
                f' fill="#222">{label}</text></g>'
            )
        else:
            x1, x2 = xs[event.source], xs[event.target]
            dash = ' stroke-dasharray="6,4"' if event.kind == "back" else ""
            colour = "#c0392b" if event.slowest else "#333"
            out.append(
                f'<g class="message {event.kind}" data-line="{event.index}"'
                f' data-from="{_attr(event.source)}" data-machine="{_attr(event.target)}"{slow}>'
                f'<line x1="{_fmt(x1)}" y1="{_fmt(mid + 8)}" x2="{_fmt(x2)}" y2="{_fmt(mid + 8)}"'
                f' stroke="{colour}" stroke-width="1.5"{dash} marker-end="url(#{uid}-head)"/>'
                f'<text x="{_fmt((x1 + x2) / 2)}" y="{_fmt(mid + 1)}" text-anchor="middle"'
                f' fill="{colour}">{label}</text></g>'
            )
        if event.ms is not None:
            w = max(_BAR * event.total_ms / most, 1.0)
            fill = "#c0392b" if event.slowest else "#7aa6d8"
            out.append(
                f'<g class="duration" data-line="{event.index}">'
                f'<rect x="{_fmt(bar_x)}" y="{_fmt(mid - 6)}" width="{_fmt(w)}" height="12"'
                f' fill="{fill}"/>'
                f'<text x="{_fmt(bar_x + w + 6)}" y="{_fmt(mid + 4.5)}"'
                f' fill="#222">{event.total_ms:.2f} ms</text></g>'
            )
        y += _ROW
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_svg_document(diagrams: Sequence[Diagram]) -> str:
    """One SVG file: a single diagram, or several stacked one under another."""
    if len(diagrams) == 1:
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + to_svg(diagrams[0])
    parts = [to_svg(d, standalone=False) for d in diagrams]
    sizes = [_size(p) for p in parts]
    width = max(w for w, _ in sizes)
    height = sum(h for _, h in sizes)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_fmt(width)}"'
        f' height="{_fmt(height)}" viewBox="0 0 {_fmt(width)} {_fmt(height)}">',
    ]
    y = 0.0
    for part, (_, h) in zip(parts, sizes, strict=True):
        out.append(part.replace("<svg ", f'<svg x="0" y="{_fmt(y)}" ', 1))
        y += h
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _size(svg: str) -> tuple[float, float]:
    match = re.search(r'width="([\d.]+)" height="([\d.]+)"', svg)
    assert match is not None
    return float(match.group(1)), float(match.group(2))


def to_html(diagrams: Sequence[Diagram], title: str = "mesh flows") -> str:
    """One self-contained page with an inline SVG per diagram: nothing to fetch."""
    sections = "\n".join(
        f'<section data-title="{_attr(d.title)}">\n{to_svg(d, standalone=False)}</section>'
        for d in diagrams
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
        f"<title>{_attr(title)}</title>\n"
        "<style>body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222}"
        "h2{font-size:16px;margin:24px 0 8px}svg{max-width:100%;height:auto}</style>\n"
        f"</head>\n<body>\n<h1>{_attr(title)}</h1>\n{sections}\n</body>\n</html>\n"
    )


def format_for(path: str, given: str | None = None) -> str:
    """The format asked for, else the one a file name implies (``.svg``, ``.html``)."""
    if given:
        return given
    lower = path.lower()
    if lower.endswith(".svg"):
        return "svg"
    if lower.endswith((".html", ".htm")):
        return "html"
    return "mermaid"


def render(diagrams: Sequence[Diagram], fmt: str, title: str = "mesh flows") -> str:
    """``diagrams`` in format ``fmt``; several Mermaid diagrams become Markdown."""
    if fmt == "svg":
        return to_svg_document(diagrams)
    if fmt == "html":
        return to_html(diagrams, title)
    if len(diagrams) == 1:
        return to_mermaid(diagrams[0])
    return to_markdown(diagrams)
