"""The HTML of ``mesh ui``, rendered on the server: every page reads without JavaScript.

Pure: view values from :mod:`mesh.ui.model` in, markup out. Every value that came from
a config, a flow file or a peer is escaped here, once, by :func:`esc`; the diagrams are
:mod:`mesh.tools.diagram`'s SVG, which escapes its own text. A page is a layout around
its ``<main id="live">``; with JavaScript on, ``static/mesh-ui.js`` fetches the same
address again every second asking for the main part alone (``X-Mesh-Partial: 1``) and puts
it in place, so a page updates live and still means the same without a script.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mesh.masking import MASK
from mesh.ui.model import (
    STATES,
    FlowFilter,
    FlowRow,
    FlowView,
    MachineRow,
    RequestView,
    ago,
)

__all__ = [
    "error_page",
    "esc",
    "flow_page",
    "flowfile_page",
    "flows_page",
    "layout",
    "login_page",
    "machines_page",
]

NAV = (("/", "Machines"), ("/flows", "Flows"), ("/flowfile", "Flow file"))


def esc(value: object) -> str:
    """``value`` as text inside an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def when(at: float) -> str:
    """A wall-clock time, UTC, to the millisecond: the peers' clocks, as they recorded it."""
    if not at:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}"


def _state(state: str) -> str:
    return f'<span class="state state-{esc(state)}" data-state="{esc(state)}">{esc(state)}</span>'


def layout(
    title: str,
    main: str,
    *,
    active: str,
    config_name: str,
    logged_in: bool = False,
    can_log_in: bool = False,
    live: bool = True,
) -> str:
    """A whole page: header, navigation and ``main`` (the part that updates live)."""
    current = ' class="active"'
    nav = "".join(
        f'<a href="{href}"{current if href == active else ""}>{esc(name)}</a>' for href, name in NAV
    )
    logout = (
        '<form method="post" action="/logout" class="logout">'
        '<button type="submit">Log out</button></form>'
        if logged_in
        else '<a class="login" href="/login">Log in</a>'
        if can_log_in
        else ""
    )
    status = (
        '<span id="live-status" class="live off" title="reload the page to update it">'
        "static page</span>"
        if live
        else ""
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)} · mesh ui</title>\n"
        '<link rel="stylesheet" href="/static/mesh-ui.css">\n'
        '<script src="/static/mesh-ui.js" defer></script>\n'
        "</head>\n<body>\n"
        f'<header><a class="brand" href="/">mesh</a><nav>{nav}</nav>'
        f'<span class="config" title="the config this page shows">{esc(config_name)}</span>'
        f"{status}{logout}</header>\n"
        f'<main id="live" data-live="{"1" if live else "0"}">\n{main}</main>\n'
        "</body>\n</html>\n"
    )


def _notes(kind: str, notes: Iterable[str]) -> str:
    return "".join(f'<p class="{kind}">{esc(n)}</p>\n' for n in notes)


def _table(head: Sequence[str], rows: Iterable[str], cls: str = "") -> str:
    heading = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "\n".join(rows)
    return (
        f'<table class="{cls}">\n<thead><tr>{heading}</tr></thead>\n<tbody>\n{body}\n</tbody>\n'
        "</table>\n"
    )


# -- machines ----------------------------------------------------------------------------


def machines_page(rows: Sequence[MachineRow], notes: Sequence[str] = ()) -> str:
    out = ["<h1>Machines</h1>\n", _notes("warning", notes)]
    cells = []
    for r in rows:
        health = esc(r.health)
        cells.append(
            f'<tr data-machine="{esc(r.machine)}" data-replica="{r.replica or ""}"'
            f' data-health="{health}">'
            f"<td>{esc(r.name)}</td><td><code>{esc(r.address or '(none: originates only)')}</code>"
            f"</td><td><code>{esc(r.dial)}</code></td>"
            f'<td><span class="health health-{health.replace(" ", "-")}">{health}</span></td>'
            f'<td class="num">{r.flows}</td></tr>'
        )
    out.append(
        _table(("machine", "address", "asked at", "health", "flows here now"), cells, "machines")
    )
    out.append(
        '<p class="hint">Health is each peer\'s gRPC health service; flows here now are the'
        " durable flows running or waiting on it.</p>\n"
    )
    return "".join(out)


# -- the flow file -----------------------------------------------------------------------


