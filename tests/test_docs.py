"""The documentation: every code block of every page runs as written, the site builds
without a broken link, the CLI reference is the parser's, and the README stays a front page.

The blocks run with ``tests/support/docblocks.py`` (its docstring describes the markers),
as the README's do in ``tests/test_readme.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import docblocks
from support.docblocks import Block, Sandbox

from mesh.cli import make_argument_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Every Markdown page a reader is pointed to, but the README (tests/test_readme.py).
PAGES = sorted(DOCS.rglob("*.md")) + sorted((ROOT / "examples").rglob("README.md"))


def _runnable() -> list[Block]:
    return [b for page in PAGES for b in docblocks.blocks(page) if b.runs]


@pytest.mark.parametrize(
    "block", _runnable(), ids=lambda b: str(b.path.relative_to(ROOT)) + f":{b.line}"
)
def test_docs_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    """A reader who copies this block of the docs and runs it from a checkout (with the
    peers its marker names serving) sees it succeed."""
    with Sandbox(block, tmp_path) as box:
        done = box.run()
    assert done.returncode == 0, box.explain(done)


def test_every_page_says_why_a_block_does_not_run() -> None:
    """A Python or shell block that does not run has a reason in its marker; the pages have
    blocks that run, so the test above checks something."""
    blocks = [b for page in PAGES for b in docblocks.blocks(page)]
    for block in blocks:
        if block.kind is not None and not block.runs:
            assert block.reason, block.name
    assert len([b for b in blocks if b.runs]) >= 10


def test_readme_is_a_front_page() -> None:
    """The README is a front page (about 250 lines at most) that links into the docs; the
    manual is in docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for page in ("getting-started", "concepts", "configuration", "cli", "deployment"):
        assert f"](docs/{page}.md)" in text


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
