"""The README's examples run as written (``tests/support/docblocks.py`` finds and runs them).

Each Python and shell block runs in a fresh copy of the project, against real peers where its
marker names them; a block that cannot run as written says why in its marker. The runner
itself is checked on small pages of its own at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import docblocks
from support.docblocks import Block, MarkerError, Sandbox

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize(
    "block", [b for b in docblocks.blocks(README) if b.runs], ids=lambda b: b.name
)
def test_readme_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    """A reader who copies this block of the README and runs it (with the peers its marker
    names serving) sees it succeed. Before, the inline-style example failed against the
    repository's own mesh.toml, and the originator example could not connect."""
    with Sandbox(block, tmp_path) as box:
        done = box.run()
    assert done.returncode == 0, box.explain(done)


# -- the runner on pages of its own ----------------------------------------------------------

PAGE = """\
# A page

```python
print("default: runs")
```

<!-- no-run: an output sample -->
```
$ mesh call login
```

<!-- run: peers=server,emailservice config=conf/mesh.toml timeout=5 -->
~~~sh
mesh check
~~~

- a list item with a block in it:

  ```py
  print("indented")
  ```

```toml
x = 1
```
"""


def _page(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(text, encoding="utf-8")
    return page


def test_markers_say_what_runs(tmp_path: Path) -> None:
    """Python and shell blocks run by default; a marker adds peers, a config and a timeout, or
    keeps a block from running with its reason; other blocks never run."""
    found = docblocks.blocks(_page(tmp_path, PAGE))
    summary = [(b.line, b.kind, b.runs, b.reason, b.peers, b.config, b.timeout) for b in found]
    assert summary == [
        (3, "python", True, "", (), "mesh.toml", 60.0),
        (8, None, False, "an output sample", (), "mesh.toml", 60.0),
        (13, "shell", True, "", ("server", "emailservice"), "conf/mesh.toml", 5.0),
        (19, "python", True, "", (), "mesh.toml", 60.0),
        (23, None, False, "", (), "mesh.toml", 60.0),
    ]
    assert found[3].code == 'print("indented")\n'
    assert docblocks.project_root(tmp_path / "docs" / "page.md") == tmp_path


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<!-- no-run -->\n```sh\nls\n```\n", "1: no-run needs a reason"),
        ("<!-- no-run:   -->\n```sh\nls\n```\n", "1: no-run needs a reason"),
        ("<!-- run: port=1 -->\n```sh\nls\n```\n", "1: unknown run option 'port=1'"),
        ("<!-- run: timeout=soon -->\n```sh\nls\n```\n", "1: timeout=soon is not a number"),
        ("<!-- run -->\n```toml\nx = 1\n```\n", "1: only Python and shell blocks run, not toml"),
        ("<!-- run -->\n\nSome text.\n```sh\nls\n```\n", "1: a marker must be followed by"),
        ("text\n<!-- run -->\n", "2: a marker must be followed by a fenced block"),
    ],
    ids=["no-reason", "blank-reason", "unknown-option", "bad-timeout", "toml", "text", "end"],
)
def test_a_bad_marker_names_its_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    """A marker the runner cannot follow is an error naming the page and the marker's line."""
    page = _page(tmp_path, text)
    with pytest.raises(MarkerError, match=r"^" + str(page).replace("\\", "\\\\")) as info:
        docblocks.blocks(page)
    assert f"{page}:{problem}" in str(info.value)


def test_a_failing_block_fails_and_runs_in_a_copy(tmp_path: Path) -> None:
    """A block that fails is reported with its exit code and output; a block that writes files
    writes them in its copy of the project, not beside the page."""
    page = _page(
        tmp_path / "project",
        "```sh\necho made > made.txt\nfalse\necho not reached\n```\n"
        "```python\nimport sys\nprint('to stderr', file=sys.stderr)\nsys.exit(3)\n```\n",
    )
    shell, python = docblocks.blocks(page)
    with Sandbox(shell, tmp_path / "one") as box:
        done = box.run()
    assert done.returncode == 1
    assert "not reached" not in done.stdout
    assert (box.top / "made.txt").read_text() == "made\n"
    assert not (page.parent.parent / "made.txt").exists()
    with Sandbox(python, tmp_path / "two") as box:
        done = box.run()
    assert done.returncode == 3
    assert "page.md:6" in box.explain(done) and "to stderr" in box.explain(done)


def test_a_block_leaves_nothing_running(tmp_path: Path) -> None:
    """A block that starts a server in the background and fails before stopping it (as a
    `mesh up &` followed by a failing command would) leaves no process behind it, holding
    ports for the next test: the runner stops the block's whole session."""
    page = _page(tmp_path / "project", "```sh\nsleep 300 &\necho $! > pid.txt\nfalse\n```\n")
    (shell,) = docblocks.blocks(page)
    with Sandbox(shell, tmp_path / "one") as box:
        done = box.run()
    assert done.returncode == 1
    pid = int((box.top / "pid.txt").read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
