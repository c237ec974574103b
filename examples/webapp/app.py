"""A web application that starts the ``login`` flow from an async endpoint.

``POST /login`` with ``{"username": …, "password": …}`` runs the flow file's ``login``
request as the address-less ``client`` machine: the password check and the session happen
on ``server``, wherever that runs, and the endpoint answers with the session. Nothing here
knows about gRPC or where ``server`` is: that is the flow file's and ``mesh.toml``'s job.

The config comes from ``$MESH_CONFIG`` (else ``./mesh.toml``); the machine this app is, from
``$MESH_MACHINE`` (default ``client``). See README.md beside this file to run it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

import mesh


class Login(BaseModel):
    username: str
    password: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One node for the whole process, connected at startup and closed at shutdown. Its
    flows run on the app's own event loop (connect_async), as tasks beside the requests."""
    app.state.node = await mesh.connect_async(machine=os.environ.get("MESH_MACHINE", "client"))
    try:
        yield
    finally:
        await app.state.node.aclose()


app = FastAPI(title="mesh login example", lifespan=lifespan)


@app.post("/login")
async def login(body: Login, request: Request) -> dict[str, Any]:
    """Log in: 200 with the session, 401 for wrong credentials, 503/504 when the mesh is not
    there. The event loop serves other requests while the flow runs."""
    node: mesh.Node = request.app.state.node
    try:
        result = await node.start_async("login", username=body.username, password=body.password)
    except mesh.FlowError as exc:
        if exc.error_type == "PermissionError":  # raised by the password check on server
            raise HTTPException(401, "invalid credentials") from None
        raise HTTPException(500, f"login failed on {exc.machine}") from None
    except mesh.FlowTimeout:
        raise HTTPException(504, "login took too long") from None
    except mesh.PeerError as exc:
        raise HTTPException(503, f"{exc.machine} is unavailable") from None
    return {"session": result.context["session"], "flow_id": result.flow_id}