def flowfile_page(
    requests: Sequence[RequestView],
    *,
    problem: str = "",
    problems: Sequence[str] = (),
    warnings: Sequence[str] = (),
) -> str:
    out = ["<h1>Flow file</h1>\n"]
    if problem:
        out.append(f'<p class="error">The services could not be imported: {esc(problem)}</p>\n')
    out.append(_notes("error", problems))
    out.append(_notes("warning", warnings))
    out.append('<nav class="requests">')
    out.append(" ".join(f'<a href="#request-{esc(r.name)}">{esc(r.name)}</a>' for r in requests))
    out.append("</nav>\n")
    for r in requests:
        rows = []
        for ln in r.lines:
            mark = "yes" if ln.registered else "no"
            rows.append(
                f'<tr data-line="{ln.index}" data-machine="{esc(ln.machine)}"'
                f' data-handler="{mark}"><td class="num">{ln.index}</td>'
                f"<td>{esc(ln.text)}</td><td>{esc(ln.machine)}</td>"
                f'<td><span class="handler handler-{mark}">{esc(ln.handler)}</span></td>'
                f"<td>{esc(ln.how)}</td></tr>"
            )
        out.append(
            f'<section class="request" id="request-{esc(r.name)}" data-request="{esc(r.name)}">'
            f"<h2>{esc(r.name)}</h2>\n"
            f'<p class="meta"><code>{esc(r.path)}</code> ·'
            f" digest <code>{esc(r.digest)}</code></p>\n"
            f'<div class="diagram">{r.svg}</div>\n'
            + _table(("#", "line", "machine", "handler", "how it gets there"), rows, "lines")
            + "</section>\n"
        )
    return "".join(out)


# -- the flows list ----------------------------------------------------------------------


def _filter_form(chosen: FlowFilter, requests: Sequence[str]) -> str:
    states = "".join(
        f'<option value="{s}"{" selected" if chosen.state == s else ""}>{s}</option>'
        for s in STATES
    )
    names = "".join(
        f'<option value="{esc(r)}"{" selected" if chosen.request == r else ""}>{esc(r)}</option>'
        for r in requests
    )
    return (
        '<form class="filters" method="get" action="/flows">'
        '<label>state <select name="state"><option value="">any</option>'
        f"{states}</select></label> "
        '<label>request <select name="request"><option value="">any</option>'
        f"{names}</select></label> "
        '<label>started within <input name="age" size="6" placeholder="e.g. 5m"'
        f' value="{esc(chosen.age or "")}"></label> '
        '<button type="submit">Filter</button> <a href="/flows">clear</a></form>\n'
    )


def flows_page(
    rows: Sequence[FlowRow],
    chosen: FlowFilter,
    requests: Sequence[str],
    *,
    unreachable: Sequence[str] = (),
    unavailable: str = "",
    now: float | None = None,
) -> str:
    now = time.time() if now is None else now
    out = ["<h1>Flows</h1>\n", _filter_form(chosen, requests)]
    out.append(_notes("warning", chosen.problems))
    if unavailable:
        out.append(f'<p class="error">{esc(unavailable)}</p>\n')
    if unreachable:
        out.append(_notes("warning", [f"not answering: {', '.join(unreachable)}"]))
    cells = []
    for r in rows:
        where = r.machine
        if r.state in ("running", "waiting", "cancelled"):
            where += f", line {r.line}" + (f": {r.line_text}" if r.line_text else "")
        cells.append(
            f'<tr data-flow="{esc(r.flow_id)}" data-state="{esc(r.state)}"'
            f' data-request="{esc(r.request)}" data-started="{r.started:.3f}">'
            f'<td><a href="/flows/{esc(r.flow_id)}"><code>{esc(r.flow_id[:12])}</code></a></td>'
            f"<td>{esc(r.request)}</td><td>{_state(r.state)}</td><td>{esc(where)}</td>"
            f'<td title="{esc(when(r.started))} UTC">{esc(ago(now - r.started))}</td>'
            f'<td title="{esc(when(r.updated))} UTC">{esc(ago(now - r.updated))}</td>'
            f'<td class="note">{esc(r.note)}</td></tr>'
        )
    if not cells:
        cells.append('<tr class="empty"><td colspan="7">no flows match</td></tr>')
    out.append(
        _table(("flow", "request", "state", "where", "started", "updated", ""), cells, "flows")
    )
    out.append(f'<p class="hint">{len(rows)} flows, newest first.</p>\n')
    return "".join(out)


# -- one flow ----------------------------------------------------------------------------


def _value(value: Any) -> str:
    if value == MASK:
        return f'<span class="masked">{MASK}</span>'
    return f"<code>{esc(json.dumps(value, ensure_ascii=False, default=str))}</code>"


def _context(title: str, context: Mapping[str, Any], cls: str) -> str:
    rows = [
        f'<tr data-key="{esc(k)}"><td><code>{esc(k)}</code></td><td>{_value(v)}</td></tr>'
        for k, v in context.items()
    ]
    if not rows:
        rows.append('<tr class="empty"><td colspan="2">empty</td></tr>')
    return f"<h2>{esc(title)}</h2>\n" + _table(("key", "value"), rows, cls)


