"""Handler registration checks itself when declared and against the flow files."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_mesh
from support.meshdir import MeshDir

from mesh.errors import RegistryError
from mesh.flowfile import parse_flows
from mesh.registry import Registry

FLOWS = parse_flows("login,Testing password for :username,server\nlogin,Done,client\n")


def test_table_maps_lines_to_handlers() -> None:
    """The table has the handler at its line's index and None for pass-throughs."""
    reg = Registry()

    @reg.handler("login", "Testing password for :username")
    def check(ctx: dict[str, Any]) -> None:
        pass

    assert reg.table(FLOWS) == {"login": (check, None)}


def test_duplicate_registration_is_refused_when_declared() -> None:
    """A second handler for the same line raises at once, naming both."""
    reg = Registry()

    @reg.handler("login", "Done")
    def first(ctx: dict[str, Any]) -> None:
        pass

    with pytest.raises(RegistryError, match=r"already has a handler.*first.*second"):

        @reg.handler("login", "Done")
        def second(ctx: dict[str, Any]) -> None:
            pass


def test_handler_must_take_the_context() -> None:
    """A function that cannot take one argument is refused at declaration."""
    reg = Registry()
    with pytest.raises(RegistryError, match="must take one argument"):

        @reg.handler("login", "Done")
        def no_args() -> None:
            pass


def test_unknown_line_is_refused_with_a_suggestion() -> None:
    """A handler for a line no flow file has names it and suggests the close match."""
    reg = Registry()

    @reg.handler("login", "Tesing password for :username")
    def typo(ctx: dict[str, Any]) -> None:
        pass

    with pytest.raises(RegistryError, match=r"did you mean 'Testing password for :username'"):
        reg.table(FLOWS)


def test_unknown_request_is_reported() -> None:
    """A handler for a request no flow file has is one problem naming the request."""
    reg = Registry()

    @reg.handler("logn", "Done")
    def typo(ctx: dict[str, Any]) -> None:
        pass

    [problem] = reg.problems(FLOWS)
    assert "no flow file has request 'logn'" in problem
    assert "did you mean 'login'" in problem


def test_empty_names_are_refused() -> None:
    """Empty request or line text is refused before decorating."""
    reg = Registry()
    with pytest.raises(RegistryError):
        reg.handler("", "Done")
    with pytest.raises(RegistryError):
        reg.handler("login", "  ")


def test_async_def_handler_is_accepted_an_async_generator_is_not() -> None:
    """An ``async def`` handler is registered (it runs on the peer's event loop); an async
    generator would never run its "next": refused at declaration, naming it."""
    reg = Registry()

    @reg.handler("login", "Done")
    async def later(ctx: dict[str, Any]) -> None:
        pass

    assert reg.registered()[("login", "Done")] is later
    with pytest.raises(RegistryError, match="async generator"):

        @reg.handler("login", "Started")
        async def streaming(ctx: dict[str, Any]) -> Any:
            yield None


def test_same_function_registered_twice_is_one_handler() -> None:
    """A module imported twice (as __main__ and by name) registers one handler, not a clash."""
    reg = Registry()

    def check(ctx: dict[str, Any]) -> None:
        pass

    twin = type(check)(check.__code__, check.__globals__, "check")
    twin.__module__ = "__main__"
    twin.__qualname__ = check.__qualname__
    reg.handler("login", "Done")(check)
    reg.handler("login", "Done")(twin)
    assert reg.table(FLOWS)["login"][1] is twin


# -- errors name the user's file and line ------------------------------------------------

TWO_ARGS = """\
import mesh


@mesh.handler("login", "Done")
def finish(ctx, extra):
    pass
"""

FIRST = """\
import mesh


@mesh.handler("login", "Done")
def finish(ctx):
    pass
"""

SECOND = """\
import mesh

# the same line, handled again by mistake


@mesh.handler("login", "Done")
def finish_again(ctx):
    pass
"""


def _import(folder: Path, name: str, code: str) -> None:
    (folder / f"{name}.py").write_text(code, encoding="utf-8")
    sys.path.insert(0, str(folder))
    importlib.import_module(name)


def test_a_handler_with_two_arguments_is_named_by_file_and_line(tmp_path: Path) -> None:
    """A handler taking two arguments: before, the error named only module.function and its
    traceback ended in mesh/registry.py; now it names the user's file and line."""
    name = f"svc_two_args_{tmp_path.name}"

    with pytest.raises(RegistryError) as info:
        _import(tmp_path, name, TWO_ARGS)

    path = tmp_path / f"{name}.py"
    assert f"{name}.finish ({path}:4)" in str(info.value)
    assert "must take one argument" in str(info.value)


def test_a_duplicate_handler_names_both_files_and_lines(tmp_path: Path) -> None:
    """Two modules handling one line: the error names each function by file and line."""
    first, second = f"svc_first_{tmp_path.name}", f"svc_second_{tmp_path.name}"
    _import(tmp_path, first, FIRST)

    with pytest.raises(RegistryError) as info:
        _import(tmp_path, second, SECOND)

    message = str(info.value)
    assert f"{first}.finish ({tmp_path / first}.py:4)" in message
    assert f"{second}.finish_again ({tmp_path / second}.py:6)" in message


def test_mesh_check_shows_paths_relative_to_where_it_runs(mesh_dir: MeshDir) -> None:
    """mesh check in the project folder: the handler's file is shown as the user wrote it,
    relative to that folder, with its line."""
    mesh_dir.flow("login,Done,client\n", "flow.csv")
    (mesh_dir.root / "services").mkdir()
    (mesh_dir.root / "services" / "__init__.py").write_text("", encoding="utf-8")
    (mesh_dir.root / "services" / "bad.py").write_text(TWO_ARGS, encoding="utf-8")
    mesh_dir.services.append("services.bad")
    mesh_dir.write_config({"client": False}, flow="flow.csv")

    done = run_mesh("check", cwd=mesh_dir.root)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "services.bad.finish (services/bad.py:4)" in done.stderr
