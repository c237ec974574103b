"""The public API: what `import mesh` offers users, and nothing else by accident."""

from __future__ import annotations

import mesh


def test_exact_public_exports() -> None:
    """__all__ is the documented API, sorted, and every name exists."""
    assert mesh.__all__ == [
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
    for name in mesh.__all__:
        assert hasattr(mesh, name), name


def test_errors_form_one_hierarchy() -> None:
    """Every error class the mesh raises derives from MeshError."""
    errors = [getattr(mesh, n) for n in mesh.__all__ if n.endswith(("Error", "Violation"))]
    errors += [mesh.FlowTimeout, mesh.PeerUnavailable, mesh.PeerRefused, mesh.AccessDenied]
    for cls in errors:
        assert issubclass(cls, mesh.MeshError), cls
    assert issubclass(mesh.PeerUnavailable, mesh.PeerError)
    assert issubclass(mesh.PeerRefused, mesh.PeerError)
    assert issubclass(mesh.AccessDenied, mesh.PeerRefused)


def test_processor_is_the_instance_and_the_module_is_separate() -> None:
    """mesh.processor is the structlog processor itself, not a module."""
    import mesh.processors

    assert mesh.processors.processor is mesh.processor
    assert callable(mesh.processor)
    assert mesh.processors.__name__ == "mesh.processors"


def test_generated_code_stays_private() -> None:
    """The protobuf modules are not part of the public namespace."""
    assert not any(name.endswith("_pb2") for name in vars(mesh))
