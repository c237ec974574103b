"""The installable distribution: its name on the package index, and its version.

The import package is ``mesh``, but ``mesh`` on the public package index is an unrelated
project, so the distribution has a name of its own. Every install hint the mesh prints is
made here, so no message can tell a user to install the wrong thing.

The version has one source, the distribution's metadata (``pyproject.toml`` at build time);
a source checkout that was never installed reads it from ``pyproject.toml`` directly.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "install_hint", "version"]

#: The name ``pip install`` takes.
DISTRIBUTION = "structlog-mesh"

#: What a checkout whose version cannot be read at all reports (PEP 440 local version).
UNKNOWN = "0+unknown"


def install_hint(extra: str | None = None) -> str:
    """The shell command that installs the mesh (with ``extra``), quoted for any shell."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


def version() -> str:
    """The installed distribution's version, else the one in the checkout's pyproject.toml."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return _checkout_version(Path(__file__).resolve().parents[1] / "pyproject.toml")


def _checkout_version(pyproject: Path) -> str:
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return UNKNOWN
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return UNKNOWN  # some other project's file, where the package was copied
    return str(project["version"])
