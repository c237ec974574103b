"""The web application of ``mesh ui``: Starlette routes from requests to pages.

Thin: each route checks access (:mod:`mesh.ui.access`), asks the peers on a worker thread
(:mod:`mesh.ui.gather`), builds the view (:mod:`mesh.ui.model`) and renders it
(:mod:`mesh.ui.pages`). A request with ``X-Mesh-Partial: 1`` (the page's own script, once
a second) gets the main part of the page alone. Needs the ``ui`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mesh.config import Config
from mesh.errors import FlowNotFound, MeshError
from mesh.ui import model, pages
from mesh.ui.access import COOKIE, Access
from mesh.ui.gather import Gather

__all__ = ["make_app"]

STATIC = Path(__file__).resolve().parent / "static"

#: Sent with every page: nothing is loaded from anywhere but this server, no inline
#: script runs, and no other site may frame the page.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

#: Seconds a wrong token at the login form costs, so the token cannot be guessed quickly.
LOGIN_PENALTY = 1.0

Handler = Callable[[Request], Awaitable[Response]]


def make_app(config: Config, access: Access, gather: Gather | None = None) -> Starlette:
    """The application serving ``config``'s mesh under ``access``'s rules."""
    ask = gather or Gather(config)
    requests = list(config.flows)

    def page(request: Request, title: str, main: str, active: str, status: int = 200) -> Response:
        if request.headers.get("x-mesh-partial") == "1":
            return _html(main, status)  # a live update: the main part alone
        logged_in = access.session(request.cookies)
        whole = pages.layout(
            title,
            main,
            active=active,
            config_name=str(config.path),
            logged_in=logged_in,
            can_log_in=access.token is not None,
        )
        return _html(whole, status)

    async def machines(request: Request) -> Response:
        health = await run_in_threadpool(ask.health)
        notes: list[str] = []
        try:
            flows_at = await run_in_threadpool(ask.flows_at)
        except MeshError as exc:
            flows_at, notes = {}, [f"flows could not be counted: {exc}"]
        rows = model.machine_rows(config, health, flows_at)
        return page(request, "Machines", pages.machines_page(rows, notes), "/")

    async def flowfile(request: Request) -> Response:
        found, problem = await run_in_threadpool(ask.check)
        views = model.request_views(config, found)
        main = pages.flowfile_page(
            views,
            problem=problem,
            problems=found.problems if found else (),
            warnings=found.warnings if found else (),
        )
        return page(request, "Flow file", main, "/flowfile")

    async def flows(request: Request) -> Response:
        chosen = model.parse_filter(request.query_params, requests)
        unavailable = ""
        unreachable: list[str] = []
        summaries: list[model.Summary] = []
        if not config.durable:
            unavailable = (
                "no request of this config is durable, so no flow is journaled: set"
                " durable = true (or a list of requests) in mesh.toml"
            )
        else:
            try:
                summaries, unreachable = await run_in_threadpool(ask.flows)
            except MeshError as exc:
                unavailable = f"flows could not be listed: {exc}"
        rows = model.flow_rows(summaries, config, chosen)
        main = pages.flows_page(
            rows, chosen, requests, unreachable=unreachable, unavailable=unavailable
        )
        return page(request, "Flows", main, "/flows")

    async def flow(request: Request, message: str = "", status: int = 200) -> Response:
        flow_id = request.path_params["flow_id"]
        try:
            detail, unreachable = await run_in_threadpool(ask.flow, flow_id)
        except MeshError as exc:
            code = 404 if isinstance(exc, FlowNotFound) else 502
            failed = pages.error_page(f"Flow {flow_id}", str(exc))
            return page(request, "Flow", failed, "/flows", code)
        view = model.flow_view(detail, config)
        main = pages.flow_page(view, unreachable=unreachable, message=message)
        return page(request, f"{detail.summary.request} {flow_id[:8]}", main, "/flows", status)

    def act(name: str) -> Handler:
        async def action(request: Request) -> Response:
            flow_id = request.path_params["flow_id"]
            call = ask.cancel if name == "cancel" else ask.retry
            try:
                await run_in_threadpool(call, flow_id)
            except MeshError as exc:
                return await flow(request, f"{name} failed: {exc}", 409)
            return RedirectResponse(f"/flows/{quote(flow_id)}", status_code=303)

        return action

    async def login(request: Request) -> Response:
        if request.method == "GET":
            target = _local(request.query_params.get("next", "/"))
            return _html(_bare("Log in", pages.login_page(target), config))
        form = await _form(request)
        target = _local(form.get("next", "/"))
        sid = access.log_in(form.get("token", ""))
        if sid is None:
            await asyncio.sleep(LOGIN_PENALTY)
            return _html(_bare("Log in", pages.login_page(target, failed=True), config), 401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/")
        return response

    async def logout(request: Request) -> Response:
        access.log_out(request.cookies)
        response = RedirectResponse("/login" if access.login_required else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/", machines),
        Route("/flowfile", flowfile),
        Route("/flows", flows),
        Route("/flows/{flow_id}", flow),
        Route("/flows/{flow_id}/cancel", act("cancel"), methods=["POST"]),
        Route("/flows/{flow_id}/retry", act("retry"), methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def guard(request: Request, call_next: Handler) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        path = request.url.path
        if not access.host_ok(headers):
            return PlainTextResponse("mesh ui: this Host is not a loopback name", 400)
        if request.method == "POST":
            refusal = access.post_refusal(path, headers, request.cookies)
            if refusal is not None:
                if access.same_origin(headers) and not access.authenticated(
                    headers, request.cookies
                ):
                    return _to_login(request, back=_flow_page(path))
                return _html(_bare("Refused", pages.error_page("Refused", refusal), config), 403)
        elif not access.may_read(path, headers, request.cookies):
            if request.headers.get("x-mesh-partial") == "1" or "authorization" in headers:
                return PlainTextResponse("mesh ui: log in with the mesh token", 401)
            return _to_login(request)
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            ask.close()

    middleware = [Middleware(BaseHTTPMiddleware, dispatch=guard)]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _html(text: str, status: int = 200) -> HTMLResponse:
    response = HTMLResponse(text, status)
    for key, value in SECURITY_HEADERS.items():
        response.headers[key] = value
    return response


def _bare(title: str, main: str, config: Config) -> str:
    return pages.layout(title, main, active="", config_name=str(config.path), live=False)


def _to_login(request: Request, back: str | None = None) -> Response:
    """To the login form, which comes back to this page (or ``back``) once logged in."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(back or target, safe='')}", status_code=303)


def _flow_page(path: str) -> str:
    """``/flows/ID`` for a POST to ``/flows/ID/cancel`` or ``…/retry``: where to come back."""
    head, _, action = path.rpartition("/")
    return head if action in ("cancel", "retry") and head.startswith("/flows/") else "/"


def _local(target: str) -> str:
    """``target`` when it is a path of this server, else ``/``: no redirect elsewhere."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the login form is the only one with fields)."""
    body = (await request.body())[:8192].decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
