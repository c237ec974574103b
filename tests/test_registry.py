"""Handler registration checks itself when declared and against the flow files."""

from __future__ import annotations

from typing import Any

import pytest

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


def test_async_handler_is_refused_when_declared() -> None:
    """An async function would never run its "next": refused at declaration."""
    reg = Registry()
    with pytest.raises(RegistryError, match="is async"):

        @reg.handler("login", "Done")
        async def later(ctx: dict[str, Any]) -> None:
            pass


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
