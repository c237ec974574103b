"""MkDocs hooks (``mkdocs.yml``: ``hooks: [scripts/docs_hooks.py]``): the parts of the site
generated from the mesh itself at build time, so they cannot drift from it.

* ``<!-- cli-reference -->`` becomes :func:`reference`: a section per command of ``mesh``'s
  own argument parser, with its usage and a table of its arguments. ``tests/test_docs.py``
  checks that every command and flag the parser has appears in it.
* ``<!-- diagram: REQUEST -->`` becomes the request's sequence diagram as an inline SVG,
  drawn by ``mesh diagram`` (:mod:`mesh.tools.diagram`) from the repository's flow files,
  or from the project ``mesh init`` writes: it renders offline, with no script.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
DIAGRAM = re.compile(r"<!-- diagram: (?P<request>[\w-]+) -->")
ROOT = Path(__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's name and its parser, in the order ``mesh --help`` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("|", "\\|")
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(f'`{c}`' for c in action.choices)})"
    return text.strip()


def _names(action: argparse.Action) -> str:
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if not action.option_strings:
        names = [metavar or action.dest]
    elif action.nargs == 0:
        names = list(action.option_strings)
    else:
        names = [f"{o} {metavar or action.dest.upper()}" for o in action.option_strings]
    return ", ".join(f"`{n}`".replace("|", "\\|") for n in names)


def reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for every command of ``parser`` (default: ``mesh``'s)."""
    if parser is None:
        from mesh.cli import make_argument_parser

        parser = make_argument_parser()
    out = [
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        "| option | meaning |",
        "| --- | --- |",
    ]
    out += [
        f"| {_names(a)} | {_help(a)} |"
        for a in parser._actions
        if a.option_strings and a.help != argparse.SUPPRESS
    ]
    for name, sub in subcommands(parser).items():
        out += ["", f"## mesh {name}", "", sub.description or "", "", "```text"]
        out += [sub.format_usage().strip(), "```", ""]
        rows = [a for a in sub._actions if a.help != argparse.SUPPRESS]
        out += ["| argument | meaning |", "| --- | --- |"]
        out += [f"| {_names(a)} | {_help(a)} |" for a in rows]
    return "\n".join(out) + "\n"


def diagram(request: str) -> str:
    """The SVG of ``request``, from the repository's mesh.toml or the mesh init project."""
    from mesh.config import load_config
    from mesh.flowfile import parse_flows
    from mesh.tools import diagram as drawing
    from mesh.tools.init import FLOWS

    flows = dict(load_config(ROOT / "mesh.toml").flows.flows)
    flows.update(parse_flows(FLOWS, "flows.tsv").flows)
    if request not in flows:
        raise ValueError(f"<!-- diagram: {request} -->: no such request (known: {sorted(flows)})")
    return drawing.to_svg(drawing.from_flow(flows[request]), standalone=False)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: put the generated parts where the page's markers are."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference())
    return DIAGRAM.sub(lambda m: f"<div>{diagram(m['request'])}</div>", markdown)
