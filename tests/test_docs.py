"""The documentation: the site builds without a broken link, the CLI reference is the
parser's, and the README stays a front page."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from mesh.cli import make_argument_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _every_flag(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings]


def test_cli_reference_names_every_command_and_flag() -> None:
    """The generated reference has a section per command, each with its usage and every
    flag and positional the parser has: a new flag cannot be left out of the docs."""
    hooks = _docs_hooks()
    parser = make_argument_parser()
    text = hooks.reference(parser)
    commands = hooks.subcommands(parser)
    assert {"check", "peer", "up", "call", "init", "deploy", "health", "logs"} <= set(commands)
    for flag in _every_flag(parser):
        assert f"`{flag}" in text, flag
    sections = text.split("\n## mesh ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == list(commands)
    for section, (name, sub) in zip(sections, commands.items(), strict=True):
        assert f"usage: mesh {name}" in section
        for action in sub._actions:
            shown = action.option_strings or [action.metavar or action.dest]
            for flag in shown:
                assert f"`{flag}".replace("|", "\\|") in section, (name, flag)
    assert "<!-- cli-reference -->" in (DOCS / "cli.md").read_text(encoding="utf-8")


def test_the_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` (what `make docs` runs): every page in the nav, no broken
    link; the built CLI page holds the generated reference."""
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    for flag in ("--log-dir", "--namespace", "--force", "--address"):
        assert flag in page
    assert "cli-reference" not in page
    home = (site / "index.html").read_text(encoding="utf-8")
    assert '<svg class="mesh-diagram"' in home  # the login flow, drawn by mesh diagram
    assert "<!-- diagram:" not in home
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")}
    built = {
        p.parent.relative_to(site).as_posix() for p in site.rglob("index.html") if p.parent != site
    }
    assert pages - {"index"} <= built
