"""One hierarchy of errors, rooted at :class:`MeshError`.

Families, so callers can catch as broadly as they need:

* input: :class:`ConfigError`, :class:`FlowFileError`, :class:`RegistryError`
* a flow's own rules: :class:`FlowViolation`, :class:`ContextError`
* a flow that ended badly: :class:`FlowError` (a step failed), :class:`FlowTimeout`
* transport: :class:`PeerError` and its kinds :class:`PeerUnavailable`, :class:`PeerRefused`
  (and :class:`AccessDenied`, a refusal of who is calling)
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error the mesh raises on purpose."""


class ConfigError(MeshError):
    """``mesh.toml`` is missing, malformed, or disagrees with the flow files."""


class FlowFileError(MeshError):
    """A flow file cannot be read; the message starts ``PATH:ROW:`` like a compiler's."""


class RegistryError(MeshError):
    """A handler registration is wrong: a duplicate, or a line no flow file has."""


class ContextError(MeshError):
    """A context value cannot travel: it is not JSON-serializable."""


class FlowViolation(MeshError):
    """Code broke the flow file's order: a line logged out of turn, or no ``"next"``."""


class FlowError(MeshError):
    """A step of a flow failed; names the machine, the line and the exception.

    Raised at the originator, whichever machine the step ran on.
    """

    def __init__(
        self,
        message: str,
        *,
        request: str,
        flow_id: str,
        machine: str,
        line: str,
        line_index: int,
        error_type: str,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.flow_id = flow_id
        self.machine = machine
        self.line = line
        self.line_index = line_index
        self.error_type = error_type


class FlowTimeout(MeshError):
    """A flow's deadline passed before it was done."""

    def __init__(
        self, message: str, *, request: str, flow_id: str, machine: str, line_index: int
    ) -> None:
        super().__init__(message)
        self.request = request
        self.flow_id = flow_id
        self.machine = machine
        self.line_index = line_index


class PeerError(MeshError):
    """Talking to another machine's peer went wrong.

    ``machine`` and ``address`` name the peer; ``request``, ``flow_id`` and ``line_index``
    the flow and the line it was called for, where the error arose in a flow (``""`` and
    None otherwise).
    """

    def __init__(
        self,
        message: str,
        *,
        machine: str,
        address: str,
        request: str = "",
        flow_id: str = "",
        line_index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.machine = machine
        self.address = address
        self.request = request
        self.flow_id = flow_id
        self.line_index = line_index


class PeerUnavailable(PeerError):
    """The peer of a machine could not be reached (down, refused, not listening)."""


class PeerRefused(PeerError):
    """The peer answered but refused the call: wrong line, wrong machine, other flow version."""


class AccessDenied(PeerRefused):
    """The peer refused the caller itself: no or a wrong token (UNAUTHENTICATED), or a
    machine the flow file does not let send that line (PERMISSION_DENIED)."""


class JournalError(MeshError):
    """A peer's journal (durable flows, mesh/journal.py) cannot be used: a corrupt file, one
    written by a newer mesh, or a database that cannot be opened. The message names it."""


class FlowNotFound(MeshError):
    """No journal this process can read knows the flow id asked about."""