def _where(view: FlowView) -> str:
    s = view.summary
    if view.can_cancel:
        return f"now on <b>{esc(s.machine)}</b>, line {s.line}"
    return f"ended on <b>{esc(s.machine)}</b>"


def flow_page(view: FlowView, *, unreachable: Sequence[str] = (), message: str = "") -> str:
    s = view.summary
    out = [
        f'<h1 data-flow="{esc(s.flow_id)}">{esc(s.request)} '
        f"<code>{esc(s.flow_id)}</code> {_state(s.state)}</h1>\n",
        f'<p class="meta">started {esc(when(s.started))} UTC · last record'
        f" {esc(when(s.updated))} UTC · {_where(view)}</p>\n",
    ]
    if message:
        out.append(f'<p class="error">{esc(message)}</p>\n')
    if unreachable:
        out.append(_notes("warning", [f"not answering: {', '.join(unreachable)}"]))
    if s.state == "waiting":
        out.append(
            f'<p class="waiting" id="waiting">Waits on {esc(view.waits_at)}'
            f"{': ' + esc(s.waiting) if s.waiting else ''}</p>\n"
        )
    if view.failed_at is not None:
        machine, line = view.failed_at
        out.append(
            f'<p class="failure" id="failure">Failed on <b>{esc(machine)}</b> at line {line}'
            f"{': ' + esc(s.error) if s.error else ''}</p>\n"
        )
    actions = []
    if view.can_cancel:
        actions.append(
            f'<form method="post" action="/flows/{esc(s.flow_id)}/cancel">'
            '<button type="submit" class="danger" id="cancel">Cancel this flow</button></form>'
        )
    if view.can_retry:
        actions.append(
            f'<form method="post" action="/flows/{esc(s.flow_id)}/retry">'
            '<button type="submit" id="retry">Retry from where it stopped</button></form>'
        )
    if actions:
        out.append(f'<div class="actions">{"".join(actions)}</div>\n')
    if view.svg:
        out.append(f'<h2>Path taken</h2>\n<div class="diagram">{view.svg}</div>\n')
    rows = []
    start = view.timeline[0].at if view.timeline else 0.0
    for r in view.timeline:
        ms = f"{r.ms:.2f}" if r.ms is not None else ""
        ms = ms if r.own_time else f'<span title="to the next line, the hop included">{ms}</span>'
        rows.append(
            f'<tr data-line="{r.line}" data-machine="{esc(r.machine)}"'
            f' data-state="{esc(r.state)}"><td class="num">{r.line}</td>'
            f"<td>{esc(r.log)}</td><td>{esc(r.machine)}</td><td>{_state(r.state)}</td>"
            f'<td class="num" title="{esc(when(r.at))} UTC">+{(r.at - start) * 1000:.1f} ms</td>'
            f'<td class="num">{ms}</td><td class="note">{esc(r.error or "")}</td></tr>'
        )
    if not rows:
        rows.append('<tr class="empty"><td colspan="7">no line has run yet</td></tr>')
    out.append("<h2>Timeline</h2>\n")
    out.append(_table(("#", "line", "machine", "state", "at", "ms", "error"), rows, "timeline"))
    if view.result is None or dict(view.result) != dict(view.context):
        out.append(_context("Context", view.context, "context"))
    if view.result is not None:
        out.append(_context("Result", view.result, "result"))
    if view.lines:
        ran = {r.line for r in view.timeline}
        cells = [
            f'<tr data-line="{i}" class="{"ran" if i in ran else "not-ran"}">'
            f'<td class="num">{i}</td><td>{esc(text)}</td><td>{esc(machine)}</td></tr>'
            for i, text, machine in view.lines
        ]
        out.append(f"<h2>The flow file's {esc(s.request)}</h2>\n")
        out.append(_table(("#", "line", "machine"), cells, "plan"))
    return "".join(out)


# -- login and errors --------------------------------------------------------------------


def login_page(next_path: str, *, failed: bool = False) -> str:
    out = ["<h1>Log in</h1>\n"]
    if failed:
        out.append('<p class="error">That is not the mesh token.</p>\n')
    out.append(
        "<p>This page is served beyond this host, so it asks for the mesh's token (the"
        " <code>token_file</code> of mesh.toml, or <code>$MESH_TOKEN</code>). Scripts may"
        " send it as <code>Authorization: Bearer …</code> instead.</p>\n"
        '<form method="post" action="/login" class="login">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        '<label>token <input type="password" name="token" autocomplete="current-password"'
        ' autofocus required></label> <button type="submit">Log in</button></form>\n'
    )
    return "".join(out)


def error_page(title: str, message: str) -> str:
    return f'<h1>{esc(title)}</h1>\n<p class="error">{esc(message)}</p>\n'
