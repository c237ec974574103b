"""Write a services module from a flow file: one ``@mesh.handler`` per line of a request.

The flow file is where a new request starts; this turns its rows into code that
already runs end to end, so the work left is filling in each handler's TODO.
Every handler logs ``"next"`` with the values the following line renders, so
the flow's data dependencies are visible in the code from the first commit.

Line 0 gets a handler too: it runs when the flow is started with
``node.start`` or ``mesh call``; inline code that logs line 0 itself takes its
place (a handler is never called for a line inline code logs).

Pure but for :func:`write_module`: :func:`render_module` returns the source.
"""

from __future__ import annotations

import json
import keyword
import os
import re
from collections.abc import Set as AbstractSet
from pathlib import Path

from mesh.errors import MeshError
from mesh.flowfile import Flow

__all__ = ["default_out", "mesh_is_local", "module_name", "render_module", "write_module"]

#: The project's line length; a decorator longer than this is split over lines.
_WIDTH = 100
_WORD = re.compile(r"[^0-9A-Za-z_]+")


def function_name(text: str, taken: AbstractSet[str]) -> str:
    """A snake_case name from a line's text, unique among ``taken``.

    ``"Testing password for :username"`` becomes ``testing_password_for_username``.
    """
    words = _WORD.sub("_", text).strip("_").lower() or "line"
    words = re.sub(r"_+", "_", words)[:60].rstrip("_")
    if words[0].isdigit() or keyword.iskeyword(words):
        words = f"line_{words}"
    name, n = words, 2
    while name in taken:
        name, n = f"{words}_{n}", n + 1
    return name


def _prose(text: str) -> str:
    """``text`` safe inside a docstring or a comment: one line, no quote to end it."""
    return " ".join(text.replace("\\", "\\\\").replace('"', '\\"').split())


def _literal(text: str) -> str:
    """A double-quoted Python string literal (the house style, and ``ruff format``'s)."""
    return json.dumps(text, ensure_ascii=False)


def _decorator(request: str, text: str) -> list[str]:
    one = f"@mesh.handler({_literal(request)}, {_literal(text)})"
    if len(one) <= _WIDTH:
        return [one]
    lines = ["@mesh.handler(", f"    {_literal(request)},"]
    literal = f"    {_literal(text)},"
    lines.append(literal if len(literal) <= _WIDTH else f"{literal}  # noqa: E501")
    lines.append(")")
    return lines


def _next_call(flow: Flow, index: int) -> list[str]:
    """The ``log.info("next", …)`` of line ``index``: the values line ``index + 1`` renders.

    A name some earlier line renders is in the context already and is passed on
    as it is; a name new at the following line is this handler's to compute.
    """
    if index + 1 >= len(flow.lines):
        return ['    log.info("next")  # the last line: the flow is done when this returns']
    known = {name for line in flow.lines[: index + 1] for name in line.placeholders}
    following = flow.lines[index + 1]
    args: list[str] = []
    todo: list[str] = []
    for name in following.placeholders:
        if name in known:
            args.append(f"{name}=ctx[{_literal(name)}]")
        else:
            args.append(f"{name}=ctx.get({_literal(name)})")
            todo.append(name)
    out = []
    if todo:
        out.append(f"    # TODO: compute {', '.join(todo)}: line {index + 1} renders it.")
    call = ", ".join(['"next"', *args])
    single = f"    log.info({call})"
    if len(single) <= _WIDTH:
        out.append(single)
    else:
        out.append("    log.info(")
        out.append('        "next",')
        out.extend(f"        {arg}," for arg in args)
        out.append("    )")
    return out


def _docstring(flow: Flow, index: int) -> list[str]:
    line = flow.lines[index]
    first = f"{_prose(flow.name)} line {index}, on {line.machine}."
    if index + 1 < len(flow.lines):
        after = flow.lines[index + 1]
        where = "here" if after.machine == line.machine else f"on {after.machine}"
        then = f'"next" hands on to line {index + 1}, {where}.'
    else:
        then = '"next" ends the flow.'
    body = [f'    """{first}', "", f"    {then}"]
    if index == 0:
        body += [
            "",
            "    Runs when the flow is started with node.start or mesh call; inline code",
            "    that logs this line itself takes its place.",
        ]
    body.append('    """')
    return body


def render_module(
    flow: Flow,
    *,
    only: AbstractSet[int] | None = None,
    source: str = "",
    mesh_is_local: bool = False,
) -> str:
    """The source of a services module with a handler for each line of ``flow``.

    ``only``: the line indexes to write handlers for (``--missing``); default all.
    ``source``: the flow file, named in the module docstring. ``mesh_is_local``:
    the project holds the ``mesh`` package itself, so import sorters count it as
    first-party and want it in a block of its own (see :func:`mesh_is_local`).
    """
    # A sub-flow row (@REQUEST) runs its request: no handler of its own.
    indexes = [
        i for i in range(len(flow.lines)) if (only is None or i in only) and not flow.lines[i].sub
    ]
    origin = f" from {_prose(source)}" if source else ""
    request = _prose(flow.name)
    out = [
        f'"""Handlers for the ``{request}`` request, scaffolded by ``mesh scaffold``{origin}.',
        "",
        "Each handler runs its line on the machine the flow file names; logging",
        '"next" merges its keyword arguments into the flow context and hands the flow',
        "on to the following line when the handler returns. Fill in the TODOs.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Any",
        "",
        *(
            ["import structlog", "", "import mesh"]
            if mesh_is_local
            else ["import mesh", "import structlog"]
        ),
        "",
        "log = structlog.get_logger()",
    ]
    taken: set[str] = {"log", "mesh", "structlog", "Any", "annotations"}
    for index in indexes:
        line = flow.lines[index]
        name = function_name(line.text, taken)
        taken.add(name)
        out += ["", "", *_decorator(flow.name, line.text)]
        out.append(f"def {name}(ctx: dict[str, Any]) -> None:")
        out += _docstring(flow, index)
        each = line.each
        if each is not None:
            out.append(
                f'    item = ctx["item"]  # this run\'s element of {each.key}'
                f' (its position: ctx["index"])'
            )
            out.append(f"    # TODO: the work of {_prose(flow.name)} line {index} for one item.")
            out.append(f'    # What "next" logs lands, in order, in ctx["{each.results}"].')
            out.append('    log.info("next", done=item)')
        else:
            out.append(f"    # TODO: the work of {_prose(flow.name)} line {index} goes here.")
            out += _next_call(flow, index)
    return "\n".join(out) + "\n"


def module_name(path: Path, root: Path) -> str | None:
    """The dotted module name of ``path`` as imported from ``root``; None if outside it."""
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    parts = relative.with_suffix("").parts
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def mesh_is_local(root: Path) -> bool:
    """Whether ``mesh`` is a package of the project at ``root`` rather than an installed one."""
    return (root / "mesh" / "__init__.py").is_file() or (
        root / "src" / "mesh" / "__init__.py"
    ).is_file()


def default_out(flow: Flow, root: Path) -> Path:
    """``services/REQUEST.py`` beside the config, the repository's layout."""
    stem = function_name(flow.name, set())
    return root / "services" / f"{stem}.py"


def write_module(path: Path, text: str, *, force: bool) -> None:
    """Write ``text`` to ``path``; an existing file only with ``force``."""
    if path.exists() and not force:
        raise MeshError(f"{path} exists; pass --force to overwrite it, or --out another path")
    if path.is_dir():
        raise MeshError(f"{path} is a directory, not a module file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise MeshError(f"cannot write {path}: {exc.strerror or exc}") from None
