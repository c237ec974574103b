"""The CLI reference page, generated from ``mesh``'s own argument parser, so it cannot drift.

A MkDocs hook (``mkdocs.yml``: ``hooks: [scripts/docs_cli.py]``): on the page that holds
the marker ``<!-- cli-reference -->`` the marker is replaced by :func:`reference`, a section
per command with its usage and a table of its arguments. ``tests/test_docs.py`` checks that
every command and flag the parser has appears in it.
"""

from __future__ import annotations

import argparse
from typing import Any

MARKER = "<!-- cli-reference -->"


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


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: put the reference where the page has the marker."""
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
