"""Who may read ``mesh ui`` and who may cancel or retry a flow from it.

The rules, as pure decisions on a request's method, path and headers:

* On a loopback address (the default) anyone on this host may read; beyond it every page
  asks for the mesh token, by a login form (which sets a session cookie that is a random
  id, never the token) or an ``Authorization: Bearer`` header. With no token configured,
  ``mesh ui`` refuses to listen beyond loopback at all (:func:`listen_problem`).
* A POST (cancel, retry, log out) must come from a page of this server: its ``Origin``
  (else ``Referer``) names the host it was sent to, so another site open in the same
  browser cannot post a form here. A request with a bearer header is a script, which a
  browser never sends by itself, so it needs no origin.
* When a token is configured, a POST needs it (session or header), even on loopback.
* On loopback the ``Host`` header must name a loopback host, so a web page whose DNS
  name is rebound to 127.0.0.1 cannot read this one through the browser.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mesh.addresses import is_loopback
from mesh.token import Token

__all__ = ["COOKIE", "Access", "listen_problem"]

#: The session cookie's name.
COOKIE = "mesh_ui_session"
#: Paths anyone may fetch: the login form and the stylesheet and script it uses.
PUBLIC = ("/login", "/static/")
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def listen_problem(listen: str, token: Token | None) -> str | None:
    """Why ``mesh ui`` may not listen on ``listen``, or None."""
    if is_loopback(listen) or token is not None:
        return None
    return (
        f"--listen {listen} is reachable from other hosts, and this mesh has no token to ask"
        " them for: set token_file in mesh.toml (or $MESH_TOKEN), or listen on 127.0.0.1"
    )


@dataclass
class Access:
    """The rules for one ``mesh ui`` process: its token, its address and its sessions."""

    token: Token | None
    loopback: bool
    _sessions: set[str] = field(default_factory=set, init=False, repr=False)  # credentials
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def login_required(self) -> bool:
        return not self.loopback

    def announce(self, url: str) -> str:
        """What ``mesh ui`` says at start about who may use it."""
        if self.login_required:
            return (
                f"mesh ui: {url} is reachable from other hosts: every page asks for the mesh"
                " token (a login form, or Authorization: Bearer)"
            )
        if self.token is not None:
            return (
                f"mesh ui: {url} on loopback: anyone on this host may read; cancel and"
                " retry ask for the mesh token"
            )
        return f"mesh ui: {url} on loopback: anyone on this host may read and act (no token)"

    # -- who is asking -----------------------------------------------------------------

    def bearer(self, headers: Mapping[str, str]) -> bool:
        """The request carries the token in an ``Authorization: Bearer`` header."""
        value = headers.get("authorization")
        return bool(value and self.token and self.token.matches([("authorization", value)]))

    def session(self, cookies: Mapping[str, str]) -> bool:
        value = cookies.get(COOKIE, "")
        with self._lock:
            return any(secrets.compare_digest(value, s) for s in self._sessions)

    def authenticated(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        return self.bearer(headers) or self.session(cookies)

    def log_in(self, submitted: str) -> str | None:
        """A new session id when ``submitted`` is the token, else None."""
        if self.token is None or not self.token.matches([("authorization", "Bearer " + submitted)]):
            return None
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions.add(sid)
        return sid

    def log_out(self, cookies: Mapping[str, str]) -> None:
        with self._lock:
            self._sessions.discard(cookies.get(COOKIE, ""))

    # -- decisions ---------------------------------------------------------------------

    def host_ok(self, headers: Mapping[str, str]) -> bool:
        """On loopback, the Host header names a loopback host (no DNS rebinding)."""
        if not self.loopback:
            return True
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower() in _LOOPBACK_NAMES

    def may_read(self, path: str, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        if not self.login_required or path.startswith(PUBLIC):
            return True
        return self.authenticated(headers, cookies)

    def same_origin(self, headers: Mapping[str, str]) -> bool:
        return same_origin(headers)

    def post_refusal(
        self, path: str, headers: Mapping[str, str], cookies: Mapping[str, str]
    ) -> str | None:
        """Why a POST to ``path`` is refused, or None when it may go ahead."""
        scripted = self.bearer(headers)
        if not scripted and not self.same_origin(headers):
            return (
                "this form was not sent from a page of this server (its Origin or Referer"
                " does not name this host)"
            )
        if path in {"/login", "/logout"}:
            return None
        if self.token is not None and not (scripted or self.session(cookies)):
            return "cancelling or retrying a flow needs the mesh token: log in first"
        return None


def same_origin(headers: Mapping[str, str]) -> bool:
    """The request's ``Origin`` (else ``Referer``) has the host:port it was sent to."""
    host = headers.get("host", "").lower()
    source = headers.get("origin") or headers.get("referer") or ""
    if not host or not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host
