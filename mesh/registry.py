"""``@mesh.handler`` and the table of handlers, checked against the flow files.

Every machine imports the same services, so the registry holds handlers for
lines that run elsewhere too; the flow file alone decides which of them run
here. A registration checks itself when it is declared (duplicates, a function
that cannot take the context) and again when a node starts (lines that no flow
file has), so mistakes surface before the first request. Handlers register when
their modules are imported: :func:`import_services` imports the config's.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mesh.errors import ConfigError, RegistryError
from mesh.flowfile import FlowSet

if TYPE_CHECKING:
    from mesh.config import Config

Handler = Callable[[dict[str, Any]], object]
H = TypeVar("H", bound=Callable[..., object])


def describe(fn: Callable[..., object]) -> str:
    """``module.qualname``: how errors and ``mesh check`` name a handler."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def located(fn: Callable[..., object]) -> str:
    """``module.qualname (file:line)``: a handler as a registration error names it, so the
    message leads to the user's code, not to the registry that raised it.

    The line is the function's first (its first decorator's); the file is relative to
    the working folder when it lies inside it, as the user would type it.
    """
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return describe(fn)
    path = code.co_filename
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        relative = path
    if not relative.startswith(os.pardir):
        path = relative
    return f"{describe(fn)} ({path}:{code.co_firstlineno})"


def _source(fn: Callable[..., object]) -> tuple[object, ...]:
    """Where a function was defined: the same for a module imported twice.

    A script run as ``__main__`` that is also listed in ``services`` registers
    its handlers twice, under two module names; that is one handler, not two.
    """
    code = getattr(fn, "__code__", None)
    if code is None:
        return (describe(fn),)
    return (getattr(fn, "__qualname__", None), code.co_filename, code.co_firstlineno)


class Registry:
    """Handlers by (request, line text)."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}

    def handler(self, request: str, line: str) -> Callable[[H], H]:
        """Register a function to run line ``line`` (its exact Log text) of ``request``."""
        if not isinstance(request, str) or not request.strip():
            raise RegistryError(
                f"mesh.handler: request must be a non-empty string, not {request!r}"
            )
        if not isinstance(line, str) or not line.strip():
            raise RegistryError(f"mesh.handler: line must be a non-empty string, not {line!r}")
        key = (request.strip(), line.strip())

        def register(fn: H) -> H:
            if not callable(fn):
                raise RegistryError(f"mesh.handler({request!r}, {line!r}) decorates {fn!r}")
            if inspect.isasyncgenfunction(fn):
                raise RegistryError(
                    f"handler {located(fn)} for {request} line {line!r} is an async"
                    " generator; a handler is a function or an async def function"
                )
            try:
                inspect.signature(fn).bind({})
            except TypeError:
                raise RegistryError(
                    f"handler {located(fn)} for {request} line {line!r} must take one"
                    " argument, the flow context"
                ) from None
            except ValueError:  # no signature (some builtins): trust it
                pass
            known = self._handlers.get(key)
            if known is not None and _source(known) != _source(fn):
                raise RegistryError(
                    f"{request} line {line!r} already has a handler, {located(known)};"
                    f" cannot register {located(fn)} too"
                )
            self._handlers[key] = fn
            return fn

        return register

    def registered(self) -> dict[tuple[str, str], Handler]:
        """A copy of every registration, for ``mesh check``."""
        return dict(self._handlers)

    def problems(self, flows: FlowSet) -> list[str]:
        """Registrations for lines that no flow file has, each as one message."""
        out = []
        for (request, text), fn in self._handlers.items():
            if request in flows and flows[request].index_of(text) is not None:
                continue
            if request not in flows:
                hint = difflib.get_close_matches(request, list(flows), n=1)
                where = f"no flow file has request {request!r}"
                if hint:
                    where += f" (did you mean {hint[0]!r}?)"
            else:
                texts = [line.text for line in flows[request].lines]
                hint = difflib.get_close_matches(text, texts, n=1)
                where = f"request {request} has no such line"
                if hint:
                    where += f" (did you mean {hint[0]!r}?)"
            out.append(
                f"handler {located(fn)} is registered for {request} line {text!r}, but {where}"
            )
        return out

    def table(self, flows: FlowSet) -> dict[str, tuple[Handler | None, ...]]:
        """Handlers by request, indexed by line: what the runtime looks up per line."""
        problems = self.problems(flows)
        if problems:
            raise RegistryError("; ".join(problems))
        return {
            name: tuple(self._handlers.get((name, line.text)) for line in flow.lines)
            for name, flow in flows.flows.items()
        }


default_registry = Registry()
handler = default_registry.handler


def import_services(config: Config) -> None:
    """Import the modules in ``services`` so their handlers register, from the config's folder.

    The config's folder goes first on ``sys.path`` so ``services.auth`` means the project's
    module wherever the process was started. A failed import becomes one ``ConfigError`` line
    naming the module and its cause; the original exception stays chained for debugging.
    """
    root = str(config.root)
    if not sys.path or sys.path[0] != root:
        while root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
    # Modules written since the import system last listed the folder would otherwise be missed.
    importlib.invalidate_caches()
    for name in config.services:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as exc:
            raise ConfigError(_import_failure(config, name, exc)) from exc


def _import_failure(config: Config, name: str, exc: BaseException) -> str:
    where = str(config.path)
    message = " ".join(str(exc).split())
    cause = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing is not None and (name == missing or name.startswith(missing + ".")):
        return (
            f"{where}: services: cannot import {name!r}, no such module "
            f"(searched {config.root} first): {cause}"
        )
    at = "" if isinstance(exc, SyntaxError) else _raised_at(exc, config.root)
    return f"{where}: services: importing {name!r} failed: {cause}{at}"


_MESH_PACKAGE = Path(__file__).resolve().parent


def _raised_at(exc: BaseException, root: Path) -> str:
    """Where the exception came from, skipping the import machinery's own frames."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<") and "importlib" not in Path(frame.filename).parts
    ]
    if not frames:
        return ""
    # The last frame of the services' own code when there is one: an error the mesh
    # raises about a service (a handler that takes two arguments) is the service's to
    # fix, at its line, not at the line of the mesh that noticed.
    theirs = [f for f in frames if not Path(f.filename).resolve().is_relative_to(_MESH_PACKAGE)]
    last = (theirs or frames)[-1]
    try:  # relative to the config's folder when inside it, as the author knows the file
        shown = str(Path(last.filename).relative_to(root))
    except ValueError:
        shown = last.filename
    return f" (at {shown}:{last.lineno})"
