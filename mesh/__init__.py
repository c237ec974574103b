"""mesh: distribute an application's work across machines by its log lines.

A flow file says which machine runs each log line of a request; code logs those
lines with structlog, and logging ``"next"`` hands the flow to the machine that
owns the following line.
"""

from mesh.current import CurrentFlow, current_flow
from mesh.distribution import version as _version
from mesh.durable import StepId, step_id, step_transaction
from mesh.errors import (
    AccessDenied,
    ConfigError,
    ContextError,
    FlowError,
    FlowFileError,
    FlowNotFound,
    FlowTimeout,
    FlowViolation,
    JournalError,
    MeshError,
    PeerError,
    PeerRefused,
    PeerUnavailable,
    RegistryError,
)
from mesh.logconfig import configure_logging
from mesh.node import Node, connect, connect_async, current_context
from mesh.processors import mask_secrets, processor
from mesh.registry import handler
from mesh.result import FlowResult, Step

__all__ = [
    "AccessDenied",
    "ConfigError",
    "ContextError",
    "CurrentFlow",
    "FlowError",
    "FlowFileError",
    "FlowNotFound",
    "FlowResult",
    "FlowTimeout",
    "FlowViolation",
    "JournalError",
    "MeshError",
    "Node",
    "PeerError",
    "PeerRefused",
    "PeerUnavailable",
    "RegistryError",
    "Step",
    "StepId",
    "configure_logging",
    "connect",
    "connect_async",
    "current_context",
    "current_flow",
    "handler",
    "mask_secrets",
    "processor",
    "step_id",
    "step_transaction",
]

#: The installed distribution's version (``structlog-mesh``), one source: its metadata.
__version__ = _version()
